"""Training throughput: our k-fold trainer against sentence-transformers ``CrossEncoder.fit``.

Same model (all-MiniLM-L6-v2), same real ESCI pairs, same max_length, batch size, epochs and
learning rate, one process, run one after the other. Each contestant trains one epoch on the
training pairs of fold 0 and predicts the fold's validation pairs; we print pairs/s (training
pairs + predicted pairs over wall time) and the ratio against sentence-transformers (the
official ESCI baseline's recipe). Ours is also run without length grouping, to show where the
difference comes from. Needs ``pip install -e '.[bench]'``.

    python benchmarks/train_throughput.py [--queries 40] [--max-length 128] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", default=str(REPO.parent / "shared" / "data" / "esci_us_opensearch_150q"))
    ap.add_argument("--queries", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    args = ap.parse_args()
    logging.disable(logging.WARNING)

    from sentence_transformers.cross_encoder import CrossEncoder as STCrossEncoder
    from sentence_transformers.readers import InputExample

    from core.config import config_from_dict
    from core.data.esci import ESCI_LABELS
    from core.data.folds import assign_folds
    from core.data.opensearch import import_opensearch
    from core.data.text import clean_text
    from core.modeling.model import resolve_model_path
    from core.runs.store import RunStore
    from core.training.train import run_training
    from core.training.validate import load_training_frame

    tmp = Path(tempfile.mkdtemp(prefix="esci-bench-"))
    import_opensearch(args.sample, tmp / "data")
    base = {
        "name": "bench",
        "output_dir": str(tmp / "runs"),
        "data": {"dir": str(tmp / "data"), "max_queries": args.queries},
        "text": {"max_length": args.max_length, "cache_dir": str(tmp / "cache")},
        "model": {"name": "all-MiniLM-L6-v2", "freeze_embeddings": False},
        "train": {
            "folds": 5,
            "run_folds": [0],
            "epochs": 1,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "head_lr": args.lr,
            "evals_per_epoch": 1,
            "save_checkpoints": False,
            "log_every": 1000,
        },
        "blend": {"members": []},
    }
    cfg = config_from_dict(base)
    df = load_training_frame(cfg)
    folds = assign_folds(df["query_id"].to_numpy(), 5, cfg.train.seed)
    n_train, n_val = int((folds != 0).sum()), int((folds == 0).sum())
    print(
        f"{len(df)} pairs from {df['query_id'].nunique()} real queries: {n_train} train + {n_val} predicted; "
        f"max_length {args.max_length}, batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )

    results = {}
    store = RunStore(tmp / "runs.db")
    for label, grouping in (("ours (length-grouped)", True), ("ours (no grouping)", False)):
        c = config_from_dict(base, [f"train.length_grouping={str(grouping).lower()}"])
        t = time.perf_counter()
        run_training(c, store)
        results[label] = (n_train + n_val) / (time.perf_counter() - t)

    # sentence-transformers: the official baseline's CrossEncoder recipe on the same text
    def product_text(row) -> str:
        parts = [
            row.product_title,
            row.product_brand,
            row.product_color,
            row.product_bullet_point,
            row.product_description,
        ]
        return " ".join(clean_text(p) for p in parts if clean_text(p))

    label_idx = {lab: i for i, lab in enumerate(ESCI_LABELS)}
    train_rows = df[folds != 0]
    val_rows = df[folds == 0]
    examples = [
        InputExample(texts=[clean_text(r.query), product_text(r)], label=label_idx[r.esci_label])
        for r in train_rows.itertuples()
    ]
    val_pairs = [[clean_text(r.query), product_text(r)] for r in val_rows.itertuples()]
    torch.manual_seed(cfg.train.seed)
    t = time.perf_counter()
    model = STCrossEncoder(resolve_model_path("all-MiniLM-L6-v2"), num_labels=4, max_length=args.max_length)
    loader = torch.utils.data.DataLoader(examples, shuffle=True, batch_size=args.batch_size)
    model.fit(
        train_dataloader=loader,
        epochs=1,
        warmup_steps=int(0.1 * len(loader)),
        optimizer_params={"lr": args.lr},
        show_progress_bar=False,
    )
    model.predict(val_pairs, batch_size=cfg.train.eval_batch_size, show_progress_bar=False)
    results["sentence-transformers CrossEncoder.fit"] = (n_train + n_val) / (time.perf_counter() - t)

    st = results["sentence-transformers CrossEncoder.fit"]
    print(f"{'contestant':<42} {'pairs/s':>8} {'ratio vs ST':>12}")
    for k, v in results.items():
        print(f"{k:<42} {v:8.1f} {v / st:11.2f}x")


if __name__ == "__main__":
    main()
