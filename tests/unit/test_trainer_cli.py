"""``fraud-train``'s command line: fast help and version, flags checked before any I/O, generic tables."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.artifact import load_artifact
from pipeline.models import MODELS
from trainer import hybrid
from trainer.cli import build_parser, run
from trainer.options import BANK_ROWS, MODEL_CHOICES, SCORE_CHOICES

HEAVY = ("torch", "sklearn", "pandas")
FAST = ["--quiet", "--device", "cpu"]


def fail(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI expecting exit 2 and exactly one 'fraud-train: error:' line on stderr; returns it."""
    assert run(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("fraud-train: error: ") and "Traceback" not in err, err
    return err.strip()


def cli(*argv: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "trainer", *argv], capture_output=True, text=True, timeout=60)
    return done, time.perf_counter() - started


def test_help_and_usage_errors_import_no_heavy_library() -> None:
    code = ("import sys; from trainer.cli import run\n"
            "for argv in (['--help'], ['fit', '--help'], ['fit', '--data', 'x.csv', '--alert-rate', '2']):\n"
            "    assert run(argv) in (0, 2)\n"
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_version_prints_the_package_version() -> None:
    done, _ = cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"fraud-train {metadata.version('fraud-pipeline')}"


def test_bad_flag_stops_before_reading_or_training(tmp_path: Path) -> None:
    data = tmp_path / "t.csv"
    pd.DataFrame({"a": np.arange(5000.0), "b": np.ones(5000)}).to_csv(data, index=False)
    done, seconds = cli("fit", "--data", str(data), "--output", str(tmp_path / "m"), "--alert-rate", "2")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        "fraud-train: error: argument --alert-rate: expected a number strictly between 0 and 1, got '2' "
        "(see fraud-train fit --help)"]
    assert not (tmp_path / "m").exists() and seconds < 5


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["fit", "--alert-rate", "0"], "argument --alert-rate: expected a number strictly between 0 and 1"),
        (["fit", "--alert-rate", "nan"], "argument --alert-rate"),
        (["fit", "--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
        (["fit", "--batch-size", "-5"], "argument --batch-size"),
        (["fit", "--learning-rate", "inf"], "argument --learning-rate: expected a number > 0"),
        (["fit", "--patience", "x"], "argument --patience"),
        (["fit", "--bottleneck", "0"], "argument --bottleneck"),
        (["fit", "--bank-rows", "0"], "argument --bank-rows"),
        (["fit", "--score", "vote"], "argument --score: invalid choice"),
        (["fit", "--hidden", "64,0"], "argument --hidden: expected comma-separated integers >= 1"),
        (["fit", "--seed", "-1"], "argument --seed"),
        (["fit", "--val-fraction", "1"], "argument --val-fraction: expected a fraction in [0, 1)"),
        (["fit", "--val-fraction", "0.5", "--test-fraction", "0.5"], "must sum below 1"),
        (["fit", "--val-fraction", "0"], "--val-fraction must be > 0"),
        (["fit", "--start", "May 1st"], "argument --start: expected a date such as 2018-05-01"),
        (["fit", "--val-start", "2018-06-01"], "give both --val-start and --test-start"),
        (["fit", "--val-start", "2018-07-01", "--test-start", "2018-06-01"], "--val-start 2018-07-01 must come "
                                                                             "before --test-start 2018-06-01"),
        (["fit", "--model", "gan"], "argument --model: invalid choice: 'gan'"),
        (["fit", "--layout", "martian"], "unknown layout 'martian'"),
        (["fit", "--features", "a,b", "--log-features", "c"], "--log-features column 'c' is not one of the features"),
        (["fit", "--device", "tpu"], "device='tpu': use auto, cpu, cuda or cuda:N"),
        (["fit", "--time-unit", "h"], "argument --time-unit: invalid choice"),
        (["score", "--output", "o.csv", "--top-features", "-1"], "argument --top-features"),
        (["evaluate", "--start", "2018-07-01", "--end", "2018-06-01"], "--start 2018-07-01 must come before --end"),
        (["fit", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["train"], "invalid choice: 'train'"),
    ],
)
def test_bad_flags_get_one_line_and_exit_2_before_any_io(argv: list[str], expected: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-table.csv"  # never opened: the flags are refused first
    extra = ["--data", str(missing)] if argv[0] in {"fit", "evaluate", "score"} else []
    out = ["--output", str(tmp_path / "m")] if argv[0] == "fit" else []
    assert expected in fail([*argv, *extra, *out], capsys)
    assert not (tmp_path / "m").exists()


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_alert_rate_is_accepted_exactly_inside_0_1(rate: float) -> None:
    parser = build_parser()
    argv = ["fit", "--data", "t.csv", "--alert-rate", repr(rate)]
    if 0 < rate < 1:
        assert parser.parse_args(argv).alert_rate == rate
    else:
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        assert stop.value.code == 2


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="0123456789-.,e x", max_size=8))
def test_integer_flags_refuse_anything_but_positive_integers(text: str) -> None:
    assume(text != "--")  # argparse drops a bare "--" value (its end-of-options marker) before any type check
    parser = build_parser()
    try:
        value = int(text)
    except ValueError:
        value = None
    argv = ["fit", "--data", "t.csv", f"--epochs={text}"]
    if value is not None and value >= 1:
        assert parser.parse_args(argv).epochs == value
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_and_device_work_before_or_after_the_subcommand(where: str) -> None:
    flags = ["--quiet", "--device", "cpu"]
    argv = [*flags, "fit", "--data", "t.csv"] if where == "before" else ["fit", "--data", "t.csv", *flags]
    args = build_parser().parse_args(argv)
    assert args.quiet is True and args.device == "cpu"
    plain = build_parser().parse_args(["score", "--data", "t.csv", "--output", "o.csv"])
    assert plain.quiet is False and plain.device is None


def test_choices_match_the_registries() -> None:
    assert set(MODEL_CHOICES) == set(MODELS)
    assert SCORE_CHOICES == hybrid.SCORE_CHOICES and BANK_ROWS == hybrid.BANK_ROWS


def _generic(n: int = 1200, seed: int = 3, labelled: bool = True) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f"x{i}": rng.normal(size=n) for i in range(5)})
    frame.insert(0, "id", np.arange(n))
    frame["note"] = "text"
    if labelled:
        frame["label"] = (rng.random(n) < 0.03).astype(int)
        frame.loc[frame["label"] == 1, "x0"] += 8
    return frame


def test_generic_table_needs_no_column_flags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _generic().to_csv(tmp_path / "g.csv", index=False)
    with caplog.at_level(logging.INFO):
        assert run(["--device", "cpu", "fit", "--data", str(tmp_path / "g.csv"), "--output", str(tmp_path / "m"),
                    "--epochs", "2", "--no-baselines"]) == 0
    artifact = load_artifact(tmp_path / "m")
    assert artifact.feature_names == ("x0", "x1", "x2", "x3", "x4")  # not id, note or label
    assert artifact.manifest["hyperparameters"]["bottleneck"] == 2  # derived from 5 features
    metrics = json.loads((artifact.path / "metrics.json").read_text())
    assert metrics["context"]["test_frauds"] > 0  # the label was found: a test report exists
    assert "label 'label'" in caplog.text


def test_unlabelled_table_keeps_every_row_for_training_and_validation(tmp_path: Path) -> None:
    _generic(labelled=False).to_csv(tmp_path / "u.csv", index=False)
    assert run([*FAST, "fit", "--data", str(tmp_path / "u.csv"), "--output", str(tmp_path / "m"),
                "--epochs", "2"]) == 0
    manifest = load_artifact(tmp_path / "m").manifest
    assert manifest["training_data"]["split"]["test_fraction"] == 0.0
    assert manifest["training_data"]["rows"] + manifest["metrics"]["validation"]["normal_rows"] == 1200


def test_a_bottleneck_that_does_not_compress_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _generic().to_csv(tmp_path / "g.csv", index=False)
    err = fail([*FAST, "fit", "--data", str(tmp_path / "g.csv"), "--output", str(tmp_path / "m"),
                "--bottleneck", "6"], capsys)
    assert "--bottleneck 6 must be below the number of features (5)" in err
    assert not (tmp_path / "m").exists()


def test_hitting_the_epoch_cap_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _generic().to_csv(tmp_path / "g.csv", index=False)
    with caplog.at_level(logging.WARNING):
        assert run([*FAST, "fit", "--data", str(tmp_path / "g.csv"), "--output", str(tmp_path / "m"),
                    "--epochs", "2", "--no-baselines"]) == 0
    assert "training stopped at the epoch cap (2) with the validation loss still improving" in caplog.text
    training = load_artifact(tmp_path / "m").manifest["metrics"]["training"]
    assert training["epoch_cap"] == 2 and training["stopped_early"] is False


@pytest.mark.parametrize("command", ["fit", "score"])
def test_ctrl_c_is_one_line_and_exit_130(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while training or scoring: one line, exit 130 (was a 23-85-line KeyboardInterrupt traceback)."""
    import trainer.cli

    def interrupted(_args: object) -> int:
        raise KeyboardInterrupt

    table = tmp_path / "t.csv"
    pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}).to_csv(table, index=False)
    monkeypatch.setattr(trainer.cli, "_dispatch", interrupted)
    argv = ["--quiet", command, "--data", str(table)] + (["--model", str(tmp_path), "--output", str(tmp_path / "s.csv")]
                                                         if command == "score" else [])
    assert run(argv) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("fraud-train: error: interrupted"), err


@pytest.mark.parametrize("command", ["fit", "evaluate", "score"])
def test_a_missing_table_is_said_before_any_heavy_library_loads(command: str, tmp_path: Path) -> None:
    """The table is looked for before PyTorch and pandas load (a missing file took 9-13 s to be said)."""
    extra = {"fit": ["--output", str(tmp_path / "m")], "evaluate": ["--model", str(tmp_path)],
             "score": ["--model", str(tmp_path), "--output", str(tmp_path / "s.csv")]}[command]
    argv = [command, "--data", str(tmp_path / "missing.csv"), *extra]
    code = ("import sys; from trainer.cli import run\n"
            f"rc = run({argv!r})\n"
            f"print(rc, sorted(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "2 []", (done.stdout, done.stderr)
    assert done.stderr.strip() == f"fraud-train: error: {tmp_path / 'missing.csv'}: no such file"


@pytest.mark.parametrize(("flag", "given", "meant"), [
    ("--label-column", "Label", "'label'"),  # was read as an unlabelled table, the label trained on as a feature
    ("--id-column", "ID", "'id'"),
    ("--time-column", "x", "'x0' or 'x1' or 'x2'"),  # the three closest, in table order
    ("--customer-column", "nte", "'note'"),
    ("--features", "x0,x11", "'x1'"),  # was "column 'x11' not found": neither the flag nor the column meant
])
def test_an_unknown_column_in_a_flag_stops_fit_naming_the_flag_and_the_close_matches(
        flag: str, given: str, meant: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _generic().to_csv(tmp_path / "g.csv", index=False)
    err = fail([*FAST, "fit", "--data", str(tmp_path / "g.csv"), "--output", str(tmp_path / "m"), flag, given],
               capsys)
    wrong = given.split(",")[-1]
    assert f"{flag} '{wrong}': the table has no such column (did you mean {meant}" in err
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def generic_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("generic")
    _generic().to_csv(root / "g.csv", index=False)
    assert run([*FAST, "fit", "--data", str(root / "g.csv"), "--output", str(root / "m"), "--epochs", "1",
                "--no-baselines"]) == 0
    return root / "m"


@pytest.mark.parametrize("command", ["fit", "score"])
def test_a_word_in_a_feature_column_stops_with_its_column_row_and_value(
        command: str, generic_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A third of x2 is "abc": fit dropped the column with an INFO line and trained without it; score said
    "not numeric" without the row."""
    table = _generic().astype({"x2": object})
    table.loc[4::3, "x2"] = "abc"
    table.to_csv(tmp_path / "bad.csv", index=False)
    extra = (["--output", str(tmp_path / "m")] if command == "fit"
             else ["--model", str(generic_model), "--output", str(tmp_path / "s.csv")])
    err = fail([*FAST, command, "--data", str(tmp_path / "bad.csv"), *extra], capsys)
    assert "column 'x2', data row 5 (1-based, header not counted): 'abc' is not a number" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "s.csv").exists()


def test_score_keeps_the_id_and_label_columns(generic_model: Path, tmp_path: Path) -> None:
    table = _generic(n=50, seed=9)
    table.to_csv(tmp_path / "t.csv", index=False)
    assert run([*FAST, "score", "--data", str(tmp_path / "t.csv"), "--model", str(generic_model),
                "--output", str(tmp_path / "s.csv")]) == 0
    scored = pd.read_csv(tmp_path / "s.csv")
    assert list(scored.columns) == ["id", "label", "score", "flag", "top_features"]
    assert scored["id"].tolist() == table["id"].tolist() and scored["label"].tolist() == table["label"].tolist()
