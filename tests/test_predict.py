"""`workbench predict` and `workbench export onnx` on a tiny random BERT trained over real ESCI queries."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import sample_subset, snapshot
from core.config import config_from_dict
from core.data.text import EncodedPairs
from core.inference.predict import length_sorted_batches, load_frame, open_run, predict_frame, score_pairs
from core.runs.store import RunStore
from core.scoring.report import PROB_COLUMNS
from core.training.train import run_training


@pytest.fixture(scope="module")
def finished(tmp_path_factory, sample_frames, tiny_bert):
    """A finished 2-fold run (checkpoints saved, BM25 blend) on 12 real queries, 3 of them test."""
    tmp = tmp_path_factory.mktemp("predict")
    data = sample_subset(tmp / "data", sample_frames, 12, 3)
    cfg = config_from_dict(
        {
            "name": "tiny-predict",
            "output_dir": str(tmp / "runs"),
            "data": {"dir": str(data)},
            "text": {"max_length": 40, "cache_dir": str(tmp / "cache" / "tokens")},
            "model": {"name": str(tiny_bert)},
            "train": {"folds": 2, "epochs": 1, "batch_size": 16, "eval_batch_size": 16, "lr": 1e-3, "num_threads": 1},
            "blend": {"members": ["bm25"]},
        }
    )
    res = run_training(cfg, RunStore(tmp / "runs.db"))
    return res.run_dir, data


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "workbench", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_predict_reproduces_the_runs_own_test_predictions(finished):
    run_dir, data = finished
    run = open_run(run_dir)
    df, rows = load_frame(run, data, "test")
    got = predict_frame(run, df, rows, "torch", threads=1)
    want = pd.read_parquet(run_dir / "test.parquet")
    assert list(got.columns) == list(want.columns)
    assert got["example_id"].tolist() == want["example_id"].tolist()
    np.testing.assert_allclose(got[PROB_COLUMNS].to_numpy(), want[PROB_COLUMNS].to_numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["ce_score"], want["ce_score"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["bm25"], want["bm25"], atol=1e-9)
    np.testing.assert_allclose(got["score"], want["score"], atol=1e-4)  # the blend, weights refitted from oof.parquet


def test_predict_cli_on_a_copied_run_folder(finished, tmp_path):
    run_dir, data = finished
    copy = tmp_path / "elsewhere" / run_dir.name
    shutil.copytree(run_dir, copy)
    hidden = run_dir.with_name(run_dir.name + ".away")
    run_dir.rename(hidden)  # the original folder (and its runs.db row) cannot be what is read
    try:
        out = tmp_path / "pred.parquet"
        res = _cli("predict", copy, "--data", data, "--out", out, "--db", tmp_path / "no.db", cwd=tmp_path)
    finally:
        hidden.rename(run_dir)
    assert res.returncode == 0, res.stderr
    assert f"-> {out}" in res.stdout.replace("\n", "")
    got, want = pd.read_parquet(out), pd.read_parquet(run_dir / "test.parquet")
    assert got["example_id"].tolist() == want["example_id"].tolist()
    np.testing.assert_allclose(got[PROB_COLUMNS].to_numpy(), want[PROB_COLUMNS].to_numpy(), atol=1e-5, rtol=0)


def test_onnx_export_and_backend_match_torch(finished, tmp_path):
    run_dir, data = finished
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    res = _cli("export", "onnx", copy)
    assert res.returncode == 0, res.stderr
    diffs = [
        float(line.split("probabilities ")[1].split(",")[0])
        for line in res.stdout.splitlines()
        if "max abs diff" in line
    ]
    assert len(diffs) == 2 and max(diffs) <= 1e-4, res.stdout
    assert res.stdout.count("(fused graph)") == 2, res.stdout  # ONNX Runtime's BERT fusions applied and checked
    assert all((copy / f"fold{k}" / "model.onnx").is_file() for k in (0, 1))
    run = open_run(copy, need="onnx")
    df, rows = load_frame(run, data, "all")
    t = predict_frame(run, df, rows, "torch", threads=1)
    o = predict_frame(run, df, rows, "onnx", threads=1)
    assert np.abs(o[PROB_COLUMNS].to_numpy() - t[PROB_COLUMNS].to_numpy()).max() <= 1e-4
    assert o["example_id"].tolist() == df["example_id"].tolist()


def test_length_sorted_batches_and_input_order_restored():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 30, size=50)
    seqs = [np.concatenate([[i + 100], np.zeros(n - 1, dtype=np.int64) + 7]) for i, n in enumerate(lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    enc = EncodedPairs(np.concatenate(seqs).astype(np.int32), offsets, np.ones(50, dtype=np.int32))
    batches = length_sorted_batches(enc.lengths, 8)
    assert sorted(np.concatenate(batches).tolist()) == list(range(50))
    assert all(np.all(np.diff(lengths[b]) <= 0) for b in batches)  # longest first, within and across
    seen_widths = []

    def forward(batch):  # row i's "probabilities" encode its first token (i + 100) and its length
        ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
        seen_widths.append(ids.shape[1])
        return np.column_stack([ids[:, 0], mask.sum(1), np.zeros(len(ids)), np.zeros(len(ids))]).astype(np.float32)

    out = score_pairs(forward, enc, 8, 0)
    assert out[:, 0].tolist() == [i + 100 for i in range(50)]  # input order, not the sorted order
    assert out[:, 1].tolist() == lengths.tolist()
    unsorted_pad = sum(lengths[i : i + 8].max() * len(lengths[i : i + 8]) for i in range(0, 50, 8))
    sorted_pad = sum(w * len(b) for w, b in zip(seen_widths, batches))
    assert sorted_pad < unsorted_pad


def _refused(res, out, *parts):
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for p in parts:
        assert str(p) in lines[0].replace("\n", ""), (p, lines[0])
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary file left


def test_refusals_are_one_line_exit_2_and_write_nothing(finished, tmp_path):
    run_dir, data = finished
    out = tmp_path / "out" / "pred.parquet"
    out.parent.mkdir()
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "oof.parquet").unlink()
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(run_dir, no_ckpt)
    (no_ckpt / "fold1" / "model.safetensors").unlink()
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "config.json").write_text(json.dumps({"kind": "stack", "name": "s"}))
    bad = tmp_path / "bad_data"
    shutil.copytree(data, bad)
    ex = pd.read_parquet(bad / "shopping_queries_dataset_examples.parquet").drop(columns=["query"])
    ex.to_parquet(bad / "shopping_queries_dataset_examples.parquet", index=False)
    before = snapshot(run_dir)
    cases = [
        ((unfinished, "--data", data), (unfinished / "oof.parquet", "not finished")),
        ((no_ckpt, "--data", data), (no_ckpt / "fold1" / "model.safetensors", "not found")),
        ((stack, "--data", data), (stack, "stack run")),
        ((run_dir, "--data", tmp_path / "nowhere"), (tmp_path / "nowhere",)),
        ((run_dir, "--data", bad), ("shopping_queries_dataset_examples.parquet", "query")),
        ((run_dir, "--data", data, "--backend", "onnx"), ("model.onnx", "workbench export onnx")),
        ((tmp_path / "no_such_run", "--data", data), ("no_such_run",)),
    ]
    for args, parts in cases:
        res = _cli("predict", *args, "--out", out, "--db", tmp_path / "no.db")
        _refused(res, out, *parts)
    assert snapshot(run_dir) == before  # the run folder is never written by predict


def test_onnx_check_fails_above_tolerance(finished, tmp_path, monkeypatch):
    from core.errors import WorkbenchError
    from core.inference import onnx_export

    run_dir, _ = finished
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    run = open_run(copy)
    real = onnx_export.compare
    monkeypatch.setattr(onnx_export, "compare", lambda *a: (real(*a)[0] + 1e-3, 0.0))  # a graph off by 1e-3
    with pytest.raises(WorkbenchError, match="differs from torch"):
        onnx_export.export_run(run, threads=1)
    assert not (copy / "fold0" / "model.onnx").exists()
    assert not list((copy / "fold0").glob(".model.onnx.*"))
    torch.set_num_threads(1)


def test_a_config_from_before_blend_method_gets_the_grid_blend_it_was_trained_with(finished, tmp_path):
    import yaml

    run_dir, _ = finished
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    assert open_run(copy).cfg.blend.method == "caruana"
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    del cfg["blend"]["method"]
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert open_run(copy).cfg.blend.method == "grid"
