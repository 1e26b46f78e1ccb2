"""Entity states of realistic size, and what they cost in memory and to restore.

A customer's state holds its events of the last 31 days, a terminal's those of the last 38 days
and the fraud labels among them (``pipeline.streamfeatures``). The states here hold as many events
as a simulated bank's customers and terminals hold at its last day (``bench/state_bench.py``
samples them), at random times inside the horizon. :func:`memory_child` and
:func:`restore_child` run in a fresh process each, so that RSS growth is the stores' alone.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import KafkaSettings
from pipeline.streamfeatures import CustomerWindows, TerminalWindows
from pipeline.worker.state import Store

TERMINAL_HORIZON_MS = TerminalWindows().horizon_ms  # label delay + longest window + grace: 38 days


# -- states ------------------------------------------------------------------------------------
def events(counts: np.ndarray, rng: np.random.Generator, now_ms: int, horizon_ms: int,
           chunk: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per entity: times (sorted, in the horizon before ``now_ms``), amounts and ids of ``counts[i]`` events."""
    for first in range(0, len(counts), chunk):
        part = counts[first: first + chunk]
        total = int(part.sum())
        owner = np.repeat(np.arange(len(part)), part)
        times = rng.integers(now_ms - horizon_ms + 1, now_ms + 1, total)
        times = times[np.lexsort((times, owner))]
        amounts = np.round(rng.uniform(5.0, 100.0, total), 2)  # the simulator's mean amounts per customer
        ids = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, total, dtype=np.int64)
        bounds = np.concatenate(([0], np.cumsum(part)))
        for lo, hi in itertools.pairwise(bounds):
            yield times[lo:hi], amounts[lo:hi], ids[lo:hi]


def customer_windows(times: np.ndarray, amounts: np.ndarray, ids: np.ndarray) -> CustomerWindows:
    state = CustomerWindows()
    state.times.frombytes(times.tobytes())
    state.amounts.frombytes(amounts.tobytes())
    state.ids.frombytes(ids.tobytes())
    return state


def terminal_windows(times: np.ndarray, ids: np.ndarray, frauds: int) -> TerminalWindows:
    state = TerminalWindows()
    state.times.frombytes(times.tobytes())
    state.ids.frombytes(ids.tobytes())
    state.frauds = dict(zip(ids[-frauds:].tolist(), times[-frauds:].tolist(), strict=True)) if frauds else {}
    return state


def sample(held: dict[str, list[int]], customers: int, terminals: int, seed: int,
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Events per customer, events and frauds per terminal, drawn from the simulated bank's."""
    rng = np.random.default_rng(seed)
    c = np.asarray(held["customer_events"], dtype=np.int64)[rng.integers(0, len(held["customer_events"]), customers)]
    pick = rng.integers(0, len(held["terminal_events"]), terminals)
    t = np.asarray(held["terminal_events"], dtype=np.int64)[pick]
    return c, t, np.minimum(np.asarray(held["terminal_frauds"], dtype=np.int64)[pick], t)


def customer_records(counts: np.ndarray, now_ms: int, seed: int) -> Iterator[tuple[bytes, bytes]]:
    """(key, changelog value) of customers "0", "1", ... holding ``counts[i]`` events each."""
    rng = np.random.default_rng(seed)
    for i, (times, amounts, ids) in enumerate(events(counts, rng, now_ms, CustomerWindows.HORIZON_MS)):
        yield str(i).encode(), customer_windows(times, amounts, ids).to_bytes()


def terminal_records(counts: np.ndarray, frauds: np.ndarray, now_ms: int, seed: int,
                     ) -> Iterator[tuple[bytes, bytes]]:
    rng = np.random.default_rng(seed)
    for i, (times, _amounts, ids) in enumerate(events(counts, rng, now_ms, TERMINAL_HORIZON_MS)):
        yield str(i).encode(), terminal_windows(times, ids, int(frauds[i])).to_bytes()


# -- memory per entity (in a child process) ---------------------------------------------------
def rss_bytes(field: str = "VmRSS") -> int:
    status = Path("/proc/self/status").read_text()
    return 1024 * next(int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:"))


def measure_store(records: list[tuple[bytes, bytes]], factory: Callable[[], Any],
                  parse: Callable[[bytes], Any]) -> dict[str, Any]:
    """A Store loaded from changelog records: RSS growth, then tracemalloc of a second copy."""
    gc.collect()
    before = rss_bytes()
    store: Store[Any] = Store(factory, parse)
    for key, value in records:
        store.load(key, value)
    rss = rss_bytes() - before
    tracemalloc.start()
    copy: Store[Any] = Store(factory, parse)
    for key, value in records:
        copy.load(key, value)
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    n = len(records)
    assert len(store.entities) == len(copy.entities) == n
    return {"entities": n, "serialized_bytes": sum(len(k) + len(v) for k, v in records) / n,
            "tracemalloc_bytes": traced / n, "rss_bytes": rss / n}


def grow_customer(times: np.ndarray, amounts: np.ndarray, ids: np.ndarray) -> CustomerWindows:
    """A customer's state built event by event, as a running worker grows it."""
    state = CustomerWindows()
    for eid, t, amount in zip(ids.tolist(), times.tolist(), amounts.tolist(), strict=True):
        state.update(eid, t, amount)
    return state


def grow_terminal(times: np.ndarray, ids: np.ndarray, frauds: int) -> TerminalWindows:
    """A terminal's state built event by event, its last ``frauds`` events then labelled."""
    state = TerminalWindows()
    for eid, t in zip(ids.tolist(), times.tolist(), strict=True):
        state.update(eid, t)
    for eid, t in zip(ids[len(ids) - frauds:].tolist(), times[len(ids) - frauds:].tolist(), strict=True):
        state.label(eid, t)
    return state


def traced_per_entity(build: Callable[[int], Any], n: int) -> dict[str, Any]:
    """tracemalloc bytes per entity of a store (key -> state) of ``build(i)`` for i < n."""
    tracemalloc.start()
    store = {str(i): build(i) for i in range(n)}
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"entities": len(store), "tracemalloc_bytes": traced / n}


def memory_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One kind of entity, in a fresh process so that RSS growth is its store's alone."""
    held, seed, now, g = spec["held"], spec["seed"], spec["held"]["now_ms"][0], spec["grown"]
    customers, terminals, frauds = sample(held, spec["customers"], spec["terminals"], seed)
    rng = np.random.default_rng(seed + 2)
    if spec["entity"] == "customer":
        records = list(customer_records(customers, now, seed))
        restored = measure_store(records, CustomerWindows, CustomerWindows.from_bytes)
        drawn = list(events(customers[:g], rng, now, CustomerWindows.HORIZON_MS))  # drawn before tracing starts
        grown = traced_per_entity(lambda i: grow_customer(*drawn[i]), len(drawn))
        return {"restored": {**restored, "mean_events": float(customers.mean())}, "grown": grown}
    records = list(terminal_records(terminals, frauds, now, seed))
    restored = measure_store(records, TerminalWindows, TerminalWindows.from_bytes)
    drawn = list(events(terminals[:g], rng, now, TERMINAL_HORIZON_MS))
    grown = traced_per_entity(lambda i: grow_terminal(drawn[i][0], drawn[i][2], int(frauds[i])), len(drawn))
    return {"restored": {**restored, "mean_events": float(terminals.mean()), "mean_frauds": float(frauds.mean())},
            "grown": grown}


# -- restore (in a child process) ------------------------------------------------------------
def restore_child(spec: dict[str, Any]) -> dict[str, Any]:
    """``Restorer.restore`` of every partition of the topic into its own Store, as the worker's sync does."""
    from pipeline.worker.state import Restorer

    settings = KafkaSettings.build(environ={}, overrides={"bootstrap_servers": spec["bootstrap"]})
    restorer = Restorer(settings, "state-bench", settings.client_options())
    gc.collect()
    before = rss_bytes()
    stores, per_partition = [], []
    started = time.perf_counter()
    for partition in range(spec["partitions"]):
        store: Store[CustomerWindows] = Store(CustomerWindows, CustomerWindows.from_bytes)
        t0 = time.perf_counter()
        count = restorer.restore(spec["topic"], partition, store, threading.Event())
        per_partition.append({"partition": partition, "records": count, "seconds": time.perf_counter() - t0})
        stores.append(store)
    seconds = time.perf_counter() - started
    restorer.close()
    return {"records": sum(p["records"] for p in per_partition), "entities": sum(len(s.entities) for s in stores),
            "seconds": seconds, "per_partition": per_partition, "rss_before_mib": before / 2**20,
            "rss_growth_mib": (rss_bytes() - before) / 2**20, "peak_rss_mib": rss_bytes("VmHWM") / 2**20}


# -- the state a worker holds after a history ------------------------------------------------
def stores_after(history: pd.DataFrame) -> tuple[dict[str, CustomerWindows], dict[str, TerminalWindows]]:
    """Customer and terminal states (by key) of a worker that has read ``history`` raw, every fraud labelled.

    Ids, keys and amounts as the worker sees them on the wire (``event_id`` of the transaction id,
    ``str`` of the entity ids, float32 amounts as their shortest decimal). Labelling every fraud
    at once gives the terminal windows what the offline table assumes known (their windows end
    ``delay`` days back, whose labels a bank knows by then).
    """
    from pipeline.streamfeatures import event_id
    from producer.tables import float32_as_decimal

    customers: dict[str, CustomerWindows] = {}
    terminals: dict[str, TerminalWindows] = {}
    times = history["TX_DATETIME"].to_numpy().astype("datetime64[ms]").astype(np.int64).tolist()
    amounts = float32_as_decimal(history["TX_AMOUNT"].to_numpy(np.float32)).tolist()
    for tx_id, c, k, t, amount, fraud in zip(history["TRANSACTION_ID"].astype(str).tolist(),
                                             history["CUSTOMER_ID"].astype(str).tolist(),
                                             history["TERMINAL_ID"].astype(str).tolist(), times, amounts,
                                             history["TX_FRAUD"].tolist(), strict=True):
        eid = event_id(tx_id)
        (customers.get(c) or customers.setdefault(c, CustomerWindows())).update(eid, t, amount)
        terminal = terminals.get(k) or terminals.setdefault(k, TerminalWindows())
        terminal.update(eid, t)
        if fraud:
            terminal.label(eid, t)
    return customers, terminals
