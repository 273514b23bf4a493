"""The LightGBM stacker (core.scoring.stack, ``workbench stack``) on real sample queries with
synthetic member runs whose quality is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import sample_subset
from core.config import StackConfig, build_section
from core.errors import ConfigError, WorkbenchError
from core.runs.store import RunStore
from core.scoring.metrics import expected_gain, mean_ndcg
from core.scoring.report import PROB_COLUMNS, read_predictions
from core.scoring.stack import FEATURE_GROUPS, build_features, load_stack_data, record_stack, run_stack

N_FOLDS = 4
FAST = {"seeds": 1, "n_estimators": 60, "early_stopping_rounds": 0, "min_child_samples": 20, "task2_bias": False}


@pytest.fixture(scope="module")
def stack_data_dir(tmp_path_factory, sample_frames) -> Path:
    """48 real queries: 36 in split train (4 query-grouped folds), 12 in split test (labelled)."""
    return sample_subset(tmp_path_factory.mktemp("stack_data"), sample_frames, 48, 12)


def _probs(labels: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 4) probabilities: logits N(0, 1) plus ``strength`` on the true class."""
    logits = rng.normal(0.0, 1.0, (len(labels), 4))
    logits[np.arange(len(labels)), ["ESCI".index(c) for c in labels]] += strength
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def member_run(store: RunStore, root: Path, data_dir: Path, strength: float, seed: int, name: str = "m") -> str:
    """A finished training run on ``data_dir``: OOF (folds by query id), fold-averaged test and
    per-fold test predictions, each fold model of quality ``strength``."""
    ex = pd.read_parquet(data_dir / "shopping_queries_dataset_examples.parquet")
    rng = np.random.default_rng(seed)
    tr, te = ex[ex["split"] == "train"], ex[ex["split"] == "test"]
    cols = ["example_id", "query_id", "product_id", "esci_label"]
    oof = tr[cols].reset_index(drop=True)
    oof["fold"] = oof["query_id"] % N_FOLDS
    oof[PROB_COLUMNS] = _probs(oof["esci_label"].to_numpy(), strength, rng)
    oof["score"] = oof["ce_score"] = expected_gain(oof[PROB_COLUMNS].to_numpy())
    config = {"data": {"dir": str(data_dir), "task": 1}, "train": {"folds": N_FOLDS}, "model": {"name": "x"}}
    rid = store.create_run(name, config, status="finished")
    run_dir = root / "runs" / rid
    test_probs = []
    for k in range(N_FOLDS):
        (run_dir / f"fold{k}").mkdir(parents=True)
        t = te[["example_id"]].reset_index(drop=True)
        t[PROB_COLUMNS] = _probs(te["esci_label"].to_numpy(), strength, rng)
        t.to_parquet(run_dir / f"fold{k}" / "test.parquet", index=False)
        test_probs.append(t[PROB_COLUMNS].to_numpy())
    test = te[cols].reset_index(drop=True)
    test["fold"] = -1
    test[PROB_COLUMNS] = np.mean(test_probs, axis=0)
    test["score"] = test["ce_score"] = expected_gain(test[PROB_COLUMNS].to_numpy())
    oof.to_parquet(run_dir / "oof.parquet", index=False)
    test.to_parquet(run_dir / "test.parquet", index=False)
    store.update_run(rid, run_dir=str(run_dir))
    return rid


@pytest.fixture()
def members(tmp_path, stack_data_dir):
    store = RunStore(tmp_path / "runs.db")
    strong = member_run(store, tmp_path, stack_data_dir, 1.5, seed=1, name="strong")
    weak = member_run(store, tmp_path, stack_data_dir, 0.3, seed=2, name="weak")
    return store, [strong, weak]


def _cfg(**over) -> StackConfig:
    return build_section(StackConfig, {**FAST, **over}, "stack.")


def test_fold_k_is_scored_by_a_stacker_that_never_saw_fold_k(members, tmp_path):
    """Permuting the labels of fold 0's rows leaves fold 0's OOF scores bit-identical (its stacker,
    its base blend and its Task 2 prior shift were fitted without fold 0's labels, even indirectly)
    and changes the other folds' scores (their stackers read fold 0)."""
    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    cfg = _cfg(task2_bias=True)
    ref = run_stack(data, cfg)
    fold = data.oof["fold"].to_numpy()
    rng = np.random.default_rng(0)
    lab = data.oof["esci_label"].to_numpy().copy()
    lab[fold == 0] = rng.permutation(lab[fold == 0])
    data.oof["esci_label"] = lab
    moved = run_stack(data, cfg)
    for col in ("score", "p_E", "p_substitute"):
        np.testing.assert_array_equal(ref.oof[col].to_numpy()[fold == 0], moved.oof[col].to_numpy()[fold == 0])
        assert not np.array_equal(ref.oof[col].to_numpy()[fold != 0], moved.oof[col].to_numpy()[fold != 0])


def test_stack_learns_the_strong_member_and_beats_the_weak_one(members, tmp_path):
    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    res = run_stack(data, _cfg())
    q, lab = data.oof["query_id"].to_numpy(), data.oof["esci_label"].to_numpy()
    weak = mean_ndcg(q, expected_gain(data.members[1].oof), lab)
    assert res.cv["ndcg"] > weak + 0.02
    assert res.cv["ndcg"] == pytest.approx(mean_ndcg(q, res.oof["score"].to_numpy(), lab))
    assert res.held_out["ndcg"] > res.members["m1"]["held_out_ndcg"]
    # Task 2: the strong member puts +1.5 logits on the true class; the stacker's argmax beats the majority class
    assert res.cv["task2_f1"] > res.cv["majority_f1"]
    top = res.importance[res.importance["task"] == "rank"].iloc[0]["feature"]
    assert top.startswith("m0."), top  # the strong member carries the ranking
    np.testing.assert_allclose(res.oof[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-5)


def test_a_perfect_member_gives_a_perfect_ranking(tmp_path, stack_data_dir):
    """LambdaRank with the official gains (label_gain) reproduces the ideal order of a member whose
    probabilities are the true labels: OOF nDCG 1 by the project's metric."""
    store = RunStore(tmp_path / "runs.db")
    rid = member_run(store, tmp_path, stack_data_dir, 50.0, seed=3)
    data = load_stack_data(store, [rid], [], tmp_path / "cache")
    res = run_stack(data, _cfg(features=["members"]))
    assert res.cv["ndcg"] > 0.999  # ties inside a leaf may swap an S and a C row (0.01-0.1 gain)
    assert res.cv["task2_f1"] == pytest.approx(1.0)


def test_feature_groups_switch_columns(members, tmp_path):
    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    probs = [(m.name, m.oof) for m in data.members]
    scores = {k: v[0] for k, v in data.scorers.items()}
    full, mono = build_features(data.oof, probs, scores, list(FEATURE_GROUPS))
    assert {"m0.p_E", "m0.eg_z", "m0.p_E_qmedian", "query.words", "lex.query_title_overlap", "bm25_rank"} <= set(full)
    assert mono["m0.eg"] == 1 and mono["bm25_z"] == 1 and mono["m0.p_E"] == 0
    only = build_features(data.oof, probs, scores, ["members"])[0]
    assert all(c.startswith(("m0.", "m1.")) for c in only.columns)
    no_lex = build_features(data.oof, probs, scores, [g for g in FEATURE_GROUPS if g != "lexical"])[0]
    assert not any(c.startswith(("lex.", "bm25")) for c in no_lex.columns)
    # group statistics are per query: constant within a query, the true min/max of the member
    q = data.oof["query_id"].to_numpy()
    first = q == q[0]
    assert full.loc[first, "m0.p_E_qmax"].nunique() == 1
    assert full.loc[first, "m0.p_E_qmax"].iloc[0] == pytest.approx(data.members[0].oof[first, 0].max())


def test_per_fold_test_features_use_each_fold_model(members, tmp_path):
    """per_fold: fold k's stacker scores the test rows from fold k's own model, so changing one
    fold model's test file changes the test scores; mean: only the fold-averaged file counts."""
    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    a = run_stack(data, _cfg())
    data.members[0].test_by_fold[2] = data.members[0].test_by_fold[2][::-1].copy()
    b = run_stack(data, _cfg())
    assert not np.allclose(a.test["score"], b.test["score"])
    m1 = run_stack(data, _cfg(test_features="mean"))
    data.members[0].test_by_fold[1] = data.members[0].test_by_fold[1][::-1].copy()
    m2 = run_stack(data, _cfg(test_features="mean"))
    np.testing.assert_array_equal(m1.test["score"], m2.test["score"])


def test_record_stack_is_a_run_that_ensemble_and_reports_read(members, tmp_path, monkeypatch):
    from core.scoring.ensemble import load_members

    monkeypatch.chdir(tmp_path)
    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    run_id, res = record_stack(store, data, _cfg(), name="stk")
    rec = store.get_record(run_id)
    assert rec.status == "finished" and rec.kind == "stack" and rec.config["members"] == runs
    oof = read_predictions(rec.run_dir / "oof.parquet")
    assert oof["example_id"].tolist() == data.oof["example_id"].tolist()
    assert read_predictions(rec.run_dir / "test.parquet")["example_id"].tolist() == data.test["example_id"].tolist()
    imp = pd.read_csv(rec.run_dir / "feature_importance.csv")
    assert set(imp["task"]) == {"rank", "esci", "substitute"}
    assert json.loads((rec.run_dir / "stack_report.json").read_text())["cv"]["ndcg"] == pytest.approx(res.cv["ndcg"])
    best = store.best_values([run_id])[run_id]
    assert best["final_ndcg"] == pytest.approx(res.cv["ndcg"])
    ms = load_members(store, [run_id, runs[0]])  # the stack run is an ensemble member like a training run
    assert len(ms.members) == 2


def test_refusals_create_no_run(members, tmp_path, stack_data_dir):
    store, runs = members
    n0 = len(store.list_runs())
    with pytest.raises(WorkbenchError, match="given twice"):
        load_stack_data(store, [runs[0], runs[0]], [], tmp_path / "c")
    with pytest.raises(ConfigError, match="unknown scorer"):
        load_stack_data(store, runs, ["bm26"], tmp_path / "c")
    other = member_run(store, tmp_path, stack_data_dir, 1.0, seed=5)
    oof = pd.read_parquet(store.get_record(other).run_dir / "oof.parquet")
    oof["fold"] = (oof["fold"] + 1) % N_FOLDS
    oof.to_parquet(store.get_record(other).run_dir / "oof.parquet", index=False)
    with pytest.raises(WorkbenchError, match="folds differ"):
        load_stack_data(store, [runs[0], other], [], tmp_path / "c")
    with pytest.raises(ConfigError, match="unknown value"):
        build_section(StackConfig, {"features": ["members", "colour"]}, "stack.")
    assert len(store.list_runs()) == n0 + 1  # only the member made above
    assert not any(r["config"] and '"kind": "stack"' in r["config"] for r in store.list_runs())


def test_cli_stack_prints_figures_and_importance(members, tmp_path, monkeypatch):
    import importlib

    from workbench.cli import app

    stack_cli = importlib.import_module("workbench.cli.stack")  # `workbench.cli.stack` is also the command

    monkeypatch.chdir(tmp_path)
    stack_cli.console.width = 120
    store, runs = members
    args = ["stack", "--db", str(store.path), "--scorers", "bm25", "--top", "5"]
    for r in runs:
        args += ["--runs", r]
    for k, v in FAST.items():
        args += ["--set", f"stack.{k}={v}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "rank model: feature gain" in res.output and "held-out" in res.output
    bad = CliRunner().invoke(app, ["stack", "--db", str(store.path), "--runs", runs[0], "--set", "stack.num_leaves=1"])
    assert bad.exit_code != 0 and "stack.num_leaves=1: must be >= 2" in str(bad.exception or bad.output)


def test_stack_after_training_records_a_named_stack_run(members, tmp_path, monkeypatch):
    """A training config with ``stack.enabled`` (the demo) stacks its own run afterwards."""
    from core.config import RunConfig
    from core.scoring.stack import stack_after_training

    monkeypatch.chdir(tmp_path)
    store, runs = members
    cfg = RunConfig(name="demo-x", output_dir=str(tmp_path / "runs"))
    cfg.stack = _cfg(enabled=True, scorers=["bm25"])
    run_id, res = stack_after_training(store, runs[0], cfg)
    rec = store.get_record(run_id)
    assert rec.name == "demo-x-stack" and rec.config["members"] == [runs[0]]
    assert rec.run_dir.parent == tmp_path / "runs"
    assert set(res.scorer_oof) == {"bm25"} and len(res.scorer_oof["bm25"]) == len(res.oof)


def test_a_stack_run_is_not_relaunched_or_resumed(members, tmp_path, monkeypatch):
    from core.runs.launcher import relaunch, resume_detached

    monkeypatch.chdir(tmp_path)
    store, runs = members
    data = load_stack_data(store, runs, [], tmp_path / "cache")
    run_id, _ = record_stack(store, data, _cfg(features=["members"]), name="stk")
    with pytest.raises(WorkbenchError, match=f"stack run: nothing to relaunch.*workbench stack --runs {runs[0]}"):
        relaunch(store, run_id)
    store.update_run(run_id, status="crashed")
    with pytest.raises(WorkbenchError, match="stack run"):
        resume_detached(store, run_id)
    assert len(store.list_runs()) == 3


def test_the_ranker_boosts_from_a_blend_fitted_on_the_training_folds(members, tmp_path):
    """base: blend starts LambdaRank from a Caruana z-blend of the members fitted per fold (weights
    recorded); with no rounds to add, the ranking is that blend itself."""
    from core.scoring.blend import fit_blend_weights, standardize_per_query

    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    res = run_stack(data, _cfg(n_estimators=1, learning_rate=1e-9))
    q, lab, fold = data.oof["query_id"].to_numpy(), data.oof["esci_label"].to_numpy(), data.oof["fold"].to_numpy()
    z = np.column_stack(
        [standardize_per_query(q, expected_gain(m.oof)) for m in data.members]
        + [standardize_per_query(q, data.scorers["bm25"][0])]
    )
    for k in range(N_FOLDS):
        w = fit_blend_weights(
            q[fold != k], lab[fold != k], z[fold != k], resolution=10, method="caruana", fallback=False
        )
        assert list(res.rounds["base_weights"][k].values()) == pytest.approx(list(w))
        np.testing.assert_allclose(
            res.oof["score"][fold == k], standardize_per_query(q[fold == k], z[fold == k] @ w), atol=1e-6
        )
    assert run_stack(data, _cfg(base="none")).rounds["base_weights"] == {}


def test_cached_scores_do_not_depend_on_row_order_and_are_computed_once(stack_data_dir, tmp_path, monkeypatch):
    from core.data.esci import load_esci
    from core.scoring import baselines
    from core.scoring.stack import cached_scores

    df = load_esci(stack_data_dir)
    first = cached_scores(None, df, tmp_path)
    np.testing.assert_allclose(first, baselines.bm25_scores(df))
    monkeypatch.setattr(baselines, "bm25_scores", lambda *a, **k: pytest.fail("recomputed instead of cached"))
    shuffled = df.sample(frac=1.0, random_state=0)
    np.testing.assert_array_equal(cached_scores(None, shuffled, tmp_path), first[shuffled.index.to_numpy()])
    assert len(list(tmp_path.glob("bm25-*.npy"))) == 1


def test_task_1_only_fits_the_ranker_and_keeps_the_members_probabilities(members, tmp_path):
    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    res = run_stack(data, _cfg(tasks=[1]))
    assert set(res.importance["task"]) == {"rank"}
    mean = np.mean([m.oof for m in data.members], axis=0)
    np.testing.assert_allclose(res.oof[PROB_COLUMNS].to_numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(res.oof["p_substitute"], mean[:, 1])
    with pytest.raises(ConfigError, match="stack.tasks"):
        _cfg(tasks=[])
    with pytest.raises(ConfigError, match="stack.tasks"):
        _cfg(tasks=[4])


def test_the_stack_run_keeps_its_members_data_selection(members, tmp_path, monkeypatch):
    """labels find / evaluate read a run's data section: the stack run carries the member's
    (max_queries, locales), so its OOF rows cover exactly the examples that section selects."""
    monkeypatch.chdir(tmp_path)
    store, runs = members
    cfg = dict(store.get_record(runs[0]).config)
    cfg["data"] = {**cfg["data"], "max_queries": 30, "locales": ["us"]}
    store.update_run(runs[0], config=json.dumps(cfg))
    data = load_stack_data(store, runs[:1], [], tmp_path / "cache")
    run_id, _ = record_stack(store, data, _cfg(features=["members"]), name="stk")
    saved = store.get_record(run_id).data
    assert saved["max_queries"] == 30 and saved["locales"] == ["us"] and saved["dir"] == data.data_dir


def test_task_2_and_3_boost_from_the_members_probabilities(tmp_path, stack_data_dir):
    """``class_base: members``: one tiny boosting round leaves the classifiers at the member's own
    probabilities (so they keep its argmax); ``class_base: none`` starts them at the class prior."""
    store = RunStore(tmp_path / "runs.db")
    rid = member_run(store, tmp_path, stack_data_dir, 1.0, seed=5, name="one")
    data = load_stack_data(store, [rid], ["bm25"], tmp_path / "cache")
    member = np.asarray(data.members[0].oof)
    tiny = {"n_estimators": 1, "learning_rate": 1e-6, "tasks": [2, 3]}
    res = run_stack(data, _cfg(**tiny), seed=0)
    np.testing.assert_allclose(res.oof[PROB_COLUMNS].to_numpy(), member, atol=1e-4)
    np.testing.assert_allclose(res.oof["p_substitute"].to_numpy(), member[:, 1], atol=1e-4)
    # the test rows: fold k's stacker from fold k's member probabilities, averaged
    want_test = np.mean([data.members[0].test_by_fold[k] for k in data.folds], axis=0)
    np.testing.assert_allclose(res.test[PROB_COLUMNS].to_numpy(), want_test, atol=1e-4)
    prior = run_stack(data, _cfg(class_base="none", **tiny), seed=0).oof[PROB_COLUMNS].to_numpy()
    fold = data.oof["fold"].to_numpy()
    for k in data.folds:  # every row of fold k at the class shares of its training folds
        assert np.ptp(prior[fold == k], axis=0).max() < 1e-3
    assert (member.argmax(1) != prior.argmax(1)).mean() > 0.2


def test_query_blocks_keep_whole_queries_within_their_row_budgets(stack_data_dir):
    from core.scoring.stack import query_blocks

    ex = pd.read_parquet(stack_data_dir / "shopping_queries_dataset_examples.parquet")
    q = ex["query_id"].to_numpy()
    block = query_blocks(q, (600, 150), seed=7)
    per_query = pd.DataFrame({"q": q, "b": block}).groupby("q")["b"].nunique()
    assert (per_query == 1).all()  # a query is never split between blocks
    assert 0 < (block == 0).sum() <= 600 and 0 < (block == 1).sum() <= 150
    assert (block == -1).sum() == len(q) - (block >= 0).sum() > 0
    # the next query in the order would not have fitted: block 0 is filled as far as whole queries allow
    sizes = pd.Series(q).value_counts()
    assert (block == 0).sum() + sizes.min() > 600 or (block == 1).any()
    np.testing.assert_array_equal(block, query_blocks(q, (600, 150), seed=7))
    assert not np.array_equal(block, query_blocks(q, (600, 150), seed=8))
    # a budget below one query still keeps two queries to fit on
    tiny = query_blocks(q, (1,), seed=0)
    assert len(np.unique(q[tiny == 0])) == 2 and (tiny == -1).any()


def test_fits_at_scale_use_at_most_max_fit_rows_per_seed_and_no_refit(members, tmp_path, monkeypatch):
    """Above ``max_fit_rows`` each seed trains once on its own query draw, stopping early on other queries."""
    import lightgbm as lgb

    from core.scoring.stack import fit_stacker

    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    X, mono = build_features(data.oof, [(m.name, m.oof) for m in data.members], {}, ["members"])
    q, lab = data.oof["query_id"].to_numpy(), data.oof["esci_label"].to_numpy()
    seen: list[tuple[int, int]] = []
    train = lgb.train

    def spy(params, train_set, *a, **kw):
        valid = kw.get("valid_sets") or []
        seen.append((len(train_set.label), sum(len(v.label) for v in valid)))
        return train(params, train_set, *a, **kw)

    monkeypatch.setattr(lgb, "train", spy)
    cap = len(q) // 3
    cfg = _cfg(seeds=3, seeds_at_scale=2, max_fit_rows=cap, early_stopping_rounds=10, n_estimators=200)
    model = fit_stacker(X, lab, q, "esci", cfg, mono, seed=0)
    assert len(seen) == 2 and len(model.boosters) == 2  # one fit per seed at scale, none refitted
    for n_fit, n_stop in seen:
        assert 0 < n_fit <= cap and 0 < n_stop <= round(cap * 0.2)
    assert all(1 <= it < 200 for it in model.best_iterations)  # early stopping picked the rounds
    probs = model.predict(X)
    assert probs.shape == (len(q), 4)
    y = np.array(["ESCI".index(c) for c in lab])
    assert (probs.argmax(1) == y).mean() > (y == np.bincount(y).argmax()).mean()  # it learnt the strong member
    seen.clear()
    assert len(fit_stacker(X, lab, q, "esci", _cfg(seeds=3, max_fit_rows=cap), mono, seed=0).boosters) == 1
    assert len(seen) == 1  # the default at scale: one seed
    # below the cap: the probe on 80 % of the queries, then a refit on every row
    seen.clear()
    fit_stacker(X, lab, q, "esci", _cfg(seeds=1, early_stopping_rounds=10), mono, seed=0)
    assert len(seen) == 2 and seen[1] == (len(q), 0) and seen[0][0] + seen[0][1] == len(q)


def test_the_stacker_loads_only_short_text_and_its_features_equal_a_full_load(members, tmp_path, stack_data_dir):
    """load_stack_data reads title/brand/colour text and the long fields' lengths only (a third of
    the memory at full size); every feature equals the one computed from fully loaded rows."""
    from core.data.esci import load_esci
    from core.scoring.baselines import DEFAULT_BM25_FIELDS
    from core.scoring.dense import DENSE_FIELDS
    from core.scoring.stack import SHORT_FIELDS, row_features

    assert set(DEFAULT_BM25_FIELDS) | set(DENSE_FIELDS) <= set(SHORT_FIELDS)
    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    assert "product_description" not in data.oof and "product_bullet_point_chars" in data.oof
    full = load_esci(stack_data_dir, task=1).set_index("example_id").loc[data.oof["example_id"]].reset_index()
    scores = {k: v[0] for k, v in data.scorers.items()}
    groups = list(FEATURE_GROUPS)
    narrow, mono_n = row_features(data.oof, scores, groups)
    wide, mono_w = row_features(full, scores, groups)
    assert narrow.keys() == wide.keys() and mono_n == mono_w
    for k in wide:
        np.testing.assert_array_equal(narrow[k], wide[k], err_msg=k)
    assert wide["lex.empty_fields"].max() >= 1  # the sample has empty long fields: the feature is not constant 0


def test_fast_word_normalisation_equals_clean_text_on_real_and_awkward_text(sample_frames):
    """_norm_words skips clean_text for plain printable titles; it must give the words the full
    cleaning gives for every real product field and query and for HTML, control, zero-width and
    Unicode whitespace."""
    from core.data.text import clean_text
    from core.scoring.stack import _norm_words, _title_words

    ex, pr = sample_frames
    texts = [*pr["product_title"], *pr["product_brand"], *pr["product_color"], *ex["query"]]
    texts += [
        "A&amp;B <b>bold</b>/red",
        "non\xa0breaking  double",
        "zero\u200bwidth\ufeff",
        "tab\there\nnew\x85line",
        "  padded  ",
        "ctrl\x07char",
        "ÉTÉ İstanbul",
        "red/blue  pack/2",
        "a / b",
        "",
        None,
        float("nan"),
    ]
    fast = 0
    for t in texts:
        assert _norm_words(t) == clean_text(t).lower().replace("/", " ").split(), repr(t)
        assert _title_words(t)[1] == (len(t.split()) if isinstance(t, str) else 0), repr(t)  # lex.title_words
        fast += isinstance(t, str) and t.isprintable() and "&" not in t and "<" not in t
    assert fast > len(texts) // 2  # most real titles take the fast path


def test_no_two_lightgbm_fits_overlap(members, tmp_path, monkeypatch):
    """The stack's LightGBM fits run one at a time: LightGBM 4.7 crashed the process (SIGSEGV)
    when one thread built a Dataset while another boosted, so no fit may start while one runs."""
    import threading

    import lightgbm as lgb

    store, runs = members
    data = load_stack_data(store, runs, ["bm25"], tmp_path / "cache")
    train, state = lgb.train, {"inside": 0, "most": 0, "calls": 0, "threads": set()}
    lock = threading.Lock()

    def spy(*a, **kw):
        with lock:
            state["inside"] += 1
            state["calls"] += 1
            state["most"] = max(state["most"], state["inside"])
            state["threads"].add(threading.get_ident())
        try:
            return train(*a, **kw)
        finally:
            with lock:
                state["inside"] -= 1

    monkeypatch.setattr(lgb, "train", spy)
    run_stack(data, _cfg(seeds=2))
    assert state["calls"] == 4 * 3 * 2  # folds x tasks x seeds
    assert state["most"] == 1 and state["threads"] == {threading.get_ident()}
