"""Changelog deltas: what one batch changed in one store, as few records as its size allows.

Writing each changed key's whole state per batch cost the raw path more than its features did:
about 1.4 changelog records per transaction (a terminal is touched by most batches), 1.3 KB
each, each costing kafka-python about 21 us to send. A batch's changes go instead in *delta*
records, in the order they were made, one record per store per batch (more past ``DELTA_BYTES``):

    key   b"\\x00d" + writer (12 hex digits, random per store) + b"/" + sequence number
    value b"\\x00D" + format (1 byte) + count (u32), then columns of ``count`` entries:
          kinds (u8: 0 an event, 1 a label), ids (i64), times (i64), values (f64: an event's
          amount, a label's fraud flag), key lengths (u32), then the keys (UTF-8)

No entity key holds a NUL, and the writer makes each delta key unique: compaction never drops one
for another. A store still writes whole states (``Store.flush``), each key at most once per
``SNAPSHOT_LAG`` batches, and a delta gets a tombstone once every key it touched has a later
whole state (see ``Store``). A restore replays, after the last whole state of each key, the
deltas that follow it.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable, Iterator

DELTA_PREFIX = b"\x00d"
DELTA_BYTES = 256 * 1024  # a delta record is closed past this (a tenth of a 4,096-transaction batch's changes fit)
_FORMAT = 1
_HEAD = struct.Struct("<2sBI")
_ENTRY_BYTES = 1 + 8 + 8 + 8 + 4  # and the key


def writer_id() -> bytes:
    return os.urandom(6).hex().encode()


def record_key(prefix: bytes, writer: bytes, seq: int, n: int = 0) -> bytes:
    """A delta's or page's key: unique per writer, batch and record of the batch (``n``)."""
    return b"%s%s/%d" % (prefix, writer, seq) + (b".%d" % n if n else b"")


def delta_key(writer: bytes, seq: int, n: int = 0) -> bytes:
    return record_key(DELTA_PREFIX, writer, seq, n)


def runs(sizes: Iterable[int], limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive (start, end) runs of items whose ``sizes`` add up to at most ``limit`` (an item bigger than
    ``limit`` alone in its run)."""
    start, size, end = 0, 0, 0
    for end, n in enumerate(sizes, 1):
        size += n
        if size > limit and end - 1 > start:
            yield start, end - 1
            start, size = end - 1, n
    if end > start:
        yield start, end


def is_delta_key(key: bytes) -> bool:
    return key.startswith(DELTA_PREFIX)


Change = tuple[str, int, int, int, float]  # key, kind, id, time, value


def encode(changes: list[Change]) -> list[bytes]:
    """The delta records of ``changes`` (in order), each below ``DELTA_BYTES`` unless one change alone is not."""
    names = [c[0].encode("utf-8", "surrogateescape") for c in changes]
    return [_record(changes[start:end], names[start:end])
            for start, end in runs((_ENTRY_BYTES + len(name) for name in names), DELTA_BYTES)]


def _record(changes: list[Change], names: list[bytes]) -> bytes:
    _keys, kinds, eids, times, values = zip(*changes, strict=True)
    return b"".join((_HEAD.pack(b"\x00D", _FORMAT, len(changes)), bytes(kinds), array("q", eids).tobytes(),
                     array("q", times).tobytes(), array("d", values).tobytes(),
                     array("I", map(len, names)).tobytes(), *names))


class Delta:
    """A delta record read back: its columns, checked for shape; ``changes`` yields them in order."""

    __slots__ = ("eids", "kinds", "lens", "names", "times", "values")

    def __init__(self, value: bytes) -> None:
        if len(value) < _HEAD.size:
            raise ValueError(f"a changelog delta of {len(value)} bytes")
        magic, fmt, n = _HEAD.unpack_from(value)
        if magic != b"\x00D" or fmt != _FORMAT:
            raise ValueError(f"not a changelog delta of format {_FORMAT} ({value[:3]!r})")
        at = _HEAD.size
        fixed = at + n * _ENTRY_BYTES
        if len(value) < fixed:
            raise ValueError(f"a changelog delta of {n} changes cut short ({len(value)} bytes)")
        self.kinds = value[at: at + n]
        at += n
        self.eids, self.times, self.values, self.lens = array("q"), array("q"), array("d"), array("I")
        for column, width in ((self.eids, 8), (self.times, 8), (self.values, 8), (self.lens, 4)):
            column.frombytes(value[at: at + width * n])
            at += width * n
        self.names = value[at:]
        if len(self.names) != sum(self.lens):
            raise ValueError(f"a changelog delta whose keys take {len(self.names)} bytes, not {sum(self.lens)}")

    def changes(self) -> Iterator[tuple[str, int, int, int, float]]:
        at, names = 0, self.names
        for kind, eid, t, value, n in zip(self.kinds, self.eids, self.times, self.values, self.lens, strict=True):
            yield names[at: at + n].decode("utf-8", "surrogateescape"), kind, eid, t, value
            at += n
