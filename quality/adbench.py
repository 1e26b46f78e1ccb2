"""The trainer on ADBench's twelve development tables, beside kNN-5, Isolation Forest and PCA.

Protocol (../shared/data/README.md): per set, numpy ``default_rng(0)`` shuffles the normal rows'
indices; the first 60 % (int) are the training rows, the other normals and every anomaly the test
rows. The baselines get the features standardised with the training rows' mean and std. The
project's trainer gets the same training rows (its last 15 % validate: early stopping, scale
and threshold) with its default settings, one setting for every set, and scores the test rows
through the ``Scorer`` the worker uses. Writes a markdown block into docs/model-quality.md and
the raw figures to docs/adbench.json.

    .venv/bin/python quality/adbench.py        # needs ../shared/data; about 10 minutes on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quality.docblock import replace_block  # noqa: E402

VAL_SHARE = 0.15  # of the training rows, the last ones: the trainer's validation rows
DETECTORS = ("ours", "knn5", "iforest", "pca")


def protocol_split(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Training row indices (60 % of the shuffled normals) and test row indices (the rest, anomalies last)."""
    normal = np.flatnonzero(y == 0)
    np.random.default_rng(0).shuffle(normal)
    n_train = int(0.6 * len(normal))
    return normal[:n_train], np.concatenate([normal[n_train:], np.flatnonzero(y == 1)])


def baselines(train: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """kNN-5 mean distance, Isolation Forest (200 trees) and PCA (half the features) test scores."""
    from sklearn.decomposition import PCA
    from sklearn.ensemble import IsolationForest
    from sklearn.neighbors import NearestNeighbors

    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    tr, te = (train - mean) / std, (test - mean) / std
    knn = NearestNeighbors(n_neighbors=5).fit(tr).kneighbors(te)[0].mean(axis=1)
    forest = -IsolationForest(n_estimators=200, random_state=0, n_jobs=1).fit(tr).score_samples(te)
    pca = PCA(n_components=max(1, tr.shape[1] // 2), random_state=0).fit(tr)
    recon = np.mean(np.square(pca.inverse_transform(pca.transform(te)) - te), axis=1)
    return {"knn5": knn, "iforest": forest, "pca": recon}


def ours(train: np.ndarray, test: np.ndarray, names: tuple[str, ...], root: Path, args: argparse.Namespace) -> dict:
    """Fit the project's default on the training rows (last 15 % validate); score the test rows."""
    from pipeline.artifact import load_artifact
    from pipeline.features import TableLayout
    from pipeline.scoring import Scorer
    from trainer.fit import FitOptions, fit_split
    from trainer.split import Split
    from trainer.train import TrainConfig

    n_val = int(VAL_SHARE * len(train))
    x = np.concatenate([train, test]).astype(np.float32)
    position = np.arange(len(x))
    split = Split(position < len(train) - n_val, (position >= len(train) - n_val) & (position < len(train)),
                  position >= len(train))
    layout = TableLayout("generic", None, "", None, None, names)
    params = {"bottleneck": args.bottleneck} if args.bottleneck else {}
    options = FitOptions(output=root, device="cpu", baselines=False, publish=False, score=args.score,
                         bank_rows=args.bank_rows, model=args.model, model_params=params,
                         train=TrainConfig(progress=False, seed=args.seed, epochs=args.epochs))
    started = time.perf_counter()
    result = fit_split(x, None, split, layout, options)
    artifact = load_artifact(result.version_dir)
    scores = Scorer(artifact, device="cpu").score(test.astype(np.float32)).scores
    training, validation = artifact.manifest["metrics"]["training"], artifact.manifest["metrics"]["validation"]
    return {"scores": scores, "seconds": time.perf_counter() - started, "epochs": len(training["val_loss"]),
            "stopped_early": training["stopped_early"], "scoring": validation["scoring"],
            "bottleneck": artifact.manifest["hyperparameters"]["bottleneck"]}


def run_set(path: Path, root: Path, args: argparse.Namespace) -> dict:
    """Every detector on one set: ROC-AUC and AP per detector, plus the trainer's details."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    data = np.load(path)
    x, y = data["X"].astype(np.float64), data["y"].astype(int)
    train_rows, test_rows = protocol_split(y)
    labels = y[test_rows]
    names = tuple(f"x{i}" for i in range(x.shape[1]))
    fitted = ours(x[train_rows], x[test_rows], names, root, args)
    scores = {"ours": fitted.pop("scores"), **baselines(x[train_rows], x[test_rows])}
    entry = {"features": x.shape[1], "train_rows": len(train_rows), "test_rows": len(test_rows),
             "test_anomalies": int(labels.sum()), **fitted}
    for name, s in scores.items():
        entry[name] = {"roc_auc": float(roc_auc_score(labels, s)), "average_precision":
                       float(average_precision_score(labels, s))}
    return entry


def table(results: dict[str, dict]) -> str:
    """Markdown: ROC-AUC / AP per set and detector, and the means."""
    head = "| set | features | train / test rows (anomalies) | **ours** | kNN-5 | IForest | PCA | scoring, epochs |"
    rows = [head, "|---|---:|---|---|---|---|---|---|"]
    for name, e in results.items():
        cells = [f"{e[d]['roc_auc']:.3f} / {e[d]['average_precision']:.3f}" for d in DETECTORS]
        cells[0] = f"**{cells[0]}**"
        rows.append(f"| {name} | {e['features']} | {e['train_rows']:,} / {e['test_rows']:,} ({e['test_anomalies']:,}) "
                    f"| {' | '.join(cells)} | {e['scoring']}, {e['epochs']}{'' if e['stopped_early'] else ' (cap)'} |")
    means = [mean_of(results, d) for d in DETECTORS]
    cells = [f"{a:.3f} / {p:.3f}" for a, p in means]
    rows.append(f"| **mean** | | | **{cells[0]}** | {' | '.join(cells[1:])} | |")
    return "\n".join(rows)


def mean_of(results: dict[str, dict], detector: str) -> tuple[float, float]:
    """Mean ROC-AUC and mean AP of one detector over the sets."""
    return (float(np.mean([e[detector]["roc_auc"] for e in results.values()])),
            float(np.mean([e[detector]["average_precision"] for e in results.values()])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared/data/adbench-dev")
    parser.add_argument("--out", type=Path, default=REPO / "docs/model-quality.md",
                        help="markdown file whose adbench block is replaced ('-': print only)")
    parser.add_argument("--sets", help="comma-separated name parts, e.g. fault,yeast (default: all)")
    parser.add_argument("--score", default="auto", choices=("auto", "hybrid", "reconstruction"))
    parser.add_argument("--model", default="autoencoder")
    parser.add_argument("--bottleneck", type=int)
    parser.add_argument("--bank-rows", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, help="epoch cap (default: the trainer's automatic one)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    paths = sorted(args.data_dir.glob("*.npz"), key=lambda p: int(p.name.split("_")[0]))
    if args.sets:
        paths = [p for p in paths if any(part in p.name for part in args.sets.split(","))]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            name = path.stem.split("_", 1)[1]
            results[name] = run_set(path, Path(tmp), args)
            e = results[name]
            print(name, {d: (round(e[d]["roc_auc"], 3), round(e[d]["average_precision"], 3)) for d in DETECTORS},
                  f"{e['seconds']:.0f}s", flush=True)
    print(table(results))
    if str(args.out) != "-":
        args.out.with_name("adbench.json").write_text(json.dumps(results, indent=2) + "\n")
        replace_block(args.out, "adbench", markdown(results, args))


def markdown(results: dict[str, dict], args: argparse.Namespace) -> str:
    """The generated block: protocol, table, command."""
    flags = "".join(f" --{k} {v}" for k, v in (("score", args.score), ("model", args.model),
                                                ("bottleneck", args.bottleneck), ("bank-rows", args.bank_rows))
                    if v not in (None, "auto", "autoencoder", 2048))
    return "\n".join([
        "ROC-AUC / average precision on the test rows of each set (protocol above); ours: `fraud-train`'s "
        "defaults (autoencoder, automatic schedule and bottleneck, `auto` scoring, which is the hybrid here: "
        "no labelled validation rows), seed 0, CPU, one thread; `(cap)`: training ended at the epoch cap.", "",
        table(results), "", "Reproduce:", "", "```", f".venv/bin/python quality/adbench.py{flags}", "```",
    ])


if __name__ == "__main__":
    main()
