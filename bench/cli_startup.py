"""Start-up of every command line: wall time of ``--help`` and of a bad flag, and what each imports.

    python bench/cli_startup.py [--runs 5] [--json runs/bench/cli-startup.json]

Each command runs ``--runs`` times in a fresh interpreter from the repository root (the console
scripts as their wrappers call them, from ``[project.scripts]`` in pyproject.toml); the table
gives the median and the fastest wall time. One more run under ``python -X importtime`` lists
the heavy libraries the command loaded: none is the goal, since parsing needs none of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "sklearn", "scipy", "matplotlib", "pandas", "pyarrow", "numpy", "kafka")
BAD_FLAG = "--no-such-flag"
SUBCOMMANDS = {"fraud-train": ("fit", "evaluate", "score", "promote", "retrain"),
               "fraud-produce": ("simulate", "replay")}
MODULES = ("deploy.kafka", "deploy.demo", "deploy.prometheus.render")
SCRIPTS = ("bench/worker_bench.py", "bench/gpu_scoring.py", "quality/adbench.py", "quality/quality.py",
           "quality/compare_simulator.py", "bench/cli_startup.py")


def console_scripts() -> dict[str, str]:
    """``[project.scripts]``: command name to ``module:function``."""
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def commands() -> dict[str, list[str]]:
    """Every command line of the project, by the name a user types: interpreter arguments that run it."""
    out: dict[str, list[str]] = {}
    for name, target in console_scripts().items():
        module, function = target.split(":")
        wrapper = f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; sys.exit({function}())"
        out[name] = ["-c", wrapper]
        for sub in SUBCOMMANDS.get(name, ()):
            out[f"{name} {sub}"] = ["-c", wrapper, sub]
    out.update({f"python -m {m}": ["-m", m] for m in MODULES})
    out.update({f"python {s}": [s] for s in SCRIPTS})
    return out


def run_once(argv: list[str], *flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *flags, *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    return done, time.perf_counter() - started


def imported_packages(importtime_stderr: str) -> set[str]:
    """Top-level packages named in ``python -X importtime`` output."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0]
            for line in importtime_stderr.splitlines() if line.startswith("import time:") and line.count("|") == 2}


def heavy_imports(argv: list[str]) -> list[str]:
    """The heavy top-level packages a run of ``argv`` imports."""
    done, _ = run_once(argv, "-X", "importtime")
    return sorted(imported_packages(done.stderr) & set(HEAVY))


def measure(argv: list[str], runs: int) -> dict[str, Any]:
    """Exit code, median and fastest wall time over ``runs`` runs, and the heavy imports."""
    seconds, codes = [], set()
    for _ in range(runs):
        done, elapsed = run_once(argv)
        seconds.append(elapsed)
        codes.add(done.returncode)
    return {"exit_codes": sorted(codes), "median_s": statistics.median(seconds), "min_s": min(seconds),
            "runs": runs, "heavy_imports": heavy_imports(argv)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="timed runs per command line (default %(default)s)")
    p.add_argument("--only", default=None, help="comma-separated command names (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wanted = set(args.only.split(",")) if args.only else None
    rows = []
    for name, base in commands().items():
        if wanted is None or name in wanted:
            rows.append({"command": name, "help": measure([*base, "--help"], args.runs),
                         "bad_flag": measure([*base, BAD_FLAG], args.runs)})
    print(f"| command | `--help` median (fastest) | `{BAD_FLAG}` median (fastest) | heavy imports |")
    print("|---|---:|---:|---|")
    for r in rows:
        h, b = r["help"], r["bad_flag"]
        heavy = sorted(set(h["heavy_imports"]) | set(b["heavy_imports"]))
        print(f"| {r['command']} | {h['median_s']:.2f} s ({h['min_s']:.2f}) | {b['median_s']:.2f} s "
              f"({b['min_s']:.2f}) | {', '.join(heavy) or 'none'} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"python": sys.version, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
