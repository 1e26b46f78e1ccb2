"""``fraud-train``: fit, evaluate and score with the autoencoder the worker serves.

Errors the user can fix print one ``fraud-train: error: ...`` line on stderr and exit with status 2. Flags
are parsed and checked with the standard library only; torch, scikit-learn and pandas are
imported by the subcommand that runs, so ``--help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from pipeline.cliargs import OneLineParser, print_error
from pipeline.config import KafkaSettings, TrainerSettings
from pipeline.errors import ConfigError, FraudPipelineError
from pipeline.features import LAYOUTS
from trainer import options as opt

PROG = "fraud-train"
EXIT_USAGE = 2
MODEL_HELP = "model version folder or model root [env FRAUD_MODEL_DIR; default models]"


def _version() -> str:
    try:
        return metadata.version("fraud-pipeline")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        from pipeline import __version__

        return __version__


def _common_arguments(parser: argparse.ArgumentParser, top: bool) -> None:
    """--device and --quiet, accepted before and after the subcommand."""
    default = None if top else argparse.SUPPRESS  # a subcommand's absent flag keeps the top-level value
    parser.add_argument("--device", default=default, help="auto (CUDA when present), cpu, cuda or cuda:N "
                                                          "[env FRAUD_DEVICE; default auto]")
    parser.add_argument("--quiet", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="no progress bars, warnings only")


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input table")
    group.add_argument("--data", required=True, type=Path, help="CSV (optionally .gz) or Parquet file")
    group.add_argument("--layout", help=f"{' or '.join(LAYOUTS)}; default: detected from the columns, "
                                        "else a generic table")
    group.add_argument("--features", type=opt.names,
                       help="comma-separated numeric feature columns (default for a generic table: every "
                            "numeric column but the label, time, id and customer columns)")
    group.add_argument("--label-column", help="0/1 fraud label column (default for a generic table: one named "
                                              "label, class, y, is_fraud, fraud, target or outlier, if 0/1)")
    group.add_argument("--time-column", help="event time column; without one, row order is time order")
    group.add_argument("--time-unit", choices=("s", "ms"), help="unit of a numeric time column")
    group.add_argument("--id-column", help="transaction id column, copied into score output")
    group.add_argument("--customer-column", help="customer/card id column, for card precision@100 per day")
    group.add_argument("--log-features", nargs="?", const="layout", type=opt.log_features, metavar="COLS",
                       help="signed log1p before standardising: alone, the layout's heavy-tailed columns; "
                            "or a comma-separated list (default: none)")


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", type=Path,
                        help="model root: a new version folder goes here [env FRAUD_MODEL_DIR; default models]")
    parser.add_argument("--model", default=opt.DEFAULT_MODEL, choices=opt.MODEL_CHOICES,
                        help="model type (default %(default)s)")
    parser.add_argument("--score", default="auto", choices=(*opt.SCORE_CHOICES, *opt.LABEL_SCORES),
                        help="reconstruction: the reconstruction error; hybrid: plus the distance to the 5 "
                             "nearest normal training rows; auto (default): the one with the higher average "
                             "precision on labelled validation rows, else hybrid. With labels, the fraud "
                             "probability of a classifier trained on the labelled rows: finetuned (the trained "
                             "encoder with a classification head) or stacked (a network over the features and "
                             "their reconstruction residuals)")
    parser.add_argument("--label-delay-days", type=opt.non_negative_int,
                        help="finetuned/stacked: labels become known this many days after a transaction; rows "
                             "within it before the end of training (the test start, else the last row) count "
                             f"as unlabelled (default {opt.DEFAULT_LABEL_DELAY_DAYS})")
    parser.add_argument("--input", dest="input_form", default="features", choices=("features", "raw"),
                        help="what the worker's input records carry: features (the model's features, as "
                             "today) or raw (transaction_id, event_time, CUSTOMER_ID, TERMINAL_ID, TX_AMOUNT; "
                             "the worker computes the handbook features in the stream); raw needs the "
                             "handbook layout (default %(default)s)")
    parser.add_argument("--bank-rows", type=opt.positive_int, default=opt.BANK_ROWS,
                        help="hybrid: most normal rows kept for the distance; serving cost grows with it "
                             "(default %(default)s)")
    parser.add_argument("--hidden", type=opt.widths, help="encoder layer widths, e.g. 64,32 (decoder mirrors them)")
    parser.add_argument("--bottleneck", type=opt.positive_int,
                        help="code size, below the feature count (default: derived from the feature count)")
    parser.add_argument("--epochs", type=opt.positive_int,
                        help="most epochs (default: 30, more on small tables, up to 6000 mini-batch steps)")
    parser.add_argument("--batch-size", type=opt.positive_int,
                        help="mini-batch rows (default: 512, a sixteenth of a small table, at least 32)")
    parser.add_argument("--learning-rate", type=opt.positive_float, default=1e-3,
                        help="Adam step size (default %(default)s)")
    parser.add_argument("--patience", type=opt.positive_int,
                        help="early stopping: epochs without a validation improvement (default: 4, or about "
                             "300 mini-batch steps on small tables)")
    parser.add_argument("--seed", type=opt.non_negative_int, default=0,
                        help="seed for initialisation, shuffling and noise")
    parser.add_argument("--alert-rate", type=opt.unit_rate, default=opt.DEFAULT_ALERT_RATE,
                        help="share of normal validation rows above the threshold (default %(default)s)")
    parser.add_argument("--start", type=opt.date, help="drop rows before this date (feature warm-up), YYYY-MM-DD")
    parser.add_argument("--val-start", type=opt.date, help="validation starts at this date (with --test-start)")
    parser.add_argument("--test-start", type=opt.date, help="test starts at this date (with --val-start)")
    parser.add_argument("--end", type=opt.date, help="drop rows from this date on")
    parser.add_argument("--val-fraction", type=opt.fraction, default=0.15,
                        help="without dates: validation share of rows (default %(default)s)")
    parser.add_argument("--test-fraction", type=opt.fraction,
                        help=f"without dates: test share of rows (default {opt.DEFAULT_TEST_FRACTION} on a "
                             "labelled table, 0 on an unlabelled one)")
    parser.add_argument("--no-baselines", action="store_true", help="skip Isolation Forest and PCA in the report")
    parser.add_argument("--no-publish", action="store_true", help="do not switch the root's `current` link")
    parser.add_argument("--challenger", action="store_true",
                        help="publish as the root's `challenger`: workers score it beside the current version "
                             "(online quality for both, alerts from the current one); `promote` serves it")


def _retrain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="model root whose current version is retrained; the new one "
                                                   "becomes its challenger [env FRAUD_MODEL_DIR; default models]")
    parser.add_argument("--since", type=opt.date, required=True, help="first day of the table, YYYY-MM-DD (UTC)")
    parser.add_argument("--until", type=opt.date, required=True,
                        help="the day after the table's last, YYYY-MM-DD; the labels of every transaction before it "
                             "must be due (its time plus the label delay at most the newest published one)")
    parser.add_argument("--test-days", type=opt.positive_int, default=7,
                        help="the newest days of the range, on which the new and the current version are compared "
                             "(default %(default)s; validation is the last fifth of the days before them)")
    parser.add_argument("--label-delay-days", type=opt.non_negative_int,
                        help="labels arrive this many days after their transaction (default: the current version's "
                             "feature delay for raw input, else 7)")
    parser.add_argument("--epochs", type=opt.positive_int, help="most epochs (default as fit's)")
    parser.add_argument("--seed", type=opt.non_negative_int, default=0, help="seed (default %(default)s)")
    KafkaSettings.add_arguments(parser)  # the features and labels topics are read


def build_parser() -> argparse.ArgumentParser:
    """The ``fraud-train`` argument parser with its fit, evaluate and score subcommands."""
    parser = OneLineParser(prog="fraud-train", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _common_arguments(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,evaluate,score,promote,retrain}")
    fit = sub.add_parser("fit", help="train a new model version, calibrate it, export it, publish it")
    _data_arguments(fit)
    _fit_arguments(fit)
    evaluate = sub.add_parser("evaluate", help="metrics and plots of a model on a labelled table")
    evaluate.add_argument("--model", type=Path, help=MODEL_HELP)
    evaluate.add_argument("--report", type=Path, help="report folder (default: evaluation-<version> here)")
    evaluate.add_argument("--start", type=opt.date, help="only rows from this date on, YYYY-MM-DD")
    evaluate.add_argument("--end", type=opt.date, help="only rows before this date")
    _data_arguments(evaluate)
    score = sub.add_parser("score", help="score a table; write scores, flags and top features")
    score.add_argument("--model", type=Path, help=MODEL_HELP)
    score.add_argument("--output", required=True, type=Path, help="output .csv or .parquet")
    score.add_argument("--top-features", type=opt.non_negative_int, default=3, help="features listed per flagged row")
    _data_arguments(score)
    promote = sub.add_parser("promote", help="serve the model root's challenger: move `current` to it")
    promote.add_argument("--model", type=Path, help="model root (default: FRAUD_MODEL_DIR or models)")
    retrain = sub.add_parser("retrain", help="fit a new version on what the workers published and the labels, "
                                             "compare it with the current one, publish it as the challenger")
    _retrain_arguments(retrain)
    for subparser in (fit, evaluate, score, promote, retrain):
        _common_arguments(subparser, top=False)
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Cross-flag checks that need no data; ConfigError says which flags disagree."""
    if args.command == "promote":
        return
    if args.command == "retrain":
        opt.split_days(args.since, args.until, args.test_days)
        args.kafka = KafkaSettings.build(args)
        if not args.kafka.features_topic:
            raise ConfigError("retrain reads the features topic the workers publish to: set --features-topic or "
                              "FRAUD_FEATURES_TOPIC (the workers publish every scored transaction there only "
                              "when it is set)")
        return
    if args.layout is not None and args.layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {args.layout!r}; known: {', '.join(LAYOUTS)}, or pass --features")
    if args.command == "fit":
        if args.challenger and args.no_publish:
            raise ConfigError("--challenger publishes the version as the challenger; --no-publish publishes nothing: "
                              "pass one of them")
        opt.check_dates(args.start, args.val_start, args.test_start, args.end)
        if args.label_delay_days is not None and args.score not in opt.LABEL_SCORES:
            raise ConfigError(f"--label-delay-days applies to --score {' or '.join(opt.LABEL_SCORES)} only, "
                              f"not to --score {args.score}")
        if args.val_start is None:
            opt.check_fractions(args.val_fraction, args.test_fraction)
    elif args.command == "evaluate":
        opt.check_dates(args.start, None, None, args.end)
    features, logged = args.features, args.log_features
    if features and isinstance(logged, tuple) and not set(logged) <= set(features):
        unknown = next(n for n in logged if n not in features)
        raise ConfigError(f"--log-features column {unknown!r} is not one of the features")


def check_table(args: argparse.Namespace) -> None:
    """Once the flags are good: the table must be there, said before PyTorch and pandas load (a missing file
    took 9-13 s to be said)."""
    data = getattr(args, "data", None)
    if data is not None and not Path(data).is_file():
        raise ConfigError(f"{data}: no such file" + (" (a folder)" if Path(data).is_dir() else ""))


def apply_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the model root and device that no flag gave from the shared settings (FRAUD_* env);
    the settings validate the device, whether it came from the flag or the environment."""
    settings = TrainerSettings.build(args)
    if args.command == "fit" and args.output is None:
        args.output = Path(settings.model_dir)
    if args.command in {"evaluate", "score", "promote", "retrain"} and args.model is None:
        args.model = Path(settings.model_dir)
    args.device = settings.device
    return args


def _dispatch(args: argparse.Namespace) -> int:
    from trainer import commands  # torch, scikit-learn and pandas: only once the flags are known to be good

    handlers = {"fit": commands.fit, "evaluate": commands.evaluate, "score": commands.score,
                "promote": commands.promote, "retrain": commands.retrain}
    flags = commands.layout_flags(args) if args.command not in {"promote", "retrain"} else None
    return handlers[args.command](args, flags)  # type: ignore[operator]


def run(argv: Sequence[str] | None = None) -> int:
    """Parse argv, run the subcommand, and return the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version or a usage error (already printed)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        check_arguments(args)
        apply_settings(args)
        check_table(args)
        return _dispatch(args)
    except (FraudPipelineError, ValueError, OSError) as err:  # also an impossible hyperparameter, an unwritable output
        print_error(PROG, str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback through PyTorch
        print_error(PROG, f"interrupted; fraud-train {args.command} stopped"
                    + (" (models/current moves to a new version only as fit's last step)" if args.command == "fit"
                       else ""))
        return 130


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())
