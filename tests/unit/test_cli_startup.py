"""Every command line answers ``--help`` and a bad flag without loading a heavy library.

Parsing needs none of them: PyTorch, scikit-learn, pandas or kafka-python load only once a
command has good arguments and work to do. Checked in a fresh interpreter with
``python -X importtime``, which lists every module imported; the wall times are measured by
``bench/cli_startup.py``, not asserted here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.cli_startup import BAD_FLAG, REPO, commands, imported_packages, run_once

# NumPy (~0.1 s) is allowed: the shared contract modules may need it.
HEAVY = {"torch", "sklearn", "scipy", "matplotlib", "pandas", "pyarrow", "kafka"}
COMMANDS = commands()


def test_every_console_script_and_subcommand_is_covered() -> None:
    assert {"fraud-worker", "fraud-train", "fraud-produce"} <= set(COMMANDS)
    assert {"fraud-train fit", "fraud-train evaluate", "fraud-train score", "fraud-produce simulate",
            "fraud-produce replay", "python -m deploy.kafka", "python -m deploy.demo"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_loads_no_heavy_library(name: str) -> None:
    done, _ = run_once([*COMMANDS[name], "--help"], "-X", "importtime")
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
    assert not imported_packages(done.stderr) & HEAVY


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_flag_is_refused_without_loading_a_heavy_library(name: str) -> None:
    done, _ = run_once([*COMMANDS[name], BAD_FLAG], "-X", "importtime")
    assert done.returncode == 2 and "error" in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not imported_packages(done.stderr) & HEAVY


def test_a_retrain_range_that_cannot_work_is_refused_without_loading_a_heavy_library() -> None:
    """retrain's date checks come after parsing, in the flag checks: they too answer before pandas loads (they
    loaded it once, through the module that reads the topics: 1.2 s against fit's 0.06 s)."""
    done, _ = run_once([*COMMANDS["fraud-train retrain"], "--since", "2018-05-09", "--until", "2018-05-01"],
                       "-X", "importtime")
    assert done.returncode == 2 and "must be before --until" in done.stderr, done.stderr[-2000:]
    assert not imported_packages(done.stderr) & HEAVY


SCRIPTS = ("fraud-train", "fraud-produce", "fraud-worker")
# A misuse each command finds after parsing its flags (settings, files), where each had its own printing.
LATE_MISUSE = {"fraud-train": ["score", "--data", "missing.csv", "--output", "s.csv"],
               "fraud-produce": ["replay", "missing.csv"],
               "fraud-worker": ["--max-batch", "0"]}


def _run(name: str, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """``name`` as its console script runs, with no FRAUD_* variable but ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    return subprocess.run([sys.executable, *COMMANDS[name], *argv], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("misuse", ["bad flag", "late"])
def test_every_command_says_an_error_in_the_same_shape(name: str, misuse: str) -> None:
    """``PROG: error: MESSAGE``, one line, exit 2 (fraud-train and fraud-worker's own errors said ``error: ...``)."""
    done = _run(name, [BAD_FLAG] if misuse == "bad flag" else LATE_MISUSE[name])
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"{name}: error: ") and done.stderr.count("\n") == 1, done.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_misspelled_variable_is_one_warning_line_naming_the_setting_meant(name: str) -> None:
    """fraud-produce said it without the WARNING level the others show (its logging started after the settings)."""
    done = _run(name, LATE_MISUSE[name], FRAUD_BOOTSTRAP_SERVER="k:1")
    warning, error = done.stderr.splitlines()
    assert "WARNING" in warning and "FRAUD_BOOTSTRAP_SERVER is not a setting" in warning, done.stderr
    assert "did you mean FRAUD_BOOTSTRAP_SERVERS?" in warning and error.startswith(f"{name}: error: ")


@pytest.mark.parametrize("servers", ["localhost:90x2", ":9092", "host:99999", "", "[::1"])
def test_a_malformed_bootstrap_address_stops_every_kafka_command_at_once_with_one_message(servers: str) -> None:
    """One check (pipeline.config.check_bootstrap): the worker tried "[::1" for its 30 s connect timeout."""
    said = set()
    for name, argv in (("fraud-produce", ["simulate"]), ("fraud-worker", ["--metrics-port", "0"])):
        started = time.monotonic()
        done = _run(name, [*argv, "--bootstrap-servers", servers])
        assert done.returncode == 2 and time.monotonic() - started < 10, done.stderr
        assert done.stderr.startswith(f"{name}: error: ") and done.stderr.count("\n") == 1, done.stderr
        said.add(done.stderr.split(": error: ", 1)[1])
    assert len(said) == 1, said
