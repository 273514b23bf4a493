"""The cumulative ablation: planning, the table from runs.db, and a real two-step ablation of a tiny
BERT on real ESCI queries through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import tiny_config
from core.errors import ConfigError
from core.runs.store import RunStore
from core.scoring.metrics import mean_ndcg
from core.training.ablate import ablation_table, item_overrides, plan_ablation, split_items, to_markdown
from workbench.cli import app

runner = CliRunner()


def test_items_and_overrides():
    assert split_items("ema, fgm,class_weights=[1,2,2,1],rdrop") == ["ema", "fgm", "class_weights=[1,2,2,1]", "rdrop"]
    assert item_overrides("ema") == ["tricks.ema=true"]
    assert item_overrides("poly1") == ["tricks.loss=poly1"]
    assert item_overrides("pgd") == ["tricks.pgd=true", "tricks.fgm=false"]
    assert item_overrides("label_smoothing=0.2") == ["tricks.label_smoothing=0.2"]
    assert item_overrides("train.lr=3e-5") == ["train.lr=3e-5"]
    with pytest.raises(ConfigError, match="unknown technique"):
        item_overrides("swa")


def test_plan_is_cumulative_and_checked_before_training():
    steps = plan_ablation("configs/ablation.yaml", ["ema", "poly1", "fgm", "ls"])
    assert [s.added for s in steps] == ["baseline", "ema", "poly1", "fgm", "ls"]
    t = [s.config.tricks for s in steps]
    assert not t[0].ema and t[0].loss == "ce" and not t[0].fgm
    assert t[1].ema and t[1].loss == "ce"
    assert t[2].ema and t[2].loss == "poly1" and not t[2].fgm
    assert t[4].ema and t[4].loss == "poly1" and t[4].fgm and t[4].label_smoothing == 0.1
    assert steps[3].config.name == "ablation-minilm+ema+poly1+fgm"
    assert steps[0].config.train.folds == 3 and steps[0].config.data.max_queries == 45
    with pytest.raises(ConfigError, match="tricks.loss"):
        plan_ablation("configs/ablation.yaml", ["ema", "loss=ghm"])
    with pytest.raises(ConfigError, match="fgm and pgd"):
        plan_ablation("configs/ablation.yaml", ["pgd", "fgm"])
    with pytest.raises(ConfigError, match="repeated"):
        plan_ablation("configs/ablation.yaml", ["ema", "ema"])
    with pytest.raises(ConfigError, match="at least one"):
        plan_ablation("configs/ablation.yaml", [])


def _fake_run(store, name, fold_ndcg, seconds, epochs=2, teacher_seconds=None):
    rid = store.create_run(name, {"train": {"epochs": epochs}}, status="finished")
    rows = [{"name": "fold/ndcg", "value": v, "fold": f} for f, v in enumerate(fold_ndcg)]
    rows += [{"name": "fold/seconds", "value": s, "fold": f} for f, s in enumerate(seconds)]
    rows += [{"name": "teacher/fold_seconds", "value": s, "fold": f} for f, s in enumerate(teacher_seconds or [])]
    rows += [
        {"name": "cv/ndcg", "value": float(np.mean(fold_ndcg)), "fold": -1},
        {"name": "cv/final_ndcg", "value": 0.9, "fold": -1},
        {"name": "cv/task2_f1", "value": 0.6, "fold": -1},
    ]
    store.log_metrics(rid, rows)
    return rid


def test_table_from_runs_db_by_hand(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    a = _fake_run(store, "base", [0.80, 0.84, 0.82], [100, 110, 90])
    b = _fake_run(store, "ema", [0.81, 0.86, 0.82], [120, 120, 120])
    c = _fake_run(store, "distill", [0.90, 0.70, 0.80], [100, 100, 100], teacher_seconds=[100, 100, 100])
    t = ablation_table(store, [a, b, c], ["baseline", "+ ema", "+ distill"])
    assert list(t["added"]) == ["baseline", "+ ema", "+ distill"]
    assert t.loc[0, "fold_std"] == pytest.approx(np.std([0.80, 0.84, 0.82], ddof=1))
    assert np.isnan(t.loc[0, "delta"]) and t.loc[0, "within_noise"] is None
    assert t.loc[1, "delta"] == pytest.approx(np.mean([0.81, 0.86, 0.82]) - 0.82)
    assert t.loc[1, "paired_std"] == pytest.approx(np.std([0.01, 0.02, 0.0], ddof=1))
    assert not t.loc[1, "within_noise"]  # +0.01 beats a paired std of 0.01 ... just
    assert t.loc[2, "within_noise"]  # a -0.01 change with folds moving by +-0.1: noise
    assert t.loc[0, "sec_per_epoch"] == pytest.approx(100 / 2)
    assert t.loc[2, "sec_per_epoch"] == pytest.approx(200 / 2)  # the teacher pass counts
    md = to_markdown(t)
    assert md.count("\n") == 4 and "+0.0100" in md and a in md


def test_each_step_has_its_paired_bootstrap_interval_from_the_oof_files(tmp_path):
    from core.scoring.significance import ndcg_diff
    from oof_fixture import oof_frame

    store = RunStore(tmp_path / "runs.db")
    frames = [oof_frame(noise=1.5, seed=1), oof_frame(noise=0.5, seed=2)]
    frames.append(frames[1].copy())  # step 2 changes nothing: the interval is exactly [0, 0]
    ids = []
    for name, fr, folds in zip(("base", "ema", "ls"), frames, ([0.8, 0.82, 0.84], [0.9, 0.9, 0.93], [0.9, 0.9, 0.93])):
        rid = _fake_run(store, name, folds, [100, 100, 100])
        (tmp_path / "runs" / rid).mkdir(parents=True)
        fr.to_parquet(tmp_path / "runs" / rid / "oof.parquet", index=False)
        ids.append(rid)
    t = ablation_table(store, ids, ["baseline", "+ ema", "+ ls"])
    want = ndcg_diff(frames[0], frames[1], "ce_score")  # the cross-encoder's per-query nDCG, step vs previous
    assert (t.loc[1, "ci_low"], t.loc[1, "ci_high"], t.loc[1, "ci_queries"]) == (want.low, want.high, 40)
    assert t.loc[1, "noise_rule"] == "bootstrap" and t.loc[1, "within_noise"] == want.within_noise is False
    assert (t.loc[2, "ci_low"], t.loc[2, "ci_high"]) == (0.0, 0.0) and t.loc[2, "within_noise"]
    assert np.isnan(t.loc[0, "ci_low"]) and t.loc[0, "within_noise"] is None and pd.isna(t.loc[0, "noise_rule"])
    md = to_markdown(t)
    assert f"[{want.low:+.4f}, {want.high:+.4f}]" in md and "| Δ 95% interval |" in md
    res = runner.invoke(
        app, ["ablate", "configs/ablation.yaml", "--db", store.path, "--runs", ",".join(ids)]
    )  # run names
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    ema = next(i for i, line in enumerate(lines) if "│ ema " in line)  # Δ, then its interval on the next line
    assert " *" in lines[ema] and f"[{want.low:+.3f},{want.high:+.3f}]" in lines[ema + 1]
    ls = next(i for i, line in enumerate(lines) if "│ ls " in line)
    assert "+0.0000 ~" in lines[ls] and "[+0.000,+0.000]" in lines[ls + 1]
    assert all(len(line) <= 80 for line in res.output.splitlines() if "│" in line), res.output


def test_ablation_end_to_end_through_the_cli(tmp_path, small_dataset, tiny_bert):
    import yaml

    cfg = tiny_config(tmp_path, small_dataset, tiny_bert)
    data = yaml.safe_load(open(cfg))
    data["data"]["max_queries"] = 10  # three runs: keep each small
    data["train"]["num_threads"] = 1
    open(cfg, "w").write(yaml.safe_dump(data))
    db = str(tmp_path / "runs.db")
    res = runner.invoke(app, ["ablate", cfg, "--tricks", "ema,ls", "--db", db, "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["added"] for r in rows] == ["baseline", "+ ema", "+ ls"]
    store = RunStore(db)
    runs = {r["id"]: r for r in store.list_runs()}
    assert set(runs) == {r["run_id"] for r in rows} and all(r["status"] == "finished" for r in runs.values())
    stored = [json.loads(runs[r["run_id"]]["config"])["tricks"] for r in rows]
    assert [s["ema"] for s in stored] == [False, True, True]
    assert [s["label_smoothing"] for s in stored] == [0.0, 0.0, 0.1]
    for r in rows:  # the table's CV nDCG is the one recomputed from each run's OOF file
        oof = pd.read_parquet(os.path.join(runs[r["run_id"]]["run_dir"], "oof.parquet"))
        assert r["cv_ndcg"] == pytest.approx(mean_ndcg(oof["query_id"], oof["ce_score"], oof["esci_label"]))
        per_fold = [mean_ndcg(g["query_id"], g["ce_score"], g["esci_label"]) for _, g in oof.groupby("fold")]
        assert r["fold_std"] == pytest.approx(np.std(per_fold, ddof=1), abs=1e-9)
        assert r["sec_per_epoch"] > 0
    # the table again, from runs.db only (no training), in the terminal layout
    ids = ",".join(r["run_id"] for r in rows)
    res = runner.invoke(app, ["ablate", cfg, "--tricks", "ema,ls", "--db", db, "--runs", ids, "--markdown"])
    assert res.exit_code == 0, res.output
    assert "+ ls" in res.output and f"{rows[2]['cv_ndcg']:.4f}" in res.output and "| step |" in res.output
    # any finished runs compared without --tricks (e.g. two backbones): labelled by run name, Δ paired
    res = runner.invoke(
        app, ["ablate", cfg, "--db", db, "--runs", f"{rows[0]['run_id']},{rows[2]['run_id']}", "--json"]
    )
    assert res.exit_code == 0, res.output
    pair = json.loads(res.output)
    assert [p["run_id"] for p in pair] == [rows[0]["run_id"], rows[2]["run_id"]]
    assert pair[0]["added"] == runs[rows[0]["run_id"]]["name"]
    assert pair[1]["delta"] == pytest.approx(rows[2]["cv_ndcg"] - rows[0]["cv_ndcg"], abs=1e-9)
    res = runner.invoke(app, ["ablate", cfg, "--db", db])  # main() turns this into one line + exit 2
    assert isinstance(res.exception, ConfigError) and "--tricks is required" in str(res.exception)
    assert len(store.list_runs()) == 3


def test_bad_trick_is_a_one_line_error_and_trains_nothing(tmp_path, small_dataset, tiny_bert):
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert)
    db = tmp_path / "runs.db"
    res = subprocess.run(
        [sys.executable, "-m", "workbench", "ablate", cfg, "--tricks", "ema,swa", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "swa" in res.stderr and "unknown technique" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not db.exists()
