"""``fraud-train``'s console entry point: says which extra to install when it is missing.

``pip install fraud-pipeline`` installs the worker and the producer only; ``fraud-train`` needs
the ``[train]`` extra (scikit-learn, matplotlib). Without it this prints how to get it, instead
of an import traceback.
"""

from __future__ import annotations

import sys

TRAIN_EXTRA = {"sklearn", "scipy", "matplotlib"}  # import names of the [train] extra and its SciPy
EXIT_USAGE = 2


def main() -> None:
    """Run ``trainer.cli``, or explain the missing ``[train]`` extra."""
    try:
        from trainer import cli

        cli.main()  # the extra's packages load in the subcommand, after the arguments are parsed
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in TRAIN_EXTRA:
            raise
        print(f"error: fraud-train needs the [train] extra ({err.name} is missing): "
              "pip install 'fraud-pipeline[train]'", file=sys.stderr)
        sys.exit(EXIT_USAGE)
