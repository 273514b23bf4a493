"""Multitask pre-training (core.pretrain.multitask): each task's mathematics on small inputs, then the
whole command on the tiny BERT, whose backbone folder fine-tunes with the existing trainer."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import REPO, snapshot, tiny_config
from core.errors import ConfigError, DataError
from core.pretrain.multitask import (
    IGNORE_INDEX,
    TASKS,
    FeatureQueue,
    build_vocab,
    fake_query,
    info_nce,
    load_pretrain_config,
    mask_tokens,
    mask_values,
    mlm_batch,
    momentum_update,
    poisson_span,
    run_pretraining,
)
from core.runs.store import RunStore

runner = CliRunner()


# ------------------------------------------------------------------ Product2Query: Poisson fake queries
@pytest.mark.parametrize("mu", [4.0, 8.0])
def test_poisson_span_length_distribution(mu):
    rng = np.random.default_rng(0)
    n_draws, n_units = 20_000, 200
    spans = [poisson_span(n_units, mu, rng) for _ in range(n_draws)]
    lengths = np.array([n for _, n in spans])
    # L = max(Poisson(mu), 1): mean mu + P(X=0) = mu + exp(-mu), variance ~ mu
    assert abs(lengths.mean() - (mu + math.exp(-mu))) < 0.06
    assert abs(lengths.mean() - mu) < 0.1
    assert abs(lengths.var() - mu) < 0.4
    assert lengths.min() >= 1
    assert all(0 <= s and s + n <= n_units for s, n in spans)


def test_poisson_span_clipped_to_the_text():
    rng = np.random.default_rng(1)
    spans = [poisson_span(3, 8.0, rng) for _ in range(500)]
    assert {n for _, n in spans} <= {1, 2, 3} and max(n for _, n in spans) == 3
    assert all(s + n <= 3 for s, n in spans)
    assert poisson_span(1, 4.0, rng) == (0, 1)
    with pytest.raises(ValueError):
        poisson_span(0, 4.0, rng)


def test_fake_query_is_a_contiguous_span_en_and_ja():
    rng = np.random.default_rng(2)
    title = " ".join(f"w{i}" for i in range(60))  # distinct words: a span's position is unique
    words = title.split()
    lengths = []
    for _ in range(3000):
        q = fake_query(title, "us", 4.0, rng).split()
        start = words.index(q[0])
        assert words[start : start + len(q)] == q  # contiguous, in order
        lengths.append(len(q))
    assert abs(np.mean(lengths) - 4.0) < 0.15
    ja = "ワイヤレスイヤホン ブルートゥース 高音質 防水 長時間再生 マイク付き 片耳 両耳 通話 ノイズキャンセリング"
    ja_lengths = []
    for _ in range(3000):
        q = fake_query(ja, "jp", 8.0, rng)
        assert q and q in ja  # a substring of the title
        ja_lengths.append(len(q))
    # characters; a span that starts or ends on a space is stripped, so slightly shorter than mu
    assert 7.3 < np.mean(ja_lengths) < 8.2
    assert fake_query("", "us", 4.0, rng) == ""


# ------------------------------------------------------------------ MLM
def test_mask_tokens_rate_and_labels():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (400, 64))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    special[::2, 40:] = True  # padding of half the rows
    inputs, labels = mask_tokens(ids, special, mask_token_id=3, vocab_size=1000, probability=0.15, generator=g)
    selected = labels != IGNORE_INDEX
    rate = selected[~special].float().mean().item()
    assert abs(rate - 0.15) < 0.01
    assert not selected[special].any()  # special tokens and padding never masked
    assert (inputs[special] == ids[special]).all()
    assert (labels[selected] == ids[selected]).all() and (labels[~selected] == IGNORE_INDEX).all()
    assert (inputs[~selected] == ids[~selected]).all()  # unselected tokens untouched
    n = selected.sum().item()
    to_mask = (inputs[selected] == 3).float().mean().item()
    kept = (inputs[selected] == ids[selected]).float().mean().item()
    random_ = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(random_ - 0.1) < 0.02, (n, to_mask, kept)


def test_mlm_batch_with_the_tokenizer_never_masks_special_tokens(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["wireless earbuds with charging case [SEP] black", "dog", "running shoes for women size 8 blue"] * 50
    g = torch.Generator().manual_seed(1)
    b = mlm_batch(tok, texts, max_length=24, probability=0.15, generator=g)
    raw = tok(texts, truncation=True, max_length=24, padding=True, return_tensors="pt")["input_ids"]
    special = torch.isin(raw, torch.tensor(tok.all_special_ids)) | (b["attention_mask"] == 0)
    sel = b["labels"] != IGNORE_INDEX
    assert special.any() and not sel[special].any()
    assert (b["input_ids"][special] == raw[special]).all()
    assert abs(sel[~special].float().mean().item() - 0.15) < 0.03
    assert (b["labels"][sel] == raw[sel]).all()


# ------------------------------------------------------------------ Product2Brand / Product2Color
def test_attribute_vocab_other_bucket_and_ignored_empty_values():
    values = ["Nike", "nike ", "Adidas", "ADIDAS", "Adidas", "Puma", "Puma", "", "Rare", "  "]
    v = build_vocab(values, min_count=2, max_size=2)
    assert v.values == ["<other>", "adidas", "nike"]  # most frequent first, ties by name; Puma cut by max_size
    y = v.encode(["Adidas", "NIKE", "Puma", "Rare", "", " ", "unseen"])
    assert y.tolist() == [1, 2, 0, 0, IGNORE_INDEX, IGNORE_INDEX, 0]
    v2 = build_vocab(values, min_count=3, max_size=100)
    assert v2.values == ["<other>", "adidas"]
    assert build_vocab(["", ""], 1, 10).values == ["<other>"]


def test_mask_values_hides_brand_and_colour():
    text = "Nike Air Zoom running shoe, BLACK / white [SEP] by nike. Nikes blacken"
    out = mask_values(text, ["nike", "Black", ""], "[MASK]")
    assert out == "[MASK] Air Zoom running shoe, [MASK] / white [SEP] by [MASK]. Nikes blacken"
    assert mask_values("Calvin  Klein jeans", ["Calvin Klein"], "[MASK]") == "[MASK] jeans"


# ------------------------------------------------------------------ contrastive: InfoNCE + queue
def _info_nce_by_hand(a, p, q, tau):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True) if len(q) else q
    total = 0.0
    for i in range(len(a)):
        pos = math.exp(float(np.dot(a[i], p[i])) / tau)
        denom = 0.0
        for j in range(len(p)):
            denom += math.exp(float(np.dot(a[i], p[j])) / tau)
        for m in range(len(q)):
            denom += math.exp(float(np.dot(a[i], q[m])) / tau)
        total += -math.log(pos / denom)
    return total / len(a)


def test_info_nce_equals_a_hand_computation():
    rng = np.random.default_rng(3)
    a, p, q = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=(4, 5))
    for queue, tau in ((q, 0.5), (q, 0.05), (np.zeros((0, 5)), 0.2)):
        got = info_nce(torch.tensor(a), torch.tensor(p), torch.tensor(queue) if len(queue) else None, tau).item()
        assert got == pytest.approx(_info_nce_by_hand(a, p, queue, tau), rel=1e-5)
    # second tiny batch: identical views -> the positive dominates at a low temperature
    a2 = np.eye(4)[:2] + 0.01
    got = info_nce(torch.tensor(a2), torch.tensor(a2), torch.tensor(np.eye(4)[2:]), 0.1).item()
    assert got == pytest.approx(_info_nce_by_hand(a2, a2, np.eye(4)[2:], 0.1), abs=1e-6)  # float32 inside
    assert got < 1e-3


def test_queue_is_fifo():
    qu = FeatureQueue(capacity=5, dim=2)
    assert len(qu) == 0
    qu.enqueue(torch.tensor([[0.0, 0], [1, 1], [2, 2]]))
    qu.enqueue(torch.tensor([[3.0, 3], [4, 4]]))
    assert qu.tensor[:, 0].tolist() == [0, 1, 2, 3, 4]
    qu.enqueue(torch.tensor([[5.0, 5], [6, 6]]))  # beyond capacity: the two oldest go
    assert qu.tensor[:, 0].tolist() == [2, 3, 4, 5, 6]
    qu.enqueue(torch.arange(14.0).view(7, 2))  # more than the capacity at once: its last 5 rows
    assert qu.tensor[:, 0].tolist() == [4, 6, 8, 10, 12]
    x = torch.ones(1, 2, requires_grad=True)
    qu.enqueue(x * 2)
    assert not qu.tensor.requires_grad
    empty = FeatureQueue(0, 2)
    empty.enqueue(torch.ones(3, 2))
    assert len(empty) == 0


def test_momentum_update():
    src, dst = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w_src, w_dst = src.weight.detach().clone(), dst.weight.detach().clone()
    momentum_update(dst, src, 0.9)
    assert torch.allclose(dst.weight, 0.9 * w_dst + 0.1 * w_src)
    assert torch.allclose(src.weight, w_src)


# ------------------------------------------------------------------ end to end on the tiny BERT
def _pretrain_config(tmp_path: Path, data_dir: Path, model_dir: Path, **tasks_off) -> Path:
    cfg = {
        "name": "pretrain-tiny",
        "output_dir": str(tmp_path / "runs"),
        "data": {"dir": str(data_dir), "max_products": 96},
        "model": {"name": str(model_dir), "max_length": 24},
        "train": {"batch_size": 16, "max_steps": 3, "log_every": 1, "lr": 1e-3},
        "tasks": {"contrastive": {"queue_size": 20}, **{t: {"enabled": False} for t in tasks_off}},
    }
    p = tmp_path / "pretrain.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _metric_names(db: str, run_id: str) -> set[str]:
    return {m["name"] for m in RunStore(db).metrics(run_id)}


def test_pretrain_end_to_end_then_finetune(tmp_path, small_dataset, tiny_bert):
    from core.config import load_config
    from core.training.train import run_training
    from workbench.cli import app

    db = str(tmp_path / "runs.db")
    cfg_path = _pretrain_config(tmp_path, small_dataset, tiny_bert)
    res = runner.invoke(app, ["pretrain", str(cfg_path), "--db", db, "--set", "train.max_steps=4"])
    assert res.exit_code == 0, res.output
    store = RunStore(db)
    run = store.list_runs()[0]
    assert run["status"] == "finished" and run["name"] == "pretrain-tiny" and run["exit_code"] == 0
    backbone = Path(run["run_dir"]) / "backbone"
    assert "backbone" in res.output
    for f in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "pretrain.json"):
        assert (backbone / f).is_file(), f
    assert not list(Path(run["run_dir"]).glob(".backbone.tmp*"))
    rows = store.metrics(run["id"])
    names = {m["name"] for m in rows}
    for t in TASKS:
        assert f"pretrain/{t}_loss" in names, t
    assert {"train/loss", "train/lr", "progress/step", "progress/total_steps"} <= names
    steps = [m["step"] for m in rows if m["name"] == "pretrain/mlm_loss"]
    assert steps == [1, 2, 3, 4]  # logged every step
    total = next(m["value"] for m in rows if m["name"] == "progress/total_steps")
    assert total == 4
    # the summed loss is the sum of the task losses (all weights 1)
    by_step = {}
    for m in rows:
        if m["name"].startswith("pretrain/") and m["name"].endswith("_loss") and m["step"]:
            by_step.setdefault(m["step"], 0.0)
            by_step[m["step"]] += m["value"]
    for m in rows:
        if m["name"] == "train/loss":
            assert m["value"] == pytest.approx(by_step[m["step"]], rel=1e-5)
    assert any(a["kind"] == "backbone" for a in store.artifacts(run["id"]))
    # the weights changed (the backbone was trained, not copied)
    from safetensors.torch import load_file

    new, old = load_file(backbone / "model.safetensors"), load_file(tiny_bert / "model.safetensors")
    key = next(k for k in new if k.endswith("encoder.layer.0.attention.self.query.weight"))
    old_key = next(k for k in old if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert not torch.allclose(new[key], old[old_key])

    # runs list shows it like any other run
    res = runner.invoke(app, ["runs", "list", "--db", db, "--json"])
    assert res.exit_code == 0 and run["id"] in res.output

    # fine-tune with the existing trainer: model.name = the backbone folder
    cfg = load_config(tiny_config(tmp_path, small_dataset, backbone), ["train.folds=2", "data.max_queries=8"])
    result = run_training(cfg, store)
    assert len(result.oof) > 0 and 0.0 <= result.cv["ndcg"] <= 1.0
    assert store.get_run(result.run_id)["status"] == "finished"


@pytest.mark.parametrize("off", TASKS)
def test_each_task_switch_removes_its_loss(tmp_path, small_dataset, tiny_bert, off):
    cfg = load_pretrain_config(
        _pretrain_config(tmp_path, small_dataset, tiny_bert, **{off: True}), ["train.max_steps=2"]
    )
    store = RunStore(str(tmp_path / "runs.db"))
    res = run_pretraining(cfg, store)
    names = _metric_names(store.path, res.run_id)
    assert f"pretrain/{off}_loss" not in names
    for t in TASKS:
        if t != off:
            assert f"pretrain/{t}_loss" in names, t
    assert set(res.last_losses) == {t for t in TASKS if t != off} | {"total"}
    assert (res.backbone_dir / "model.safetensors").is_file()


# ------------------------------------------------------------------ bad input
def test_all_tasks_off_exits_2_with_one_line(tmp_path, small_dataset, tiny_bert):
    cfg = _pretrain_config(tmp_path, small_dataset, tiny_bert, **{t: True for t in TASKS})
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "workbench", "pretrain", str(cfg), "--db", str(tmp_path / "r.db")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "all tasks are off" in lines[0], proc.stderr
    assert snapshot(tmp_path) == before  # no runs.db, no run folder


def test_bad_configs_and_data(tmp_path, small_dataset, tiny_bert):
    cfg = _pretrain_config(tmp_path, small_dataset, tiny_bert)
    with pytest.raises(ConfigError, match="tasks.query2product"):
        load_pretrain_config(cfg, ["tasks.query2product.enabled=true"])  # unknown task name
    with pytest.raises(ConfigError, match="text_fields"):
        load_pretrain_config(cfg, ["data.text_fields=[title, price]"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_pretrain_config(tmp_path / "nope.yaml")

    store = RunStore(str(tmp_path / "runs.db"))
    ex = pd.read_parquet(small_dataset / "shopping_queries_dataset_examples.parquet")
    pr = pd.read_parquet(small_dataset / "shopping_queries_dataset_products.parquet")

    def run_on(folder: Path) -> str:
        before = snapshot(tmp_path)
        c = load_pretrain_config(cfg, [f"data.dir={folder}"])
        with pytest.raises(DataError) as info:
            run_pretraining(c, store)
        assert "\n" not in str(info.value)
        assert snapshot(tmp_path) == before  # nothing written: no run row, no folder
        return str(info.value)

    assert "does not exist" in run_on(tmp_path / "missing")
    bad = tmp_path / "nocol"
    bad.mkdir()
    ex.to_parquet(bad / "shopping_queries_dataset_examples.parquet")
    pr.drop(columns=["product_brand"]).to_parquet(bad / "shopping_queries_dataset_products.parquet")
    assert "missing column(s): product_brand" in run_on(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    ex.to_parquet(empty / "shopping_queries_dataset_examples.parquet")
    pr.assign(product_title="", product_bullet_point=None, product_description="  ").to_parquet(
        empty / "shopping_queries_dataset_products.parquet"
    )
    assert "no product has text" in run_on(empty)
    assert store.list_runs() == []


def test_sigterm_marks_the_run_stopped_and_leaves_no_backbone(tmp_path, small_dataset, tiny_bert):
    import os
    import signal
    import sqlite3
    import time

    from core.errors import WorkbenchError

    cfg = _pretrain_config(tmp_path, small_dataset, tiny_bert)
    db = str(tmp_path / "runs.db")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "workbench",
            "pretrain",
            str(cfg),
            "--db",
            db,
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.epochs=100000",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 90
        run = None
        while time.time() < deadline:
            try:  # the file exists a moment before its tables do
                runs = RunStore(db, readonly=True).list_runs() if os.path.exists(db) else []
                if runs and runs[0]["status"] == "running" and _metric_names(db, runs[0]["id"]) & {"train/loss"}:
                    run = runs[0]
                    break
            except (sqlite3.Error, WorkbenchError):
                pass
            time.sleep(0.3)
        assert run is not None, "the run never logged a step"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = proc.stderr.read()
    assert proc.returncode == 2, f"rc {proc.returncode}, stderr:\n{stderr}"  # RunStopped: one line, exit 2
    r = RunStore(db).get_run(run["id"])
    assert r["status"] == "stopped" and r["exit_code"] == 143
    assert not (Path(r["run_dir"]) / "backbone").exists()
    assert not list(Path(r["run_dir"]).glob(".backbone.tmp*"))


def test_launch_and_relaunch_a_pretrain_config_detached(tmp_path, small_dataset, tiny_bert):
    """`workbench launch` / the app's new-run dialog / `r` start `workbench pretrain` for a
    `kind: pretrain` config (the supervisor records exit 0, the backbone is written)."""
    import json
    import time

    from core.runs.launcher import config_kind, load_any_config, relaunch
    from workbench.cli import app

    cfg_path = _pretrain_config(tmp_path, small_dataset, tiny_bert)
    data = yaml.safe_load(cfg_path.read_text())
    data["kind"] = "pretrain"
    cfg_path.write_text(yaml.safe_dump(data))
    assert config_kind(cfg_path) == "pretrain" and config_kind(REPO / "configs" / "demo.yaml") == "train"
    assert load_any_config(cfg_path).tasks.enabled() == list(TASKS)

    db = str(tmp_path / "runs.db")
    res = runner.invoke(app, ["launch", str(cfg_path), "--db", db, "--set", "train.max_steps=2"])
    assert res.exit_code == 0, res.output
    first = res.output.strip().splitlines()[0]
    store = RunStore(db)

    def finished(run_id: str) -> bool:
        deadline = time.time() + 120
        while time.time() < deadline:
            if store.get_run(run_id)["status"] not in ("queued", "running"):
                break
            time.sleep(0.3)
        run = store.get_run(run_id)
        assert run["status"] == "finished", (
            run["status"],
            run.get("error"),
            (Path(run["run_dir"]) / "console.log").read_text()[-2000:],
        )
        return (Path(run["run_dir"]) / "backbone" / "model.safetensors").is_file()

    assert finished(first)
    second, _ = relaunch(store, first)
    assert finished(second)
    a, b = (json.loads(store.get_run(r)["config"]) for r in (first, second))
    assert a == b and b["kind"] == "pretrain" and b["train"]["max_steps"] == 2


def test_pretrain_resumes_from_its_step_checkpoint_bit_identical(tmp_path, small_dataset, tiny_bert, monkeypatch):
    """A pre-training run that dies after step 7 (a step checkpoint every 3 steps) and is resumed
    writes the same backbone as an uninterrupted run (CPU, one thread), with no metric row twice."""
    from collections import Counter

    from safetensors.torch import load_file

    import core.pretrain.multitask as pretrain_mod
    from core.pretrain.multitask import load_pretrain_config, run_pretraining
    from core.runs.launcher import resume_config

    path = _pretrain_config(tmp_path, small_dataset, tiny_bert)
    sets = ["train.max_steps=10", "train.checkpoint_every=3", "train.num_threads=1", "train.epochs=3"]
    ref_store = RunStore(tmp_path / "ref.db")
    ref = run_pretraining(load_pretrain_config(path, sets + [f"output_dir={tmp_path / 'ref'}"]), ref_store)

    class Crash(BaseException):
        pass

    calls = {"n": 0}
    real = pretrain_mod.check_stop

    def crash_at_step_8(where="", **kwargs):  # kwargs: collective=True at a step
        calls["n"] += 1
        if calls["n"] == 8:
            raise Crash("simulated kill at step 8")
        real(where, **kwargs)

    store = RunStore(tmp_path / "runs.db")
    monkeypatch.setattr(pretrain_mod, "check_stop", crash_at_step_8)
    with pytest.raises(Crash):
        run_pretraining(load_pretrain_config(path, sets), store)
    monkeypatch.setattr(pretrain_mod, "check_stop", real)
    run = store.list_runs()[0]
    assert run["status"] == "failed"
    run_dir = Path(run["run_dir"])
    assert (run_dir / "resume.pt").is_file() and not (run_dir / "backbone").exists()
    run_id, cfg = resume_config(store, run["id"])
    res = run_pretraining(cfg, store, run_id=run_id, resume=True)
    assert store.get_run(run_id)["status"] == "finished" and res.steps == ref.steps == 10
    a = load_file(str(res.backbone_dir / "model.safetensors"))
    b = load_file(str(ref.backbone_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res.last_losses == ref.last_losses
    rows = Counter((m["name"], m["fold"], m["step"]) for m in store.metrics(run_id))
    assert rows == Counter((m["name"], m["fold"], m["step"]) for m in ref_store.metrics(ref.run_id))
    assert "resumed from resume.pt at step 6" in (run_dir / "train.log").read_text()
    assert not (run_dir / "resume.pt").exists()
