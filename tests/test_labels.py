"""Confident learning on OOF probabilities, the decision log, export and training with cleaned labels.

The fixture is the real 150-query ESCI sample with 40 training labels flipped on purpose and
OOF probabilities of an imperfect model that knows the true labels (confident on most examples,
unsure on 20%): the flipped examples must come out on top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import snapshot, write_official
from core.cleaning.labels import (
    apply_to_training,
    cleaning_plan,
    compare_runs,
    decision_log,
    effective_decisions,
    export_cleaned,
    find_issues,
    load_issues,
    record_decision,
    store_issues,
    undo_last,
)
from core.data.esci import load_esci
from core.errors import ConfigError, DataError, WorkbenchError
from core.runs.store import RunStore
from core.scoring.metrics import ESCI_LABELS

N_FLIP = 40
N_TEST_QUERIES = 10


def make_labelled_run(
    root: Path, sample_frames, n_flip: int = N_FLIP, seed: int = 0, drop_oof: int = 0
) -> tuple[RunStore, str, dict]:
    """Official-layout data (last 10 queries split=test) with ``n_flip`` training labels flipped,
    a runs.db with one finished run whose oof.parquet covers the training examples.

    Returns (store, run_id, info) with info = {data_dir, flipped ids, true labels, test ids}."""
    ex, pr = sample_frames
    ex = ex.copy()
    rng = np.random.default_rng(seed)
    qids = sorted(ex["query_id"].unique())
    ex.loc[ex["query_id"].isin(qids[-N_TEST_QUERIES:]), "split"] = "test"
    true = ex["esci_label"].to_numpy().copy()
    train_rows = np.flatnonzero((ex["split"] == "train").to_numpy())
    flip_rows = rng.choice(train_rows, n_flip, replace=False)
    given = true.copy()
    for r in flip_rows:
        given[r] = rng.choice([lab for lab in ESCI_LABELS if lab != true[r]])
    ex["esci_label"] = given
    data_dir = write_official(root / "data", ex, pr)

    # an imperfect model that knows the true labels: confident on 80%, unsure on 20%
    tr = ex.iloc[train_rows]
    n = len(tr)
    onehot = np.eye(4)[pd.Series(true[train_rows]).map({label: i for i, label in enumerate(ESCI_LABELS)}).to_numpy()]
    conf = rng.uniform(0.55, 0.95, size=(n, 1))
    probs = conf * onehot + (1 - conf) * rng.dirichlet(np.ones(4), size=n)
    unsure = rng.random(n) < 0.2
    probs[unsure] = 0.5 * probs[unsure] + 0.5 * rng.dirichlet(np.ones(4), size=int(unsure.sum()))
    oof = pd.DataFrame(
        {
            "example_id": tr["example_id"].to_numpy(),
            "query_id": tr["query_id"].to_numpy(),
            "esci_label": given[train_rows],
            "fold": tr["query_id"].to_numpy() % 5,
        }
    )
    oof[["p_E", "p_S", "p_C", "p_I"]] = probs.astype(np.float32)
    oof["score"] = probs @ np.array([1.0, 0.1, 0.01, 0.0])
    if drop_oof:
        oof = oof.iloc[drop_oof:]
    store = RunStore(root / "runs.db")
    cfg = {"name": "fixture", "data": {"dir": str(data_dir), "task": 1}}
    run_dir = root / "runs" / "r1"
    run_dir.mkdir(parents=True)
    run_id = store.create_run("fixture", cfg, run_dir=str(run_dir), run_id="20260101-000000-aaaa", status="finished")
    oof.to_parquet(run_dir / "oof.parquet", index=False)
    store.add_artifact(run_id, "oof", run_dir / "oof.parquet")
    info = {
        "data_dir": data_dir,
        "flipped": set(ex["example_id"].to_numpy()[flip_rows].tolist()),
        "true": dict(zip(ex["example_id"], true)),
        "test_ids": set(ex.loc[ex["split"] == "test", "example_id"].tolist()),
        "n_train": len(train_rows),
    }
    return store, run_id, info


@pytest.fixture
def labelled(tmp_path, sample_frames):
    return make_labelled_run(tmp_path, sample_frames)


# --------------------------------------------------------------------------- find
def test_flipped_labels_rank_at_the_top_and_are_stored(labelled):
    store, run_id, info = labelled
    res = find_issues(store, run_id)
    flagged = set(res.issues["example_id"])
    caught = flagged & info["flipped"]
    assert len(caught) >= 0.8 * N_FLIP  # recall (the rest fell among the model's unsure examples)
    assert len(caught) >= 0.8 * len(flagged)  # precision
    assert set(res.issues["example_id"].head(len(caught))) == caught  # the flipped ones rank first
    # the suggestion of a flipped example is mostly its true label
    flipped = res.issues[res.issues["example_id"].isin(info["flipped"])]
    assert (flipped["suggested_label"] == flipped["example_id"].map(info["true"])).mean() >= 0.9
    # ranked by label quality; stored exactly
    assert np.all(np.diff(res.issues["label_quality"].to_numpy()) >= 0)
    stored = load_issues(store, run_id)
    assert stored["example_id"].tolist() == res.issues["example_id"].tolist()
    assert stored["rank"].tolist() == list(range(1, len(res.issues) + 1))
    assert res.crosstab.to_numpy().sum() == len(res.issues)
    assert np.all(np.diag(res.crosstab.to_numpy()) == 0)  # an issue's suggestion differs from its label here
    assert res.n_examples == info["n_train"]
    # a second find replaces, not duplicates
    find_issues(store, run_id)
    assert len(load_issues(store, run_id)) == len(res.issues)


def test_other_filter_and_rank_methods_are_selectable(labelled):
    store, run_id, _ = labelled
    res = find_issues(store, run_id, filter_by="predicted_neq_given", rank_by="normalized_margin")
    oof = pd.read_parquet(Path(store.get_run(run_id)["run_dir"]) / "oof.parquet")
    argmax = np.asarray(ESCI_LABELS)[oof[["p_E", "p_S", "p_C", "p_I"]].to_numpy().argmax(1)]
    assert set(res.issues["example_id"]) == set(oof.loc[argmax != oof["esci_label"].to_numpy(), "example_id"])
    with pytest.raises(ConfigError, match="filter_by"):
        find_issues(store, run_id, filter_by="nonsense")


def test_refuses_when_a_training_example_has_no_oof(tmp_path, sample_frames):
    store, run_id, _ = make_labelled_run(tmp_path, sample_frames, drop_oof=3)
    with pytest.raises(WorkbenchError, match="3 of .* training examples have no OOF probabilities") as info:
        find_issues(store, run_id)
    assert "\n" not in str(info.value)
    assert load_issues(store, run_id).empty


def test_unknown_run_and_broken_oof(labelled):
    store, run_id, _ = labelled
    with pytest.raises(WorkbenchError, match="no run nope"):
        find_issues(store, "nope")
    path = Path(store.get_run(run_id)["run_dir"]) / "oof.parquet"
    df = pd.read_parquet(path)
    df.loc[5, "p_S"] = np.nan
    df.to_parquet(path)
    with pytest.raises(DataError, match="1 rows with missing OOF probabilities"):
        find_issues(store, run_id)
    df.loc[5, "p_S"] = 0.1
    df["esci_label"] = df["esci_label"].astype(object)
    df.loc[7, "esci_label"] = "exact"
    df.to_parquet(path)
    with pytest.raises(DataError, match=r"unknown esci_label values \['exact'\]"):
        find_issues(store, run_id)


# --------------------------------------------------------------------------- decisions
def test_decisions_are_appended_undo_and_resume_across_connections(labelled):
    store, run_id, _ = labelled
    record_decision(store, run_id, 11, "relabel", "S", reviewer="ann")
    record_decision(store, run_id, 12, "drop", reviewer="ann")
    record_decision(store, run_id, 11, "keep", reviewer="ann")  # a second thought on 11
    assert undo_last(store, run_id, reviewer="ann")["decision"] == "keep"  # back to relabel S
    store.close()

    again = RunStore(store.path)  # a new process / app restart
    eff = effective_decisions(again, run_id).set_index("example_id")
    assert eff.loc[11, "decision"] == "relabel" and eff.loc[11, "new_label"] == "S"
    assert eff.loc[12, "decision"] == "drop"
    log = decision_log(again, run_id)
    assert log["decision"].tolist() == ["relabel", "drop", "keep", "undo"]  # nothing overwritten
    assert set(log.columns) >= {"example_id", "decision", "new_label", "reviewer", "time", "source_run"}
    assert undo_last(again, run_id)["example_id"] == 12
    assert undo_last(again, run_id)["example_id"] == 11
    assert undo_last(again, run_id) is None
    assert effective_decisions(again, run_id).empty
    with pytest.raises(WorkbenchError, match="new_label"):
        record_decision(again, run_id, 1, "relabel", "X")


# --------------------------------------------------------------------------- export
def test_export_matches_decisions_and_never_touches_test_rows(labelled, tmp_path):
    store, run_id, info = labelled
    test_id = min(info["test_ids"])
    train_ids = sorted(set(info["true"]) - info["test_ids"])
    record_decision(store, run_id, train_ids[0], "drop")
    record_decision(store, run_id, train_ids[1], "relabel", "C")
    record_decision(store, run_id, train_ids[2], "accept", "I")
    record_decision(store, run_id, train_ids[3], "keep")
    record_decision(store, run_id, train_ids[4], "drop")
    undo_last(store, run_id)  # the drop of train_ids[4] is undone
    record_decision(store, run_id, test_id, "drop")  # must be ignored: test rows are never touched
    record_decision(store, run_id, max(info["test_ids"]), "relabel", "C")

    out = tmp_path / "clean"
    counts = export_cleaned(store, out, info["data_dir"], decisions_from=run_id)
    src = pd.read_parquet(info["data_dir"] / "shopping_queries_dataset_examples.parquet").set_index("example_id")
    got = pd.read_parquet(out / "shopping_queries_dataset_examples.parquet").set_index("example_id")
    assert counts == {"examples": len(src) - 1, "dropped": 1, "relabelled": 2}
    assert train_ids[0] not in got.index and train_ids[4] in got.index
    assert got.loc[train_ids[1], "esci_label"] == "C" and got.loc[train_ids[2], "esci_label"] == "I"
    assert (got["original_esci_label"] == src.loc[got.index, "esci_label"]).all()
    changed = got.index[got["esci_label"] != got["original_esci_label"]]
    assert sorted(changed) == sorted(i for i in train_ids[1:3] if src.loc[i, "esci_label"] != got.loc[i, "esci_label"])
    test_rows = got[got["split"] == "test"]
    assert len(test_rows) == len(info["test_ids"])
    assert (test_rows["esci_label"] == test_rows["original_esci_label"]).all()
    assert list(got.columns) == [*src.columns, "original_esci_label"]
    # the export is a valid release: the loader reads it
    df = load_esci(out)
    assert len(df) == len(src) - 1


def test_export_refuses_a_non_empty_folder_and_writes_nothing(labelled, tmp_path):
    store, run_id, info = labelled
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="not empty"):
        export_cleaned(store, out, info["data_dir"], decisions_from=run_id)
    assert snapshot(tmp_path) == before


def test_export_auto_drop_takes_the_top_issues(labelled, tmp_path):
    store, run_id, info = labelled
    res = find_issues(store, run_id)
    counts = export_cleaned(
        store, tmp_path / "auto", info["data_dir"], decisions_from=None, auto_drop_fraction=0.003, issues_run=run_id
    )
    n = round(0.003 * info["n_train"])
    assert 0 < n < len(res.issues) and counts["dropped"] == n
    got = pd.read_parquet(tmp_path / "auto" / "shopping_queries_dataset_examples.parquet")
    assert not set(res.issues["example_id"].head(n)) & set(got["example_id"])
    assert set(res.issues["example_id"].iloc[n:]) <= set(got["example_id"])
    # never more than the issues found
    counts = export_cleaned(
        store, tmp_path / "all", info["data_dir"], decisions_from=None, auto_drop_fraction=0.5, issues_run=run_id
    )
    assert counts["dropped"] == len(res.issues)


# --------------------------------------------------------------------------- apply to training
def test_apply_to_training_touches_only_training_rows(labelled):
    from core.config import LabelsConfig

    store, run_id, info = labelled
    df = load_esci(info["data_dir"])
    mask, labels, summary = apply_to_training(df, LabelsConfig(), None)  # defaults: off
    assert mask.all() and (labels == df["esci_label"].to_numpy()).all()

    test_id = min(info["test_ids"])
    train_id = int(df.loc[df["split"] == "train", "example_id"].iloc[0])
    # issues that include a test example: the automatic drop must skip it
    store_issues(
        store,
        run_id,
        pd.DataFrame(
            {
                "run_id": run_id,
                "example_id": [test_id, train_id],
                "given_label": "E",
                "suggested_label": "I",
                "label_quality": [0.01, 0.02],
                "rank": [1, 2],
            }
        ),
    )
    record_decision(store, run_id, test_id, "relabel", "C")
    cfg = LabelsConfig(decisions_from=run_id, auto_drop_fraction=0.5, issues_run=run_id)
    mask, labels, summary = apply_to_training(df, cfg, store)
    is_test = (df["split"] == "test").to_numpy()
    assert mask[is_test].all() and (labels[is_test] == df["esci_label"].to_numpy()[is_test]).all()
    assert not mask[(df["example_id"] == train_id).to_numpy()].any()
    assert "dropped 1 of" in summary and "relabelled 0" in summary

    with pytest.raises(ConfigError, match="issues_run"):
        cleaning_plan(store, auto_drop_fraction=0.04, n_train=100)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        cleaning_plan(store, auto_drop_fraction=1.5, issues_run=run_id, n_train=100)


def test_training_drops_rows_from_fitting_but_scores_them_out_of_fold(tmp_path, small_dataset, tiny_bert, monkeypatch):
    import core.training.fold_loop as fold_loop
    import core.training.train as train_mod
    from test_train import tiny_config

    store = RunStore(tmp_path / "runs.db")
    df = load_esci(small_dataset)
    tr = df[df["split"] == "train"]
    src = store.create_run("issues", {"data": {"dir": str(small_dataset)}}, status="finished")
    drop_ids = tr["example_id"].iloc[::7].tolist()[:40]
    store_issues(
        store,
        src,
        pd.DataFrame(
            {
                "run_id": src,
                "example_id": drop_ids,
                "given_label": "E",
                "suggested_label": "I",
                "label_quality": np.linspace(0, 0.1, len(drop_ids)),
                "rank": range(1, len(drop_ids) + 1),
            }
        ),
    )
    relabel_id = int(tr["example_id"].iloc[1])
    new_label = "I" if tr["esci_label"].iloc[1] != "I" else "E"
    record_decision(store, src, relabel_id, "relabel", new_label)
    seen: list[np.ndarray] = []

    class Recording(fold_loop.LengthGroupedBatchSampler):
        def __init__(self, indices, *a, **k):
            seen.append(np.asarray(indices))
            super().__init__(indices, *a, **k)

    monkeypatch.setattr(fold_loop, "LengthGroupedBatchSampler", Recording)
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert, run_folds=[0], save_checkpoints=False)
    cfg.blend.members = []
    cfg.labels.decisions_from = src
    cfg.labels.auto_drop_fraction = len(drop_ids) / len(tr)
    result = train_mod.run_training(cfg, store)
    fitted_ids = set(df["example_id"].to_numpy()[np.concatenate(seen)])
    assert not fitted_ids & set(drop_ids)
    assert not fitted_ids & set(df.loc[df["split"] == "test", "example_id"])
    # the dropped examples of fold 0 are still scored out-of-fold, on their original labels
    oof = result.oof.set_index("example_id")
    fold0_dropped = [i for i in drop_ids if i in oof.index]
    assert fold0_dropped and oof.loc[fold0_dropped, ["p_E", "p_S", "p_C", "p_I"]].notna().all().all()
    assert (oof["esci_label"] == tr.set_index("example_id").loc[oof.index, "esci_label"]).all()
    log = (result.run_dir / "train.log").read_text()
    assert f"dropped {len(drop_ids)} of {len(tr)} training examples" in log
    assert relabel_id not in drop_ids and "relabelled 1;" in log


# --------------------------------------------------------------------------- CLI
def test_cli_find_and_export(labelled, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from workbench.cli import app
    from workbench.cli import labels as cli_labels

    monkeypatch.setattr(cli_labels.console, "width", 120)
    store, run_id, info = labelled
    db = store.path
    runner = CliRunner()
    res = runner.invoke(app, ["labels", "find", run_id[:10], "--db", db])
    assert res.exit_code == 0, res.output
    issues = load_issues(store, run_id)
    share = 100 * len(issues) / info["n_train"]
    assert f"{len(issues):,} label issues in {info['n_train']:,} OOF examples ({share:.1f}%)" in res.output
    for lab in ESCI_LABELS:  # the given-vs-suggested table: one row per class with its total
        n = int((issues["given_label"] == lab).sum())
        assert any(line.split()[:1] == [lab] and line.split()[-1] == f"{n:,}" for line in res.output.splitlines())
    record_decision(store, run_id, int(issues["example_id"].iloc[0]), "drop")
    res = runner.invoke(app, ["labels", "export", str(tmp_path / "out"), "--db", db])  # default: newest run with issues
    assert res.exit_code == 0, res.output
    assert "1 dropped, 0 relabelled" in res.output
    got = pd.read_parquet(tmp_path / "out" / "shopping_queries_dataset_examples.parquet")
    assert int(issues["example_id"].iloc[0]) not in set(got["example_id"])


def test_cli_errors_are_one_line_with_exit_2(labelled, tmp_path, monkeypatch, capsys):
    from workbench import cli

    store, run_id, _ = labelled
    for args in (
        ["labels", "find", "nope", "--db", store.path],
        ["labels", "find", run_id, "--filter-by", "bogus", "--db", store.path],
        ["labels", "review", "--db", str(tmp_path / "empty.db")],
        ["labels", "export", str(tmp_path / "x"), "--db", str(tmp_path / "empty.db")],
    ):
        monkeypatch.setattr("sys.argv", ["workbench", *args])
        with pytest.raises(SystemExit) as info:
            cli.main()
        assert info.value.code == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert not (tmp_path / "x").exists()


def test_compare_runs_on_original_labels(labelled, tmp_path):
    from core.scoring.metrics import mean_ndcg

    store, run_id, info = labelled
    base = pd.read_parquet(Path(store.get_run(run_id)["run_dir"]) / "oof.parquet")
    other = base.copy()
    rng = np.random.default_rng(1)
    other["score"] = rng.random(len(other))  # a different ranking on the same examples and folds
    run_dir = tmp_path / "runs" / "r2"
    run_dir.mkdir(parents=True)
    other.to_parquet(run_dir / "oof.parquet", index=False)
    r2 = store.create_run("other", {}, run_dir=str(run_dir), status="finished")
    store.add_artifact(r2, "oof", run_dir / "oof.parquet")
    t = compare_runs(store, run_id, r2)
    qids, labels = base["query_id"].to_numpy(), base["esci_label"].to_numpy()
    want_base = mean_ndcg(qids, base["score"].to_numpy(), labels)
    want_other = mean_ndcg(qids, other["score"].to_numpy(), labels)
    assert t.loc[(f"base {run_id}", "final"), "cv_ndcg"] == pytest.approx(want_base)
    assert t.loc[("cleaned - base", "final"), "cv_ndcg"] == pytest.approx(want_other - want_base)
    f0 = base["fold"].to_numpy() == 0
    assert t.loc[("cleaned - base", "final"), "fold0"] == pytest.approx(
        mean_ndcg(qids[f0], other["score"].to_numpy()[f0], labels[f0])
        - mean_ndcg(qids[f0], base["score"].to_numpy()[f0], labels[f0])
    )
    other["fold"] = (other["fold"] + 1) % 5  # different folds: not comparable
    other.to_parquet(run_dir / "oof.parquet", index=False)
    with pytest.raises(WorkbenchError, match="differ in fold"):
        compare_runs(store, run_id, r2)
    other["fold"] = base["fold"]
    other.to_parquet(run_dir / "oof.parquet", index=False)
    from typer.testing import CliRunner

    from workbench.cli import app

    res = CliRunner().invoke(app, ["labels", "compare", run_id, r2, "--db", store.path])
    assert res.exit_code == 0, res.output
    diff_line = next(line for line in res.output.splitlines() if line.strip().startswith("diff") and "final" in line)
    assert f"{t.loc[('cleaned - base', 'final'), 'cv_ndcg']:+.4f}" in diff_line
    # every difference with its paired bootstrap interval over the queries, equal to the table's diff
    from core.scoring.significance import describe, f1_diff, ndcg_diff

    t = compare_runs(store, run_id, r2)
    diffs = t.attrs["differences"]
    assert diffs[("final", "cv_ndcg")] == ndcg_diff(base, other, what=f"runs {run_id} and {r2}")
    for key, d in diffs.items():
        assert d.diff == pytest.approx(t.loc[("cleaned - base", key[0]), key[1]], abs=1e-12), key
        assert d.n_resamples == 2000 and d.seed == 0 and d.low <= d.high
    assert diffs[("cross-encoder", "task3_f1")] == f1_diff(base, other, task=3)
    assert not diffs[("final", "cv_ndcg")].within_noise  # random scores against the run's own: clearly worse
    assert compare_runs(store, run_id, r2, n_resamples=None).attrs["differences"] == {}
    lines = res.output.splitlines()
    assert all(len(line) <= 80 for line in lines), res.output
    final = next(line for line in lines if line.strip().startswith("nDCG final"))
    assert describe(diffs[("final", "cv_ndcg")]) in final
    t2 = next(line for line in lines if line.strip().startswith("Task 2 micro-F1"))
    assert describe(diffs[("cross-encoder", "task2_f1")]) in t2 and "within noise" in t2  # the same probabilities
    assert "2,000 resamples of queries, seed 0" in " ".join(res.output.split())
