"""``fraud-train``: fit, evaluate and score with the autoencoder the worker serves.

Errors the user can fix print one ``error: ...`` line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.config import TrainerSettings
from pipeline.errors import FraudPipelineError
from pipeline.models import DEFAULT_MODEL, MODELS
from trainer import commands
from trainer.calibrate import DEFAULT_ALERT_RATE
from trainer.data import LayoutFlags

EXIT_USAGE = 2
MODEL_HELP = "model version folder or model root [env FRAUD_MODEL_DIR; default models]"


def _csv(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of column names")
    return names


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from err


def _log_features(value: str) -> str | tuple[str, ...]:
    return value if value == "layout" else _csv(value)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input table")
    group.add_argument("--data", required=True, type=Path, help="CSV (optionally .gz) or Parquet file")
    group.add_argument("--layout", help="handbook or creditcard; default: detected from the columns")
    group.add_argument("--features", type=_csv, help="generic table: comma-separated numeric feature columns")
    group.add_argument("--label-column", help="0/1 fraud label column (generic tables)")
    group.add_argument("--time-column", help="event time column; without one, row order is time order")
    group.add_argument("--time-unit", choices=("s", "ms"), help="unit of a numeric time column")
    group.add_argument("--id-column", help="transaction id column, copied into score output")
    group.add_argument("--customer-column", help="customer/card id column, for card precision@100 per day")
    group.add_argument("--log-features", nargs="?", const="layout", type=_log_features, metavar="COLS",
                       help="signed log1p before standardising: alone, the layout's heavy-tailed columns; "
                            "or a comma-separated list (default: none)")


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path,
                        help="model root: a new version folder goes here [env FRAUD_MODEL_DIR; default models]")
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=tuple(MODELS),
                        help="model type (default %(default)s)")
    parser.add_argument("--hidden", type=_ints, help="encoder layer widths, e.g. 64,32 (decoder mirrors them)")
    parser.add_argument("--bottleneck", type=int, help="code size")
    parser.add_argument("--epochs", type=int, default=30, help="most epochs (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=512, help="mini-batch rows (default %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam step size (default %(default)s)")
    parser.add_argument("--patience", type=int, default=4, help="early-stopping patience in epochs")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation, shuffling and noise")
    parser.add_argument("--alert-rate", type=float, default=DEFAULT_ALERT_RATE,
                        help="share of normal validation rows above the threshold (default %(default)s)")
    parser.add_argument("--start", help="drop rows before this date (feature warm-up), YYYY-MM-DD")
    parser.add_argument("--val-start", help="validation starts at this date (with --test-start)")
    parser.add_argument("--test-start", help="test starts at this date (with --val-start)")
    parser.add_argument("--end", help="drop rows from this date on")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="without dates: validation share of rows")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="without dates: test share of rows")
    parser.add_argument("--no-baselines", action="store_true", help="skip Isolation Forest and PCA in the report")
    parser.add_argument("--no-publish", action="store_true", help="do not switch the root's `current` link")


def build_parser() -> argparse.ArgumentParser:
    """The ``fraud-train`` argument parser with its fit, evaluate and score subcommands."""
    parser = argparse.ArgumentParser(prog="fraud-train", description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="auto (CUDA when present), cpu, cuda or cuda:N [env FRAUD_DEVICE; "
                                         "default auto]")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train a new model version, calibrate it, export it, publish it")
    _data_arguments(fit)
    _fit_arguments(fit)
    evaluate = sub.add_parser("evaluate", help="metrics and plots of a model on a labelled table")
    evaluate.add_argument("--model", type=Path, help=MODEL_HELP)
    evaluate.add_argument("--report", type=Path, help="report folder (default: evaluation-<version> here)")
    evaluate.add_argument("--start", help="only rows from this date on, YYYY-MM-DD")
    evaluate.add_argument("--end", help="only rows before this date")
    _data_arguments(evaluate)
    score = sub.add_parser("score", help="score a table; write scores, flags and top features")
    score.add_argument("--model", type=Path, help=MODEL_HELP)
    score.add_argument("--output", required=True, type=Path, help="output .csv or .parquet")
    score.add_argument("--top-features", type=int, default=3, help="features listed per flagged row")
    _data_arguments(score)
    return parser


def layout_flags(args: argparse.Namespace) -> LayoutFlags:
    """The layout-related flags of parsed arguments."""
    return LayoutFlags(args.layout, args.features, args.label_column, args.time_column, args.id_column,
                       args.customer_column, args.time_unit, args.log_features)


def apply_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the model root and device that no flag gave from the shared settings (FRAUD_* env);
    the settings validate the device, whether it came from the flag or the environment."""
    settings = TrainerSettings.build(args)
    if args.command == "fit" and args.output is None:
        args.output = Path(settings.model_dir)
    if args.command in {"evaluate", "score"} and args.model is None:
        args.model = Path(settings.model_dir)
    args.device = settings.device
    return args


def run(argv: Sequence[str] | None = None) -> int:
    """Parse argv, run the subcommand, and return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    handlers = {"fit": commands.fit, "evaluate": commands.evaluate, "score": commands.score}
    try:
        apply_settings(args)
        return handlers[args.command](args, layout_flags(args))
    except FraudPipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, OSError) as err:  # e.g. an impossible hyperparameter, an unwritable output
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
