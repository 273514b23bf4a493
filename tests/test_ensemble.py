"""Tests of core.scoring.ensemble and `workbench ensemble build` on the real 150-query sample's labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from core.errors import DataError, WorkbenchError
from core.runs.store import RunStore
from core.scoring.ensemble import (
    NdcgEvaluator,
    build_ensemble,
    caruana_weights,
    correlation_matrix,
    file_sha256,
    load_members,
    parse_weights,
    shrink_correlated,
    tune_task2_bias,
    tune_task3_threshold,
)
from core.scoring.metrics import ESCI_GAINS, ESCI_LABELS, mean_ndcg

GAIN = np.array([ESCI_GAINS[c] for c in ESCI_LABELS])


def _examples(sample_frames, n_test_queries: int = 30) -> pd.DataFrame:
    ex = sample_frames[0][["example_id", "query_id", "product_id", "esci_label"]].copy()
    qs = sorted(ex["query_id"].unique())
    ex["split"] = np.where(ex["query_id"].isin(qs[-n_test_queries:]), "test", "train")
    return ex


def _probs(labels: np.ndarray, noise: float, rng) -> np.ndarray:
    """Noisy class probabilities that favour the true class (E, S, C, I order)."""
    code = pd.Series(labels).map({c: i for i, c in enumerate(ESCI_LABELS)}).to_numpy()
    logits = rng.normal(0, noise, (len(labels), 4))
    logits[np.arange(len(labels)), code] += 1.0
    logits[:, 0] += 0.5  # prior towards E, like the real class balance
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def make_run(
    store: RunStore,
    root: Path,
    run_id: str,
    ex: pd.DataFrame,
    noise: float,
    seed: int,
    scorers: dict | None = None,
    test: bool = True,
) -> str:
    """A finished run with oof.parquet (split train, 5 folds) and test.parquet (split test)."""
    rng = np.random.default_rng(seed)
    run_dir = root / "runs" / run_id
    run_dir.mkdir(parents=True)
    cfg = {"name": run_id, "data": {"dir": str(root / "data"), "task": 1}, "model": {"name": "fake"}}
    store.create_run(run_id, cfg, run_dir=str(run_dir), run_id=run_id, status="finished")
    for split, fname in (("train", "oof.parquet"), ("test", "test.parquet")):
        if split == "test" and not test:
            continue
        part = ex[ex["split"] == split].reset_index(drop=True)
        df = part[["example_id", "query_id", "product_id", "esci_label"]].copy()
        df["fold"] = df["query_id"] % 5 if split == "train" else -1
        p = _probs(part["esci_label"].to_numpy(), noise, rng)
        df[["p_E", "p_S", "p_C", "p_I"]] = p
        df["ce_score"] = p @ GAIN
        df["score"] = df["ce_score"]
        for name, fn in (scorers or {}).items():
            df[name] = fn(part, rng)
        df.sample(frac=1.0, random_state=seed).to_parquet(run_dir / fname, index=False)  # any row order
    return run_id


def _gainish(part, rng):
    return part["esci_label"].map(ESCI_GAINS).to_numpy() + rng.normal(0, 0.6, len(part))


def three_runs(tmp_path, sample_frames):
    """A runs.db with three fake runs of decreasing quality (run-good also has a bm25 scorer)."""
    ex = _examples(sample_frames)
    store = RunStore(tmp_path / "runs.db")
    make_run(store, tmp_path, "run-good", ex, noise=0.8, seed=1, scorers={"bm25": _gainish})
    make_run(store, tmp_path, "run-mid", ex, noise=1.2, seed=2)
    make_run(store, tmp_path, "run-weak", ex, noise=2.0, seed=3)
    return store, ex


@pytest.fixture()
def fake_store(tmp_path, sample_frames):
    store, ex = three_runs(tmp_path, sample_frames)
    return store, ex, tmp_path


# --------------------------------------------------------------------------- pieces
def test_ndcg_evaluator_matches_mean_ndcg_with_ties(sample_frames):
    ex = sample_frames[0]
    rng = np.random.default_rng(0)
    ev = NdcgEvaluator(ex["query_id"], ex["esci_label"])
    for scores in (rng.random(len(ex)), rng.integers(0, 3, len(ex)).astype(float), np.zeros(len(ex))):
        assert ev(scores) == pytest.approx(mean_ndcg(ex["query_id"], scores, ex["esci_label"]), abs=1e-12)


def test_task3_threshold_is_the_best_cut(sample_frames):
    y = sample_frames[0]["esci_label"].to_numpy() == "S"
    rng = np.random.default_rng(0)
    p = np.round(np.clip(0.3 * y + rng.normal(0.3, 0.2, len(y)), 0, 1), 2)  # many ties
    thr, f1 = tune_task3_threshold(p, y)
    best = max(f1_score(y, p >= t, average="micro") for t in np.unique(np.append(p, np.inf)))
    assert f1 == pytest.approx(best, abs=1e-12)
    assert f1_score(y, p >= thr, average="micro") == pytest.approx(f1, abs=1e-12)
    assert f1 > max(y.mean(), 1 - y.mean())  # beats both constant predictions


def test_task2_bias_corrects_a_shifted_prior(sample_frames):
    labels = sample_frames[0]["esci_label"].to_numpy()
    y = pd.Series(labels).map({c: i for i, c in enumerate(ESCI_LABELS)}).to_numpy()
    p = _probs(labels, 1.0, np.random.default_rng(0))
    p[:, 3] *= 8.0  # a model that over-predicts Irrelevant
    p /= p.sum(1, keepdims=True)
    b, f1 = tune_task2_bias(p, y)
    plain = float(np.mean(p.argmax(1) == y))
    assert f1 > plain + 0.02
    assert b[3] < 0  # the bias pushes I down
    assert f1 == pytest.approx(f1_score(y, (np.log(p) + b).argmax(1), average="micro"))


def test_shrink_correlated_lowers_near_duplicates():
    corr = np.array([[1, 0.99, 0.2], [0.99, 1, 0.2], [0.2, 0.2, 1]])
    w = shrink_correlated(np.full(3, 1 / 3), corr, threshold=0.95)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(w[1]) and w[0] < 1 / 3 < w[2]
    assert np.allclose(shrink_correlated(np.full(3, 1 / 3), corr, threshold=0.999), 1 / 3)


def test_correlation_matrix_is_within_query(sample_frames):
    ex = sample_frames[0]
    q = ex["query_id"].to_numpy()
    rng = np.random.default_rng(0)
    a = rng.random(len(ex))
    scores = np.column_stack([a, a * 3 + q * 100, rng.random(len(ex))])  # a query-level offset
    c = correlation_matrix(q, scores, ["a", "a-shifted", "noise"])
    assert c.loc["a", "a-shifted"] == pytest.approx(1.0)
    assert abs(c.loc["a", "noise"]) < 0.05


def test_caruana_picks_the_best_bag():
    target = np.array([0.2, 0.8, 0.0])
    w, v = caruana_weights(lambda w: -np.abs(w - target).sum(), 3)
    assert np.allclose(w, target) and v == pytest.approx(0.0)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()


def test_parse_weights():
    assert parse_weights("auto", 3) == "auto" and parse_weights("Equal", 2) == "equal"
    assert np.allclose(parse_weights("1,1,2", 3), [0.25, 0.25, 0.5])
    for bad in ("1,2", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(WorkbenchError, match="--weights"):
            parse_weights(bad, 3)


# --------------------------------------------------------------------------- members and build
def test_fitted_weights_beat_equal_weights(fake_store):
    """Constructed case: one good model, two weak ones; equal weights dilute the good one."""
    store, ex, _ = fake_store
    ms = load_members(store, ["run-good", "run-weak", "run-mid"])
    equal = build_ensemble(ms, (1, 2, 3), "equal")
    auto = build_ensemble(ms, (1, 2, 3), "auto")
    for t in (1, 2):
        assert auto.tasks[t]["oof_ensemble"] > equal.tasks[t]["oof_ensemble"] + 0.002, t
        assert auto.tasks[t]["weights"][0] == max(auto.tasks[t]["weights"])
        assert auto.tasks[t]["oof_ensemble"] >= auto.tasks[t]["oof_member"]["run-good"] - 1e-12
    assert auto.tasks[3]["oof_ensemble"] >= equal.tasks[3]["oof_ensemble"] - 1e-12
    # the reported figures are the real metric on the ensemble's OOF columns
    oof = auto.oof
    assert auto.tasks[1]["oof_ensemble"] == pytest.approx(mean_ndcg(oof["query_id"], oof["score"], oof["esci_label"]))
    assert auto.tasks[2]["oof_ensemble"] == pytest.approx(np.mean(oof["esci_pred"] == oof["esci_label"]))
    assert auto.tasks[3]["oof_ensemble"] == pytest.approx(np.mean(oof["is_substitute"] == (oof["esci_label"] == "S")))
    # labelled test rows: held-out figures with the OOF-fitted weights
    test = auto.test.merge(ex[["example_id", "esci_label"]], on="example_id", suffixes=("", "_true"))
    assert auto.tasks[1]["test_ensemble"] == pytest.approx(
        mean_ndcg(test["query_id"], test["score"], test["esci_label_true"])
    )
    assert auto.tasks[2]["test_ensemble"] == pytest.approx(np.mean(test["esci_pred"] == test["esci_label_true"]))
    assert set(auto.tasks[3]["test_member"]) == {"run-good", "run-weak", "run-mid"}


def test_ensemble_vs_best_member_has_a_paired_bootstrap_interval(fake_store):
    from core.scoring.ensemble import compare_with_best_member
    from core.scoring.metrics import ndcg_per_query
    from core.scoring.significance import f1_diff, paired_bootstrap

    store, ex, _ = fake_store
    ms = load_members(store, ["run-good", "run-weak", "run-mid"])
    res = build_ensemble(ms, (1, 2, 3), "equal")
    vs = compare_with_best_member(res, ms, n_resamples=500, seed=3)
    assert {t: v["member"] for t, v in vs.items()} == {1: "run-good", 2: "run-good", 3: vs[3]["member"]}
    assert all(res.tasks[t]["vs_best"] is vs[t] for t in vs)
    oof, good = res.oof, ms.members[0]
    q, lab = oof["query_id"].to_numpy(), oof["esci_label"].to_numpy()
    want = paired_bootstrap(
        ndcg_per_query(q, good.oof_score, lab).to_numpy(),
        ndcg_per_query(q, oof["score"].to_numpy(), lab).to_numpy(),
        n_resamples=500,
        seed=3,
    )
    assert vs[1]["low"] == pytest.approx(want.low, abs=1e-12) and vs[1]["high"] == pytest.approx(want.high, abs=1e-12)
    for t in (1, 2, 3):  # the figures are the ones the ensemble reports
        assert vs[t]["a"] == pytest.approx(res.tasks[t]["oof_member"][vs[t]["member"]], abs=1e-12)
        assert vs[t]["b"] == pytest.approx(res.tasks[t]["oof_ensemble"], abs=1e-12)
        assert vs[t]["within_noise"] == (vs[t]["low"] <= 0 <= vs[t]["high"])
        assert vs[t]["diff"] == pytest.approx(vs[t]["b"] - vs[t]["a"], abs=1e-12)
    # Task 2: the member's argmax against the ensemble's prediction, pooled micro-F1 over drawn queries
    member_frame = oof.assign(**dict(zip(["p_E", "p_S", "p_C", "p_I"], good.oof_probs.T, strict=True)))
    t2 = f1_diff(member_frame, oof, 2, pred_b=oof["esci_pred"].to_numpy(), n_resamples=500, seed=3)
    assert (vs[2]["low"], vs[2]["high"]) == pytest.approx((t2.low, t2.high), abs=1e-12)


def test_members_align_on_example_id_and_weights_apply(fake_store):
    store, ex, _ = fake_store
    ms = load_members(store, ["run-good", "run-mid"])
    assert ms.oof["example_id"].is_monotonic_increasing and len(ms.oof) == (ex["split"] == "train").sum()
    res = build_ensemble(ms, (2,), np.array([0.25, 0.75]))
    p = 0.25 * ms.members[0].oof_probs + 0.75 * ms.members[1].oof_probs
    assert np.allclose(res.oof[["p_E", "p_S", "p_C", "p_I"]].to_numpy(), p)
    raw = pd.read_parquet(Path(store.get_run("run-mid")["run_dir"]) / "oof.parquet").set_index("example_id")
    assert np.allclose(ms.members[1].oof_probs[:, 1], raw.loc[ms.oof["example_id"], "p_S"].to_numpy())


def test_scorer_member_joins_task1_only(fake_store):
    store, _, _ = fake_store
    ms = load_members(store, ["run-mid", "bm25", "run-good"])  # bm25 comes from run-good's files
    res = build_ensemble(ms, (1, 2, 3), "auto", method="rank")
    assert res.tasks[1]["members"] == ["run-mid", "bm25", "run-good"]
    assert res.tasks[2]["members"] == ["run-mid", "run-good"] == res.tasks[3]["members"]
    assert any("bm25" in n and "no class probabilities" in n for n in res.notes)
    assert res.tasks[1]["oof_ensemble"] >= max(res.tasks[1]["oof_member"].values()) - 1e-12
    assert "score" in res.test and res.test["score"].notna().all()
    with pytest.raises(WorkbenchError, match="need class probabilities"):
        build_ensemble(_only_scorers(ms), (2,), "equal")
    with pytest.raises(WorkbenchError, match="no run member's oof.parquet has a 'bm25' column"):
        load_members(store, ["run-mid", "bm25"])
    with pytest.raises(WorkbenchError, match="need at least one run member"):
        load_members(store, ["bm25"])


def _only_scorers(ms):
    from core.scoring.ensemble import MemberSet

    return MemberSet([m for m in ms.members if m.kind == "scorer"], ms.oof, ms.test)


def test_mismatched_example_ids_are_listed(fake_store, sample_frames):
    store, ex, root = fake_store
    fewer = ex[~ex["example_id"].isin([3, 4, 5])]
    make_run(store, root, "run-fewer", fewer, noise=1.0, seed=9)
    with pytest.raises(WorkbenchError) as info:
        load_members(store, ["run-good", "run-fewer"])
    msg = str(info.value)
    assert "\n" not in msg
    assert "cover different example_ids" in msg and "3 only in 'run-good'" in msg and "3, 4, 5" in msg
    make_run(store, root, "run-notest", ex, noise=1.0, seed=10, test=False)
    with pytest.raises(WorkbenchError, match="have test predictions but 'run-notest' have none"):
        load_members(store, ["run-good", "run-notest"])
    with pytest.raises(WorkbenchError, match="given twice"):
        load_members(store, ["run-good", "run-good"])


# --------------------------------------------------------------------------- CLI
def test_cli_build_writes_valid_files_manifest_and_record(fake_store):
    from typer.testing import CliRunner

    from workbench.cli import app

    store, ex, root = fake_store
    out = root / "subs"
    r = CliRunner().invoke(
        app,
        [
            "ensemble",
            "build",
            "--runs",
            "run-good",
            "run-mid",
            "bm25",
            "--task",
            "all",
            "--weights",
            "auto",
            "--name",
            "e1",
            "--out",
            str(out),
            "--db",
            store.path,
            "--prior-adjust",
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == 0, r.output
    assert "ensemble" in r.output and "correlation" in r.output and "run-good" in r.output
    assert "held-out test rows" in r.output
    manifest = json.loads((out / "e1" / "manifest.json").read_text())
    # the ensemble against its best member on OOF, with the paired bootstrap interval, printed and kept
    from core.scoring.significance import PairedDiff, describe

    assert "ensemble - best member on OOF" in r.output
    for t in ("1", "2", "3"):
        v = manifest["tasks"][t]["vs_best"]
        d = PairedDiff(**{k: v[k] for k in PairedDiff.__dataclass_fields__})
        assert f"T{t} vs {v['member']}: {describe(d)}" in r.output
        assert v["b"] == pytest.approx(manifest["tasks"][t]["oof_ensemble"])
    assert [m["name"] for m in manifest["members"]] == ["run-good", "run-mid", "bm25"]
    assert set(manifest["files"]) == {"1", "2", "3"}
    for f in manifest["files"].values():
        assert file_sha256(f["path"]) == f["sha256"]
    t1 = pd.read_csv(manifest["files"]["1"]["path"])
    test = ex[ex["split"] == "test"]
    assert list(t1.columns) == ["query_id", "product_id"] and len(t1) == len(test)
    assert set(t1["query_id"]) == set(test["query_id"])
    rec = list(RunStore(store.path).db.query("SELECT name, tasks, dir FROM ensembles"))
    assert rec == [{"name": "e1", "tasks": "1,2,3", "dir": str(out / "e1")}]
    # the validator accepts the Task 2 file against an official-layout examples file
    ex.to_parquet(root / "examples.parquet", index=False)
    v = CliRunner().invoke(
        app,
        [
            "submission",
            "validate",
            manifest["files"]["2"]["path"],
            "--task",
            "2",
            "--examples",
            str(root / "examples.parquet"),
        ],
        catch_exceptions=False,
    )
    assert v.exit_code == 0 and "valid Task 2 submission" in v.output


def test_cli_build_errors_exit_2_one_line(fake_store, monkeypatch, capsys):
    import sys

    from workbench.cli import main

    store, _, root = fake_store
    for argv, part in (
        (["--runs", "run-good", "--weights", "1,2"], "1 member(s)"),
        (["--runs", "run-good", "--task", "4"], "--task"),
        (["--runs", "nope"], "no run nope"),
    ):
        monkeypatch.setattr(
            sys, "argv", ["workbench", "ensemble", "build", *argv, "--db", store.path, "--out", str(root / "subs")]
        )
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert part in err and len(err.splitlines()) == 1, err
    assert not (root / "subs").exists()


def test_ndcg_evaluator_exact_on_near_ties_and_inf(sample_frames):
    """Scores that differ by less than the scaled key's resolution fall back to the exact sort."""
    ex = sample_frames[0]
    q, lab = ex["query_id"].to_numpy(), ex["esci_label"]
    ev = NdcgEvaluator(q, lab)
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, len(ex)).astype(float)
    near = base + rng.integers(0, 2, len(ex)) * 1e-14  # 1e-14 apart: same scaled key, different score
    near[0] = 1e6  # a wide range makes the key coarser still
    for s in (near, np.where(base > 0, np.inf, -np.inf)):
        assert ev(s) == pytest.approx(mean_ndcg(q, s, lab), abs=1e-12)


def test_scorer_test_scores_recomputed_when_the_run_lacks_them(tmp_path, sample_frames):
    """A run whose test.parquet has no bm25 column: BM25 is recomputed on the test examples of
    the run's data.dir (official layout)."""
    from conftest import write_official
    from core.data.esci import load_esci
    from core.scoring.baselines import bm25_scores

    ex_full, pr = sample_frames
    ex = _examples(sample_frames)
    write_official(tmp_path / "data", ex_full.assign(split=ex["split"].to_numpy()), pr)
    store = RunStore(tmp_path / "runs.db")
    make_run(store, tmp_path, "run-a", ex, noise=1.0, seed=1, scorers={"bm25": _gainish})
    test_path = Path(store.get_run("run-a")["run_dir"]) / "test.parquet"
    pd.read_parquet(test_path).drop(columns="bm25").to_parquet(test_path, index=False)
    ms = load_members(store, ["run-a", "bm25"])
    got = ms.members[1].test_score
    test_df = load_esci(tmp_path / "data", split="test").set_index("example_id").loc[ms.test["example_id"]]
    assert np.allclose(got, bm25_scores(test_df.reset_index()))
    assert mean_ndcg(ms.test["query_id"], got, ms.test["esci_label"]) > 0.8  # BM25-level ranking on real queries


def test_build_that_fails_validation_writes_nothing(fake_store, sample_frames):
    """Validating against a test set the members do not cover: no file, no manifest, no record."""
    from core.scoring.ensemble import write_ensemble

    store, ex, root = fake_store
    ms = load_members(store, ["run-good", "run-mid"])
    res = build_ensemble(ms, (1, 2, 3), "equal")
    other = ex[ex["split"] == "test"].iloc[10:]  # 10 fewer test examples than predicted
    with pytest.raises(DataError, match="not in the test examples"):
        write_ensemble(res, ms, root / "subs" / "bad", "bad", store=store, examples=other)
    assert sorted(p.name for p in (root / "subs").iterdir()) == []  # no folder, no staging left
    assert store.ensembles() == []


def test_shrink_lowers_a_duplicated_run(fake_store):
    store, ex, root = fake_store
    make_run(store, root, "run-twin", ex, noise=0.8, seed=1, scorers={"bm25": _gainish})  # = run-good
    ms = load_members(store, ["run-good", "run-twin", "run-mid"])
    res = build_ensemble(ms, (1, 2), "equal", shrink=0.95)
    assert res.corr.loc["run-good", "run-twin"] == pytest.approx(1.0)
    for t in (1, 2):
        w = res.tasks[t]["weights"]
        assert w[0] == pytest.approx(w[1]) and w[0] == pytest.approx(w[2] / 2)  # the pair shares one share
