"""The benchmark's markdown tables, from the results the harness collected."""

from __future__ import annotations

from typing import Any


def _ratio(value: float, reference: float | None, digits: int = 2) -> str:
    return f"{value / reference:.{digits}f}" if reference else "–"


def _flight(run: dict[str, Any]) -> str:
    """The run's --max-in-flight, when it was set (runs without it used the worker's default), its
    Kafka client when it is not kafka-python and its device when it is not the CPU."""
    client, device = run.get("client", "kafka-python"), run.get("device", "cpu")
    flight = f", max_in_flight={run['in_flight']}" if run.get("in_flight") and run.get("mode") != "exactly-once" else ""
    return (flight + (f", **{client}**" if client != "kafka-python" else "")
            + (f", **{device}**" if device != "cpu" else ""))


def throughput_table(r: dict[str, Any]) -> list[str]:
    ceiling = r["ceiling"]["tx_s"] if "ceiling" in r else None
    naive = r["naive"]["tx_s"] if "naive" in r else None
    lines = ["| measurement | records | seconds | tx/s | / ceiling | / naive |", "|---|---:|---:|---:|---:|---:|"]
    if ceiling:
        lines.append(f"| ceiling: bare KafkaConsumer, fetch + decode | {r['ceiling']['records']:,} | "
                     f"{r['ceiling']['seconds']:.1f} | {ceiling:,.0f} | 1.00 | {_ratio(ceiling, naive, 1)} |")
    other = r.get("ceiling_confluent", {})
    if "tx_s" in other:
        lines.append(f"| the same through {other['client']} | {other['records']:,} | {other['seconds']:.1f} | "
                     f"{other['tx_s']:,.0f} | {_ratio(other['tx_s'], ceiling)} | {_ratio(other['tx_s'], naive, 1)} |")
    for w in r.get("worker", []):
        for label, secs, rate in (("process start", w["seconds_from_start"], w["tx_s"]),
                                  ("partition assignment", w["seconds_from_assignment"], w["tx_s_from_assignment"])):
            lines.append(f"| worker {w.get('mode', 'at-least-once')}, max_batch={w['max_batch']}{_flight(w)}, "
                         f"{label} → last commit | {w['records']:,} | "
                         f"{secs:.1f} | {rate:,.0f} | {_ratio(rate, ceiling)} | {_ratio(rate, naive, 1)} |")
    if naive:
        n = r["naive"]
        lines.append(f"| naive per-message consumer (first {n['records']:,} records only, {n['commit']}) | "
                     f"{n['records']:,} | {n['seconds']:.1f} | {naive:,.0f} | {_ratio(naive, ceiling, 3)} | 1.0 |")
    return lines


def latency_table(r: dict[str, Any]) -> list[str]:
    lines = ["| mode | input rate target | achieved | sent | p50 (histogram) | p99 (histogram) | "
             "p50 (alerts) | p99 (alerts) | p99 (alerts after the first second) | alerts |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lat in r.get("latency", []):
        h, a = lat["histogram"], lat["alerts"]
        lines.append(f"| {lat.get('mode', 'at-least-once')}{_flight(lat)} | {lat['target_tx_s']:,.0f} | "
                     f"{lat['achieved_tx_s']:,.0f} | {lat['sent']:,} | "
                     f"{1000 * h['p50']:.0f} ms | {1000 * h['p99']:.0f} ms | {1000 * a.get('p50', float('nan')):.0f} ms"
                     f" | {1000 * a.get('p99', float('nan')):.0f} ms"
                     f" | {1000 * a.get('p99_after_1s', float('nan')):.0f} ms | {a['count']} |")
    for floor in r.get("floor", []):
        f = floor["consumer_only"]
        lines.append(f"| floor: a bare {floor['client']} consumer, receive - event time | "
                     f"{floor['target_tx_s']:,.0f} | {floor['achieved_tx_s']:,.0f} | {floor['sent']:,} | "
                     f"{1000 * f['p50']:.0f} ms | {1000 * f['p99']:.0f} ms | | | | |")
    return lines


def scoring_table(r: dict[str, Any]) -> list[str]:
    lines = ["| score batch | engine | device | threads | ms/batch | tx/s |", "|---:|---|---|---:|---:|---:|"]
    return lines + [f"| {s['batch']:,} | {s.get('engine', 'torch')} | {s['device']} | "
                    f"{s.get('threads', s.get('torch_threads'))} | {s['ms_per_batch']:.2f} | {s['tx_s']:,.0f} |"
                    for s in r.get("scoring", [])]


def processes_table(r: dict[str, Any]) -> list[str]:
    runs = r.get("processes", [])
    single = next((p["tx_s_from_assignment"] for p in runs if p["processes"] == 1), None)
    lines = ["| `fraud-worker --processes` | records | first assignment → last commit | tx/s | / 1 process | "
             "process start → last commit | assignments logged | peak RSS, all processes |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    return lines + [f"| {p['processes']} | {p['records']:,} | {p['seconds_from_assignment']:.1f} s | "
                    f"{p['tx_s_from_assignment']:,.0f} | {_ratio(p['tx_s_from_assignment'], single)} | "
                    f"{p['seconds_from_start']:.1f} s | {p['assignments']} | {p['tree_peak_rss_mib']:.0f} MiB |"
                    for p in runs]


def ready_line(r: dict[str, Any]) -> str:
    """Worker time to ready, per worker run: process start to settings parsed, model served, partitions."""
    parts = []
    for w in r.get("worker", []):
        ready = w.get("ready", {})
        steps = ", ".join(f"{name.removesuffix('_s').replace('_', ' ')} {s:.2f} s" for name, s in ready.items())
        parts.append(f"{w.get('mode', 'at-least-once')} max_batch={w['max_batch']}{_flight(w)}: {steps}")
    return "Worker time to ready (from process start): " + "; ".join(parts) + "."


def table(r: dict[str, Any]) -> str:
    """Every table of a benchmark run, markdown."""
    lines = throughput_table(r)
    if r.get("latency"):
        lines += ["", *latency_table(r)]
    if r.get("scoring"):
        lines += ["", *scoring_table(r)]
    if r.get("processes"):
        lines += ["", *processes_table(r)]
    if r.get("worker"):
        rss = ", ".join(f"{w.get('mode', 'at-least-once')} max_batch={w['max_batch']}{_flight(w)}: "
                        f"{w['peak_rss_mib']:.0f} MiB"
                        for w in r["worker"])
        lines += ["", f"Worker peak RSS (/proc VmHWM): {rss}.", "", ready_line(r)]
    dropped = sum(run.get("dropped_starts", 0) for key in ("worker", "latency", "processes") for run in r.get(key, []))
    if dropped:
        lines += ["", f"Worker starts made again because kafka-python dropped their assignment: {dropped} "
                      "(bench.worker.process.run_to_end)."]
    return "\n".join(lines)
