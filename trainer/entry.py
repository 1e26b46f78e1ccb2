"""``fraud-train``'s console entry point: says which extra to install when it is missing.

``pip install fraud-pipeline`` installs the worker and the producer only; ``fraud-train`` needs
the ``[train]`` extra (scikit-learn, matplotlib). Without it this prints how to get it, instead
of an import traceback.
"""

from __future__ import annotations

import importlib.util
import sys

from pipeline.cliargs import print_error

TRAIN_EXTRA = {"sklearn", "scipy", "matplotlib"}  # import names of the [train] extra and its SciPy
EXIT_USAGE = 2


def missing_extra() -> str | None:
    """The first package of the ``[train]`` extra that cannot be imported, without importing any."""
    for name in ("sklearn", "matplotlib"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):  # blocked (None in sys.modules) or broken
            return name
    return None


def main() -> None:
    """Run ``trainer.cli``, or explain the missing ``[train]`` extra (``--help`` and ``--version`` need none)."""
    missing = missing_extra()
    if missing and not {"-h", "--help", "--version"} & set(sys.argv[1:]):
        print_error("fraud-train", f"the [train] extra is not installed ({missing} is missing): "
                    "pip install 'fraud-pipeline[train]'")
        sys.exit(EXIT_USAGE)
    try:
        from trainer import cli

        cli.main()  # the extra's packages load in the subcommand, after the arguments are parsed
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        print_error("fraud-train", f"the [train] extra is not installed ({err.name} is missing): "
                    "pip install 'fraud-pipeline[train]'")
        sys.exit(EXIT_USAGE)
