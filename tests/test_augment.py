"""Translation augmentation (``data.augment_translations``, core.data.augment): translated rows train
only in the folds that train on their source's fold, never reach OOF, test or metric rows, and a bad
file is one line before any run row or folder exists. Tiny random BERT on real ESCI queries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import expect_data_error
from core.config import config_from_dict
from core.data.augment import AUGMENT_SPLIT, check_unchanged, load_translations
from core.data.esci import load_esci
from core.errors import WorkbenchError
from core.runs.store import RunStore
from core.training import fold_loop
from core.training.train import run_training
from core.training.validate import load_training_frame


def aug_config(tmp_path, data_dir, model_dir, translations, tricks=None, **train):
    return config_from_dict(
        {
            "name": "aug",
            "output_dir": str(tmp_path / "runs"),
            "data": {"dir": str(data_dir), "augment_translations": str(translations), "max_queries": 10},
            "text": {"max_length": 32, "cache_dir": str(tmp_path / "cache")},
            "model": {"name": str(model_dir)},
            "train": {"folds": 2, "epochs": 1, "batch_size": 16, "log_every": 5, "save_checkpoints": False, **train},
            "tricks": tricks or {},
            "blend": {"members": ["bm25"]},
        }
    )


def write_translations(tmp_path, data_dir, n=24) -> tuple:
    """Translations of ``n`` training examples spread over the queries: all into ``es`` (query and
    title; one null title taken from the source), the first 5 also into ``de`` (query only)."""
    df = load_esci(data_dir)
    train = df[df["split"] == "train"]
    src = train.groupby("query_id").head(3).head(n)  # the first 8 queries (of data.max_queries=10)
    ids = src["example_id"].to_numpy()
    es = pd.DataFrame(
        {
            "example_id": ids,
            "locale": "es",
            "query": [f"consulta traducida {i}" for i in ids],
            "product_title": [f"titulo traducido {i}" for i in ids],
        }
    )
    es.loc[0, "product_title"] = None
    de = pd.DataFrame({"example_id": ids[:5], "locale": "de", "query": [f"ubersetzt {i}" for i in ids[:5]]})
    t = pd.concat([es, de], ignore_index=True)
    path = tmp_path / "translations.parquet"
    t.to_parquet(path, index=False)
    return path, t, df


@pytest.fixture
def record_folds(monkeypatch):
    """Every fold's context, validation rows and the rows of each batch it trained on."""
    seen = []
    real = fold_loop.setup_fold

    def spy(ctx, k, stage, targets, extra):
        fs = real(ctx, k, stage, targets, extra)
        batches = []
        it = type(fs.sampler).__iter__

        class Recording(type(fs.sampler)):
            def __iter__(self):
                for b in it(self):
                    batches.append(list(b))
                    yield b

        fs.sampler.__class__ = Recording
        seen.append({"ctx": ctx, "k": k, "stage": stage, "va": fs.va, "batches": batches, "targets": targets})
        return fs

    monkeypatch.setattr(fold_loop, "setup_fold", spy)
    return seen


def test_translated_rows_train_only_in_the_other_folds(tmp_path, small_dataset, tiny_bert, record_folds):
    path, t, _ = write_translations(tmp_path, small_dataset)
    store = RunStore(tmp_path / "runs.db")
    cfg = aug_config(tmp_path, small_dataset, tiny_bert, path)
    df = load_training_frame(cfg)  # the 10 training queries of data.max_queries and the test split
    result = run_training(cfg, store)
    assert store.get_run(result.run_id)["status"] == "finished"

    # OOF and test files: exactly the original examples, each once
    train_ids = df.loc[df["split"] == "train", "example_id"].to_numpy()
    test_ids = df.loc[df["split"] == "test", "example_id"].to_numpy()
    oof, test = pd.read_parquet(result.run_dir / "oof.parquet"), pd.read_parquet(result.run_dir / "test.parquet")
    assert sorted(oof["example_id"]) == sorted(train_ids) and oof["example_id"].is_unique
    assert sorted(test["example_id"]) == sorted(test_ids) and test["example_id"].is_unique
    for k in (0, 1):
        fold_oof = pd.read_parquet(result.run_dir / f"fold{k}" / "oof.parquet")
        assert fold_oof["example_id"].isin(train_ids).all() and fold_oof["example_id"].is_unique

    # the context's translated rows: after the original ones, the source's label, the file's text
    ctx = record_folds[0]["ctx"]
    n = len(df)
    assert len(ctx.df) == n + len(t) and (ctx.df["split"].iloc[n:] == AUGMENT_SPLIT).all()
    aug = ctx.df.iloc[n:]
    src = df.set_index("example_id").loc[aug["example_id"]]
    assert (aug["esci_label"].to_numpy() == src["esci_label"].to_numpy()).all()
    assert (aug["query_id"].to_numpy() == src["query_id"].to_numpy()).all()
    title_of = df.set_index("example_id")["product_title"]
    by_key = t.set_index(["example_id", "locale"])
    for row in aug.itertuples():
        want = by_key.loc[(row.example_id, row.product_locale)]
        assert row.query == want["query"]
        title = want.get("product_title")
        expect_title = title if isinstance(title, str) else title_of[row.example_id]
        assert row.product_title == expect_title  # a null or missing column: the source's text
    assert len(ctx.encoded) == len(ctx.df)  # tokenized with the rest

    # training batches: fold k trains on the translations whose source is in the other fold, only
    fold_of = dict(zip(oof["example_id"], oof["fold"]))
    aug_fold = np.array([fold_of[e] for e in aug["example_id"]])
    for rec in record_folds:
        k, rows = rec["k"], np.array([i for b in rec["batches"] for i in b])
        trained_aug = set(rows[rows >= n].tolist())
        assert trained_aug == set((n + np.flatnonzero(aug_fold != k)).tolist()), k
        assert (rec["va"] < n).all() and not set(rows) & set(rec["va"].tolist())
        # the original rows trained on: exactly the examples whose OOF fold (from oof.parquet) is not k
        trained_ids = set(ctx.df["example_id"].to_numpy()[rows[rows < n]].tolist())
        assert trained_ids == set(oof.loc[oof["fold"] != k, "example_id"].tolist()), k
    assert {rec["k"] for rec in record_folds} == {0, 1}


def test_translations_follow_label_cleaning_and_distillation(tmp_path, small_dataset, tiny_bert, record_folds):
    """Self-distillation: a translated row learns its source's soft target; a source dropped by
    label cleaning takes its translations along (fit mask from the source)."""
    from core.training import train as train_mod

    path, t, _ = write_translations(tmp_path, small_dataset, n=8)
    cfg = aug_config(tmp_path, small_dataset, tiny_bert, path, tricks={"self_distill": True})
    cfg.data.max_queries = 4  # the 8 translated examples' 3 queries and one more
    df = load_training_frame(cfg)
    cfg.blend.members = []
    run_training(cfg, RunStore(tmp_path / "runs.db"))
    final = [r for r in record_folds if r["stage"] == "final"]
    assert len(final) == 2
    ctx = final[0]["ctx"]
    for rec in final:
        tg = rec["targets"]
        np.testing.assert_array_equal(tg[ctx.aug_idx], tg[ctx.aug_source])
        assert not np.isin(tg[ctx.aug_idx].max(1), [1.0]).all()  # soft targets, not one-hot
    # label cleaning: drop the first source -> its two translations (es, de) are not trained on
    mask = np.ones(len(df), bool)
    mask[ctx.aug_source[0]] = False
    labels = df["esci_label"].to_numpy(object)
    (tmp_path / "rundir").mkdir()
    _, keep, lab, idx, source = train_mod._add_translations(cfg, df, mask, labels, tmp_path / "rundir")
    dropped = idx[source == ctx.aug_source[0]]
    assert len(dropped) == 2 and not keep[dropped].any() and keep[idx[source != ctx.aug_source[0]]].all()
    assert (lab[idx] == labels[source]).all()


def _bad_files(tmp_path, df):
    train = df.loc[df["split"] == "train", "example_id"].to_numpy()
    test = df.loc[df["split"] == "test", "example_id"].to_numpy()
    ok = {"example_id": train[:3], "locale": ["es"] * 3, "query": ["a", "b", "c"]}
    return {
        "unreadable": (b"this is not parquet", "cannot read"),
        "no example_id": (pd.DataFrame({k: v for k, v in ok.items() if k != "example_id"}), "example_id"),
        "no locale": (pd.DataFrame({k: v for k, v in ok.items() if k != "locale"}), "locale"),
        "unknown example_id": (pd.DataFrame({**ok, "example_id": [train[0], 10**9, train[1]]}), "not in"),
        "duplicate pair": (pd.DataFrame({**ok, "example_id": [train[0], train[0], train[1]]}), "duplicate"),
        "no text column": (pd.DataFrame({"example_id": train[:3], "locale": "es", "notes": "x"}), "no text column"),
        "test example": (pd.DataFrame({**ok, "example_id": [train[0], test[0], train[1]]}), "test-split"),
        "missing file": (None, "not found"),
    }


CASES = ["unreadable", "no example_id", "no locale", "unknown example_id", "duplicate pair", "no text column"]
CASES += ["test example", "missing file"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_translations_file_is_one_line_and_creates_nothing(tmp_path, small_dataset, tiny_bert, case):
    content, problem = _bad_files(tmp_path, load_esci(small_dataset))[case]
    path = tmp_path / "bad.parquet"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        content.to_parquet(path, index=False)
    store = RunStore(tmp_path / "runs.db")
    cfg = aug_config(tmp_path, small_dataset, tiny_bert, path)
    msg = expect_data_error(tmp_path, lambda: run_training(cfg, store), str(path), problem)
    assert msg.startswith(f"{path}: ")
    assert store.list_runs() == [] and not (tmp_path / "runs").exists()


def test_launch_refuses_a_bad_translations_file_before_a_run_exists(tmp_path, small_dataset, tiny_bert):
    import yaml

    from core.runs.launcher import launch

    df = load_esci(small_dataset)
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"example_id": df["example_id"].to_numpy()[:2], "locale": "es"}).to_parquet(path)
    cfg = aug_config(tmp_path, small_dataset, tiny_bert, path)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.to_dict()))
    store = RunStore(tmp_path / "runs.db")
    expect_data_error(tmp_path, lambda: launch(str(cfg_path), [], store), str(path), "no text column")
    assert store.list_runs() == []


def test_unselected_sources_are_ignored_and_a_resume_checks_the_rows(tmp_path, small_dataset):
    df = load_esci(small_dataset)
    path, t, _ = write_translations(tmp_path, small_dataset, n=10)
    first_q = df.loc[df["split"] == "train", "query_id"].iloc[0]
    sub = df[(df["split"] != "train") | (df["query_id"] == first_q)].reset_index(drop=True)  # as data.max_queries
    tr = load_translations(path, sub, small_dataset)
    kept = t["example_id"].isin(sub["example_id"])
    assert len(tr.rows) == kept.sum() and tr.ignored == (~kept).sum() > 0
    assert (sub["example_id"].to_numpy()[tr.source] == tr.rows["example_id"].to_numpy()).all()
    # a run's first start records the rows, a resume with other rows is refused
    full = load_translations(path, df, small_dataset)
    check_unchanged(tmp_path, path, full, write=True)
    check_unchanged(tmp_path, path, load_translations(path, df, small_dataset), write=True)  # same rows: fine
    t.loc[1, "query"] = "changed"
    t.to_parquet(path, index=False)
    with pytest.raises(WorkbenchError, match="differ from those the run started with"):
        check_unchanged(tmp_path, path, load_translations(path, df, small_dataset), write=True)


def test_a_resume_trains_on_the_same_translations_or_is_refused(tmp_path, small_dataset, tiny_bert, record_folds):
    path, t, _ = write_translations(tmp_path, small_dataset, n=8)
    cfg = aug_config(tmp_path, small_dataset, tiny_bert, path, run_folds=[0])
    cfg.data.max_queries, cfg.blend.members = 4, []
    store = RunStore(tmp_path / "runs.db")
    first = run_training(cfg, store)
    assert first.partial
    cfg.train.run_folds = None  # `workbench resume --all-folds`
    changed = t.copy()
    changed.loc[0, "query"] = "otra consulta"
    changed.to_parquet(path, index=False)
    with pytest.raises(WorkbenchError, match="differ from those the run started with"):
        run_training(cfg, store, run_id=first.run_id, resume=True)
    assert [r["k"] for r in record_folds] == [0]  # refused before fold 1 trained
    t.to_parquet(path, index=False)
    done = run_training(cfg, store, run_id=first.run_id, resume=True)
    assert done.run_id == first.run_id and not done.partial
    assert [r["k"] for r in record_folds] == [0, 1]  # fold 0 kept from the first start
    ctx0, ctx1 = record_folds[0]["ctx"], record_folds[1]["ctx"]
    np.testing.assert_array_equal(ctx0.aug_source, ctx1.aug_source)
    assert ctx0.df.iloc[ctx0.aug_idx].equals(ctx1.df.iloc[ctx1.aug_idx])
    oof = pd.read_parquet(done.run_dir / "oof.parquet")
    df = load_training_frame(cfg)
    assert sorted(oof["example_id"]) == sorted(df.loc[df["split"] == "train", "example_id"])
