"""core.runs.monitor (log tail, ETA, process tree, NVML probe) and core.runs.compare (summaries, config diff)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from core.runs.compare import config_diff, flatten, metric_summary
from core.runs.monitor import GpuProbe, GpuStats, LogTail, TreeSampler, estimate_eta, format_seconds, gpu_summary
from core.runs.store import RunStore


def test_logtail_reads_only_appended_complete_lines(tmp_path):
    p = tmp_path / "train.log"
    tail = LogTail(p, max_lines=3)
    assert tail.poll() == []  # no file yet
    p.write_text("a\nb\npart")
    assert tail.poll() == ["a", "b"]
    assert tail.poll() == []
    with open(p, "a") as fh:
        fh.write("ial\nc\nd\n")
    assert tail.poll() == ["partial", "c", "d"]
    assert list(tail.lines) == ["partial", "c", "d"]  # bounded
    p.write_text("new\n")  # truncated / rotated: start again
    assert tail.poll() == ["new"]


def test_logtail_skips_a_huge_backlog_to_its_tail(tmp_path):
    p = tmp_path / "big.log"
    p.write_text("".join(f"line {i}\n" for i in range(10000)))
    tail = LogTail(p, max_bytes=100)
    lines = tail.poll()
    assert lines[-1] == "line 9999" and len(lines) < 20 and all(line.startswith("line ") for line in lines)


def test_estimate_eta_uses_recent_rate():
    pts = [(0.0, 0), (10.0, 5), (20.0, 10), (30.0, 30)]  # faster at the end
    rate, eta = estimate_eta(pts, 130, window=2)
    assert rate == pytest.approx(2.0) and eta == pytest.approx(50.0)
    rate, eta = estimate_eta(pts, 130, window=10)
    assert rate == pytest.approx(1.0) and eta == pytest.approx(100.0)
    assert estimate_eta(pts[:1], 100) == (None, None)
    assert estimate_eta([(0, 5), (10, 5)], 100) == (None, None)  # no progress
    assert estimate_eta(pts, None)[1] is None
    assert format_seconds(3725) == "1:02:05" and format_seconds(65) == "1:05" and format_seconds(None) == "-"


def test_tree_sampler_sums_a_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(50_000_000); time.sleep(30)"])
    try:
        time.sleep(1.0)
        sampler = TreeSampler()
        me = psutil.Process(os.getpid())
        first = sampler.sample(me)
        assert child.pid in first.pids and os.getpid() in first.pids
        assert first.rss > me.memory_info().rss + 40_000_000  # the child's 50 MB counted
        assert sampler.sample(None) is None
    finally:
        child.kill()
        child.wait()


def test_gpu_probe_without_driver_says_why_and_summary():
    probe = GpuProbe()
    if not probe.available:
        assert probe.read() == [] and probe.reason
    gpus = [
        GpuStats(0, "H100", 50.0, 1024.0, 81920.0, 60.0, 300.0),
        GpuStats(1, "H100", 100.0, 3072.0, 81920.0, 70.0, None),
    ]
    assert gpu_summary(gpus) == "GPU: 2x H100 | util 75% | mem 4.0/160.0 GiB"
    assert gpu_summary([], "no NVIDIA driver") == "GPU: none (no NVIDIA driver)"


def test_config_diff_shows_only_differing_keys():
    a = {"name": "a", "train": {"lr": 1e-4, "seed": 1, "folds": 5}, "blend": {"members": ["bm25"]}, "output_dir": "x"}
    b = {
        "name": "b",
        "train": {"lr": 1e-4, "seed": 2, "folds": 5},
        "blend": {"members": ["bm25", "dense"]},
        "output_dir": "y",
    }
    c = {"name": "c", "train": {"lr": 1e-4, "seed": 1, "folds": 5, "epochs": 2}, "blend": {"members": ["bm25"]}}
    diff = dict(config_diff({"A": a, "B": b, "C": c}))
    assert set(diff) == {"name", "train.seed", "blend.members", "train.epochs"}
    assert diff["train.epochs"] == {"A": None, "B": None, "C": 2}
    assert config_diff({"A": a, "B": dict(a)}) == []
    assert flatten({"a": {"b": {"c": 1}}, "d": []}) == {"a.b.c": 1, "d": []}


def test_metric_summary_best_and_fold_spread(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    rid = store.create_run("x", {"train": {"folds": 3}})
    store.log_metrics(
        rid,
        [{"name": "fold/ndcg", "value": v, "fold": k} for k, v in enumerate([0.80, 0.82, 0.84])]
        + [
            {"name": "eval/task2_f1", "value": v, "fold": k, "step": s}
            for k, s, v in [(0, 1, 0.5), (0, 2, 0.6), (0, 3, 0.55), (1, 1, 0.4)]
        ],
    )
    s = metric_summary(store, rid)
    # no CV logged yet: best = mean of the folds' best evals, for nDCG over fold/ndcg's eval (none) -> None
    assert s["CV nDCG"]["best"] is None
    assert s["CV nDCG"]["mean"] == pytest.approx(0.82) and s["CV nDCG"]["std"] == pytest.approx(0.016329932, rel=1e-6)
    assert s["CV nDCG"]["min"] == pytest.approx(0.80) and s["CV nDCG"]["max"] == pytest.approx(0.84)
    assert s["Task 2 F1"]["best"] == pytest.approx((0.6 + 0.4) / 2)  # best per fold, not last (0.55)
    store.log_metrics(rid, [{"name": "cv/ndcg", "value": 0.83, "fold": -1}])
    assert metric_summary(store, rid)["CV nDCG"]["best"] == pytest.approx(0.83)
