"""Changelog pages: many keys' whole states in one record.

A whole state per key and record cost a restore more than the states did: kafka-python reads
about 100,000 records a second, so a million customers took 18.5 s, and the same states packed
256 KiB to a record were fetched and parsed in 8.5 s (2026-12-07, one local broker). A flush's
whole states therefore go in *page* records:

    key   b"\\x00p" + writer (12 hex digits, random per store) + b"/" + batch [+ b"." + n]
    value b"\\x00S" + format (1 byte) + count (u32), then per key:
          key length (u32), state length (u32), key (UTF-8), state (the windows' own bytes)

A page lives while it holds the latest whole state of one of its keys; once none (each was
written again, or deleted), it gets a tombstone (see ``Store``). Keys whose state stays put
(idle customers) keep old pages alive, so the store rewrites the live keys of its oldest pages
while dead entries outnumber live ones: the changelog holds at most about twice the live state.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pipeline.worker.state.delta import record_key, runs

PAGE_PREFIX = b"\x00p"
PAGE_BYTES = 256 * 1024  # a page is closed past this
_FORMAT = 1
_HEAD = struct.Struct("<2sBI")
_ENTRY = struct.Struct("<II")


def is_page_key(key: bytes) -> bool:
    return key.startswith(PAGE_PREFIX)


def encode(writer: bytes, seq: int, entries: list[tuple[str, bytes, bytes]]
           ) -> Iterator[tuple[bytes, bytes, list[str]]]:
    """Pages of ``entries`` (key, key bytes, state bytes): (record key, record value, the keys in it)."""
    sizes = (_ENTRY.size + len(name) + len(state) for _key, name, state in entries)
    for n, (start, end) in enumerate(runs(sizes, PAGE_BYTES)):
        yield _page(record_key(PAGE_PREFIX, writer, seq, n), entries[start:end])


def _page(key: bytes, entries: list[tuple[str, bytes, bytes]]) -> tuple[bytes, bytes, list[str]]:
    parts = [_HEAD.pack(b"\x00S", _FORMAT, len(entries))]
    for _key, name, state in entries:
        parts += (_ENTRY.pack(len(name), len(state)), name, state)
    return key, b"".join(parts), [e[0] for e in entries]


def decode(value: bytes) -> list[tuple[str, memoryview]]:
    """The (key, state bytes) of a page, checked for shape. ValueError: not a page."""
    if len(value) < _HEAD.size:
        raise ValueError(f"a changelog page of {len(value)} bytes")
    magic, fmt, count = _HEAD.unpack_from(value)
    if magic != b"\x00S" or fmt != _FORMAT:
        raise ValueError(f"not a changelog page of format {_FORMAT} ({value[:3]!r})")
    view, at, end, out = memoryview(value), _HEAD.size, len(value), []
    for _ in range(count):
        if at + _ENTRY.size > end:
            raise ValueError(f"a changelog page of {count} states cut short ({end} bytes)")
        n, m = _ENTRY.unpack_from(value, at)
        at += _ENTRY.size
        if at + n + m > end:
            raise ValueError(f"a changelog page of {count} states cut short ({end} bytes)")
        out.append((bytes(view[at: at + n]).decode("utf-8", "surrogateescape"), view[at + n: at + n + m]))
        at += n + m
    if at != end:
        raise ValueError(f"a changelog page with {end - at} bytes after its {count} states")
    return out
