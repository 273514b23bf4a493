"""The held-out protocol of issue 15: figures on queries nothing was fitted on, over several splits.

Each split is a data folder imported with ``workbench data import-opensearch --test-fraction 0.3
--seed S`` (70% of the queries train the cross-encoder's k folds, 30% are held out, labelled) and a
finished training run on it. For every split this prints the held-out nDCG of:

- ``bm25``, ``e5 zero-shot`` (multilingual-e5-small cosine), ``e5+bm25 0.7/0.3`` (per-query
  z-blend with fixed weights, nothing fitted), ``cross-encoder`` (the run's fold-averaged expected
  gain), ``demo blend`` (the run's own final score: blend weights fitted on its OOF rows),
  ``stack`` (``workbench stack`` on the run, each given stack setting),

then the mean over splits, the paired bootstrap interval (over held-out queries) of stack minus
the z-blend per split, and Task 2 micro-F1 of the stacker against the majority class.

Usage::

    python benchmarks/heldout_protocol.py --db runs.db RUN_SPLIT0[+RUN ...] RUN_SPLIT1 RUN_SPLIT2 \
        [--set stack.key=value ...] [--variant name:key=value,key=value ...] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.config import StackConfig, build_section
from core.data.esci import ESCI_LABELS
from core.runs.store import RunStore
from core.scoring.blend import nested_blend, standardize_per_query
from core.scoring.metrics import expected_gain, mean_ndcg, micro_f1_task2, ndcg_per_query
from core.scoring.report import argmax_labels
from core.scoring.significance import f1_diff, paired_bootstrap
from core.scoring.stack import load_stack_data, run_stack


def _variant(spec: str) -> tuple[str, dict]:
    """``name:key=value,key=[a,b]`` -> (name, {key: value}) (commas inside brackets kept)."""
    from core.config import parse_overrides
    from core.training.ablate import split_items

    name, _, items = spec.partition(":")
    return name, dict(parse_overrides(split_items(items)))


def split_figures(store: RunStore, runs: str, variants: dict[str, dict]) -> tuple[dict, dict]:
    """Per-query held-out nDCG (Series by query) of each scorer on one split, and extra figures.

    ``runs``: one training run, or several joined by ``+`` (all members of the stacker; the
    cross-encoder and demo-blend rows are those of the first, the other members get a row each)."""
    run_ids = runs.split("+")
    run_id = run_ids[0]
    data = load_stack_data(store, run_ids, ["bm25", "dense", "dense-e5"])
    test = data.test
    q, lab = test["query_id"].to_numpy(), test["esci_label"].to_numpy()
    run_test = pd.read_parquet(store.get_record(run_id).run_dir / "test.parquet").set_index("example_id")
    run_test = run_test.loc[test["example_id"].to_numpy()]
    e5, bm25 = data.scorers["dense-e5"][1], data.scorers["bm25"][1]
    scores = {
        "bm25": bm25,
        "MiniLM zero-shot": data.scorers["dense"][1],
        "e5 zero-shot": e5,
        "e5+bm25 0.7/0.3": 0.7 * standardize_per_query(q, e5) + 0.3 * standardize_per_query(q, bm25),
        "cross-encoder": expected_gain(data.members[0].test),
        "cross-encoder (one fold model)": None,
        "demo blend": run_test["score"].to_numpy(),
    }
    run_oof = pd.read_parquet(store.get_record(run_id).run_dir / "oof.parquet")
    members = [c for c in ("bm25", "dense", "dense-e5") if c in run_oof.columns]
    for method in ("grid", "caruana", "caruana+fallback"):  # the demo's blend refitted each way on the run's OOF rows
        oq = run_oof["query_id"].to_numpy()
        z = np.column_stack([standardize_per_query(oq, run_oof[c]) for c in ("ce_score", *members)])
        how = method.split("+")[0]
        _, _, w = nested_blend(run_oof["fold"], oq, run_oof["esci_label"], z, 10, how, method.endswith("fallback"))
        zt = np.column_stack(
            [standardize_per_query(q, run_test["ce_score"])]
            + [standardize_per_query(q, run_test[c] if c in run_test else data.scorers[c][1]) for c in members]
        )
        scores[f"blend {method} (ce+{'+'.join(members)})"] = zt @ w
    for m in data.members[1:]:
        scores[f"member {m.name}"] = expected_gain(m.test)
    if len(data.members) > 1:
        scores["cross-encoders, mean gain"] = np.mean([expected_gain(m.test) for m in data.members], axis=0)
    per_query = {k: ndcg_per_query(q, v, lab) for k, v in scores.items() if v is not None}
    per_query["cross-encoder (one fold model)"] = pd.concat(
        [ndcg_per_query(q, expected_gain(p), lab) for p in data.members[0].test_by_fold.values()], axis=1
    ).mean(axis=1)
    majority = pd.Series(data.oof["esci_label"]).mode()[0]  # the training queries' most frequent label
    ce_pred = np.asarray(ESCI_LABELS)[np.asarray(data.members[0].test).argmax(1)]
    extra = {"majority": majority, "majority_f1": float((lab == majority).mean()), "oof": {}}
    extra["cross-encoder task2_f1"] = micro_f1_task2(lab, ce_pred)
    for name, over in variants.items():
        t0 = time.time()
        res = run_stack(data, build_section(StackConfig, over, "stack."), seed=0)
        per_query[name] = ndcg_per_query(q, res.test["score"].to_numpy(), lab)
        pred = argmax_labels(res.test)
        extra[f"{name} task2_f1"] = micro_f1_task2(lab, pred)
        d = f1_diff(res.test, res.test, 2, pred_a=np.full(len(lab), extra["majority"]), pred_b=pred)
        extra[f"{name} task2_vs_majority"] = [d.diff, d.low, d.high]
        extra["oof"][name] = res.cv["ndcg"]
        extra[f"{name} seconds"] = time.time() - t0
    oq, olab = data.oof["query_id"].to_numpy(), data.oof["esci_label"].to_numpy()
    extra["oof"]["cross-encoder"] = mean_ndcg(oq, expected_gain(data.members[0].oof), olab)
    for sc in ("bm25", "dense-e5"):
        extra["oof"][sc] = mean_ndcg(oq, data.scorers[sc][0], olab)
    return per_query, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "runs", nargs="+", help="one finished training run per held-out split (RUN or RUN+RUN: several members)"
    )
    ap.add_argument("--db", default="runs.db")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="name:key=value,... a stack setting to evaluate (repeatable; default: 'stack' with the defaults)",
    )
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    variants = dict(_variant(v) for v in args.variant) or {"stack": {}}
    store = RunStore(args.db)
    table, extras = {}, {}
    for i, run in enumerate(args.runs):
        per_query, extra = split_figures(store, run, variants)
        table[f"split {i}"] = per_query
        extras[f"split {i}"] = extra
    names = list(next(iter(table.values())))
    rows = []
    for name in names:
        vals = [table[s][name].mean() for s in table]
        rows.append({"scorer": name, **{s: v for s, v in zip(table, vals)}, "mean": float(np.mean(vals))})
    df = pd.DataFrame(rows).set_index("scorer")
    print(df.round(4).to_string())
    print()
    for s in table:
        for v in variants:
            d = paired_bootstrap(table[s]["e5+bm25 0.7/0.3"], table[s][v])
            t2, lo, hi = extras[s][f"{v} task2_vs_majority"]
            print(
                f"{s}: {v} - e5+bm25 = {d.diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
                f"{' (within noise)' if d.low <= 0 <= d.high else ''}; "
                f"Task 2 F1 {extras[s][f'{v} task2_f1']:.4f} vs majority {extras[s]['majority_f1']:.4f} "
                f"({t2:+.4f} [{lo:+.4f}, {hi:+.4f}]), cross-encoder {extras[s]['cross-encoder task2_f1']:.4f}; "
                f"OOF nDCG {extras[s]['oof'][v]:.4f}"
            )
        print(f"{s}: OOF nDCG " + ", ".join(f"{k} {v:.4f}" for k, v in extras[s]["oof"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"table": df.to_dict(), "extras": extras}, indent=1, default=float))


if __name__ == "__main__":
    main()
