"""End-to-end k-fold training on a tiny random BERT over real ESCI queries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.config import config_from_dict
from core.data.esci import load_esci
from core.runs.store import RunStore
from core.scoring.metrics import expected_gain, mean_ndcg
from core.training.fold_loop import LengthGroupedBatchSampler
from core.training.train import run_training


def tiny_config(tmp_path, data_dir, model_dir, **train):
    return config_from_dict(
        {
            "name": "tiny",
            "output_dir": str(tmp_path / "runs"),
            "data": {"dir": str(data_dir)},
            "text": {"max_length": 48, "cache_dir": str(tmp_path / "cache")},
            "model": {"name": str(model_dir), "pooling": "mean"},
            "train": {
                "folds": 3,
                "epochs": 1,
                "batch_size": 16,
                "lr": 1e-3,
                "evals_per_epoch": 2,
                "log_every": 2,
                **train,
            },
            "blend": {"members": ["bm25"]},
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_dataset, tiny_bert):
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_config(tmp, small_dataset, tiny_bert)
    store = RunStore(tmp / "runs.db")
    result = run_training(cfg, store)
    return cfg, store, result


def test_oof_row_for_every_training_example(trained, small_dataset):
    cfg, store, result = trained
    df = load_esci(small_dataset)
    train = df[df["split"] == "train"]
    assert sorted(result.oof["example_id"]) == sorted(train["example_id"])
    assert not result.oof[["p_E", "p_S", "p_C", "p_I"]].isna().any().any()
    np.testing.assert_allclose(result.oof[["p_E", "p_S", "p_C", "p_I"]].sum(axis=1), 1.0, atol=1e-5)
    # each query sits in exactly one fold
    assert (result.oof.groupby("query_id")["fold"].nunique() == 1).all()
    np.testing.assert_allclose(
        result.oof["ce_score"], expected_gain(result.oof[["p_E", "p_S", "p_C", "p_I"]].to_numpy()), rtol=1e-6
    )


def test_test_split_gets_predictions_and_is_never_trained_on(trained, small_dataset):
    cfg, store, result = trained
    df = load_esci(small_dataset)
    test_ids = set(df.loc[df["split"] == "test", "example_id"])
    assert set(result.test["example_id"]) == test_ids
    assert not test_ids & set(result.oof["example_id"])
    assert (result.test["fold"] == -1).all()


def test_artifacts_and_runs_db(trained):
    cfg, store, result = trained
    run = store.get_run(result.run_id)
    assert run["status"] == "finished" and run["exit_code"] == 0
    for name in ("config.yaml", "train.log", "oof.parquet", "test.parquet", "fold0/model.safetensors"):
        assert (result.run_dir / name).is_file(), name
    oof = pd.read_parquet(result.run_dir / "oof.parquet")
    assert len(oof) == len(result.oof)
    names = {m["name"] for m in store.metrics(result.run_id)}
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_s",
        "eval/ndcg",
        "eval/task2_f1",
        "fold/ndcg",
        "cv/ndcg",
        "cv/final_ndcg",
    } <= names
    # two evaluations per epoch per fold
    evals = [m for m in store.metrics(result.run_id, ["eval/ndcg"])]
    assert len(evals) == 3 * 2
    # the logged CV nDCG equals the one recomputed from the OOF file
    cv = {m["name"]: m["value"] for m in store.metrics(result.run_id) if m["fold"] == -1}
    assert cv["cv/ndcg"] == pytest.approx(mean_ndcg(oof["query_id"], oof["ce_score"], oof["esci_label"]))
    listed = store.list_runs()[0]
    assert listed["best_ndcg"] == pytest.approx(cv["cv/ndcg"]) and listed["folds_done"] == 3


def test_final_score_is_the_fold_nested_blend(trained):
    from core.scoring.blend import nested_blend, standardize_per_query

    cfg, store, result = trained
    oof = result.oof
    z = np.column_stack([standardize_per_query(oof["query_id"], oof[c]) for c in ("ce_score", "bm25")])
    final, per_fold, full = nested_blend(
        oof["fold"], oof["query_id"], oof["esci_label"], z, cfg.blend.resolution, cfg.blend.method, cfg.blend.fallback
    )
    np.testing.assert_allclose(oof["score"], final)  # each fold scored with weights from the others
    assert result.blend_weights == pytest.approx(dict(zip(["ce", "bm25"], full)))
    z_test = np.column_stack(
        [standardize_per_query(result.test["query_id"], result.test[c]) for c in ("ce_score", "bm25")]
    )
    np.testing.assert_allclose(result.test["score"], z_test @ full, rtol=1e-6)


def test_run_folds_subset_and_bad_fold(tmp_path, small_dataset, tiny_bert):
    from core.errors import ConfigError

    store = RunStore(tmp_path / "runs.db")
    cfg = tiny_config(tmp_path, small_dataset, tiny_bert, run_folds=[1], save_checkpoints=False)
    cfg.blend.members = []
    result = run_training(cfg, store)
    assert set(result.oof["fold"]) == {1} and result.partial
    assert store.get_run(result.run_id)["status"] == "partial"  # never "finished" with a partial OOF
    with pytest.raises(ConfigError, match="run_folds"):
        run_training(tiny_config(tmp_path, small_dataset, tiny_bert, run_folds=[7]), store)
    assert len(store.list_runs()) == 1  # refused before a run row exists


def test_length_grouped_sampler_covers_each_index_once_with_less_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000)
    idx = np.arange(1000)
    grouped = list(LengthGroupedBatchSampler(idx, lengths, 16, seed=1, grouped=True))
    plain = list(LengthGroupedBatchSampler(idx, lengths, 16, seed=1, grouped=False))
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    pad = lambda bs: sum(max(lengths[b]) * len(b) - lengths[b].sum() for b in bs)  # noqa: E731
    assert pad(grouped) < 0.3 * pad(plain)
    again = list(LengthGroupedBatchSampler(idx, lengths, 16, seed=1, grouped=True))
    assert grouped == again  # deterministic by seed
