"""Every command line answers ``--help`` and a bad flag without loading a heavy library.

Parsing needs none of them: PyTorch, scikit-learn, pandas or kafka-python load only once a
command has good arguments and work to do. Checked in a fresh interpreter with
``python -X importtime``, which lists every module imported; the wall times are measured by
``bench/cli_startup.py``, not asserted here.
"""

from __future__ import annotations

import pytest

from bench.cli_startup import BAD_FLAG, commands, imported_packages, run_once

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
