"""A deterministic runs.db for the app's Pilot and snapshot tests (frozen times, fixed ids)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

from core.runs.monitor import GpuStats
from core.runs.store import RunStore
from core.scoring.stack import CV_METRICS

#: the frozen "now" of the tests: 2026-11-22 12:00:00 UTC
NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC).timestamp()


def _iso(offset_s: float) -> str:
    return datetime.fromtimestamp(NOW + offset_s, UTC).isoformat(timespec="seconds")


def _config(name: str, lr: float, seed: int, folds: int = 3, epochs: int = 2, model: str = "all-MiniLM-L6-v2") -> dict:
    return {
        "name": name,
        "output_dir": "runs",
        "data": {"dir": "data/esci_us_150q", "task": 1, "locales": None},
        "model": {"name": model, "pooling": "mean", "dropout": 0.1},
        "train": {"folds": folds, "epochs": epochs, "lr": lr, "seed": seed, "batch_size": 32},
        "blend": {"members": ["bm25", "dense"]},
    }


RUNS = [
    # id, name, status, config, started offset, duration, exit code, folds finished, base nDCG
    (
        "20261122-090000-aaaa",
        "minilm-lr1e-4",
        "finished",
        _config("minilm-lr1e-4", 1e-4, 42),
        -3 * 3600,
        960,
        0,
        3,
        0.81,
    ),
    (
        "20261122-100000-bbbb",
        "minilm-lr3e-5",
        "finished",
        _config("minilm-lr3e-5", 3e-5, 7),
        -2 * 3600,
        1020,
        0,
        3,
        0.83,
    ),
    (
        "20261122-110000-cccc",
        "e5-small-ft",
        "crashed",
        _config("e5-small-ft", 2e-5, 42, model="multilingual-e5-small"),
        -3600,
        600,
        137,
        1,
        0.84,
    ),
    ("20261122-113000-dddd", "minilm-seed3", "running", _config("minilm-seed3", 1e-4, 3), -1200, None, None, 1, 0.82),
    (
        "20261122-114500-eeee",
        "minilm-stopped",
        "stopped",
        _config("minilm-stopped", 1e-4, 5, folds=5),
        -900,
        300,
        143,
        0,
        0.80,
    ),
]


def build_fixture_db(root: Path, db_name: str = "runs.db") -> Path:
    """Write ``root/runs.db`` with :data:`RUNS`, their metrics (train loss/lr per step, eval and
    fold metrics, CV for finished runs) and a ``train.log`` for each. Returns the db path."""
    db = root / db_name
    store = RunStore(db)
    for i, (rid, name, status, cfg, start, dur, code, folds_done, base) in enumerate(RUNS):
        run_dir = Path("runs") / rid
        (root / run_dir).mkdir(parents=True, exist_ok=True)
        store.create_run(name, cfg, run_dir=str(run_dir), run_id=rid, status=status)
        store.update_run(
            rid,
            created=_iso(start - 5),
            started=_iso(start),
            ended=_iso(start + dur) if dur else None,
            exit_code=code,
            pid=None,
            host="gpu-box",
            git_commit="abc1234",
            error="trainer exited with code 137 without a final status" if status == "crashed" else None,
        )
        rows = []
        k = cfg["train"]["folds"]
        t = NOW + start
        for fold in range(min(k, folds_done + (1 if status in ("running", "crashed") else 0))):
            for step in range(1, 41):
                ep = step / 20
                t += 3
                rows += [
                    {
                        "name": "train/loss",
                        "value": 1.3 * math.exp(-step / (25 + 5 * i)) + 0.02 * ((step * 7 + fold) % 5),
                        "fold": fold,
                        "step": step,
                        "epoch": ep,
                        "time": t,
                    },
                    {
                        "name": "train/lr",
                        "value": cfg["train"]["lr"] * (1 - step / 40),
                        "fold": fold,
                        "step": step,
                        "epoch": ep,
                        "time": t,
                    },
                    {
                        "name": "train/samples_per_s",
                        "value": 38.0 + i,
                        "fold": fold,
                        "step": step,
                        "epoch": ep,
                        "time": t,
                    },
                    {
                        "name": "progress/step",
                        "value": float(fold * 40 + step),
                        "fold": -1,
                        "step": fold * 40 + step,
                        "time": t,
                    },
                ]
                if step % 20 == 0 and (fold < folds_done or step <= 20):
                    rows += [
                        {
                            "name": "eval/ndcg",
                            "value": base + 0.004 * fold + 0.003 * (step // 20),
                            "fold": fold,
                            "step": step,
                            "epoch": ep,
                            "time": t,
                        },
                        {
                            "name": "eval/task2_f1",
                            "value": base - 0.3 + 0.002 * fold,
                            "fold": fold,
                            "step": step,
                            "epoch": ep,
                            "time": t,
                        },
                    ]
            if fold < folds_done:
                rows += [
                    {"name": "fold/ndcg", "value": base + 0.004 * fold + 0.006, "fold": fold},
                    {"name": "fold/task2_f1", "value": base - 0.3 + 0.002 * fold, "fold": fold},
                    {"name": "fold/task3_f1", "value": 0.69 + 0.001 * fold, "fold": fold},
                    {"name": "fold/seconds", "value": 300.0 + 10 * fold, "fold": fold},
                    {"name": "fold/done", "value": 1.0, "fold": fold},
                ]
        rows.append({"name": "progress/total_steps", "value": float(k * 40), "fold": -1, "time": NOW + start})
        if status == "finished":
            rows += [
                {"name": "cv/ndcg", "value": base + 0.01, "fold": -1},
                {"name": "cv/final_ndcg", "value": base + 0.03, "fold": -1},
                {"name": "cv/task2_f1", "value": base - 0.3, "fold": -1},
                {"name": "cv/task3_f1", "value": 0.69, "fold": -1},
            ]
        for r in rows:
            r.setdefault("time", NOW + start)
        store.log_metrics(rid, rows)
        log = [
            f"2026-11-22 1{i}:00:{s:02d} INFO fold 0 step {s * 10} epoch {s / 4:.2f} loss {1.2 - s / 50:.4f}"
            for s in range(12)
        ]
        (root / run_dir / "train.log").write_text("\n".join(log) + "\n")
    store.close()
    return db


class FakeGpuProbe:
    """A GPU probe with fixed readings, for the app's ``gpu_probe`` (the real one is
    :class:`core.runs.monitor.GpuProbe`): ``read() -> list[GpuStats]``, ``available``, ``reason``, ``close()``."""

    def __init__(self, gpus: list[GpuStats] | None = None, reason: str = "fake NVML: no GPU"):
        self.gpus = list(gpus or [])
        self.available = bool(self.gpus)
        self.reason = "" if self.gpus else reason

    def read(self) -> list[GpuStats]:
        return list(self.gpus)

    def close(self) -> None:
        pass


def fake_gpu() -> FakeGpuProbe:
    """One H100 with the 'running' fixture run's process on it (pid 4242, 5 GiB)."""
    return FakeGpuProbe([GpuStats(0, "NVIDIA H100 80GB HBM3", 87.0, 21_000.0, 81_559.0, 64.0, 412.0, {4242: 5_120.0})])


def frozen_host() -> tuple[float, float, float]:
    return 37.0, 9.5, 24.0


def fixture_app(db: Path, configs_dir: str = "configs", **kw):
    from workbench.tui.app import WorkbenchApp

    return WorkbenchApp(
        str(db),
        gpu_probe=kw.pop("gpu_probe", fake_gpu()),
        clock=lambda: NOW,
        configs_dir=configs_dir,
        host_stats=frozen_host,
        **kw,
    )


def config_json(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


#: the Slurm fixture run of :func:`add_slurm_run`: queued, its job pending for resources
SLURM_RUN = "20261122-115500-ffff"
SLURM_JOB = "4242"


def add_slurm_run(db: Path, job_state: str = "PENDING", job_reason: str = "Resources", node: str | None = None) -> str:
    """Add a Slurm run to a fixture runs.db: ``queued`` (``running`` once its job is RUNNING), job
    :data:`SLURM_JOB` in ``job_state`` for ``job_reason`` on ``node``. Returns its id.

    Slurm is never asked about it in a test that patches ``core.runs.slurm.refresh`` away."""
    store = RunStore(db)
    status = "running" if job_state == "RUNNING" else "queued"
    cfg = _config("minilm-slurm", 1e-4, 9)
    store.create_run("minilm-slurm", cfg, run_dir=f"runs/{SLURM_RUN}", run_id=SLURM_RUN, status=status)
    store.update_run(
        SLURM_RUN,
        created=_iso(-300),
        started=_iso(-60) if status == "running" else None,
        host="gpu-box",
        git_commit="abc1234",
        backend="slurm",
        job_id=SLURM_JOB,
        job_state=job_state,
        job_reason=job_reason,
        node=node,
    )
    store.close()
    return SLURM_RUN


#: noise of the synthetic OOF predictions of :func:`add_oof_files` (lower = better), per run
OOF_NOISE = {"20261122-090000-aaaa": 1.5, "20261122-100000-bbbb": 1.0}


def add_oof_files(root: Path, noise: dict[str, float] | None = None) -> list[str]:
    """Write ``runs/<id>/oof.parquet`` under ``root`` for the fixture runs in ``noise`` (default
    :data:`OOF_NOISE`: the two finished runs): 40 queries, the same examples, labels and folds for
    every run, predictions drawn with a fixed seed per run (``tests/oof_fixture.py``). Returns the ids."""
    from oof_fixture import oof_frame

    noise = OOF_NOISE if noise is None else noise
    for i, (rid, level) in enumerate(noise.items()):
        oof_frame(noise=level, seed=i + 1).to_parquet(root / "runs" / rid / "oof.parquet", index=False)
    return list(noise)


def oof_frame_of(run_id: str):
    """The OOF frame :func:`add_oof_files` writes for ``run_id`` (with the default noise levels)."""
    from oof_fixture import oof_frame

    i = list(OOF_NOISE).index(run_id)
    return oof_frame(noise=OOF_NOISE[run_id], seed=i + 1)


#: the sweep of :func:`add_sweep`: (trial state, value, lr, epochs, pooling, run status)
SWEEP_NAME = "lr-sweep"
SWEEP_TRIALS = [
    ("complete", 0.8312, 3e-5, 2, "mean", "finished"),
    ("complete", 0.8105, 1e-4, 1, "cls", "finished"),
    ("pruned", None, 5e-4, 1, "cls", "pruned"),
    ("complete", 0.8421, 2e-5, 3, "mean", "finished"),
    ("fail", None, 8e-4, 4, "mean", "failed"),
    ("complete", 0.8268, 6e-5, 3, "cls", "finished"),
    ("running", None, 4e-5, 2, "mean", "running"),
]


def sweep_run_id(trial: int) -> str:
    return f"20261122-10{trial:02d}00-sw{trial:02d}"


def add_sweep(db: Path, name: str = SWEEP_NAME, total: int = 8) -> str:
    """Add a small real Optuna sweep next to a fixture runs.db: its journal
    (``core.runs.sweep.journal_path``) with the study's ``sweep`` settings and the trials of
    :data:`SWEEP_TRIALS` (each with its ``run_id``), and the trial runs in runs.db tagged with the
    sweep and trial (``RunStore.set_sweep_trial``), the complete ones with their ``cv/ndcg``. Returns the name."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState, create_trial

    from core.runs.sweep import SweepSettings, journal_path, sweeps_dir

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sweeps_dir(db).mkdir(exist_ok=True)
    settings = SweepSettings(
        name=name,
        config=str(sweeps_dir(db) / f"{name}.base.yaml"),
        space=[
            {"key": "train.lr", "type": "float", "low": 1e-5, "high": 1e-3, "log": True},
            {"key": "train.epochs", "type": "int", "low": 1, "high": 4},
            {"key": "model.pooling", "type": "categorical", "choices": ["mean", "cls"]},
        ],
        trials=total,
        parallel=2,
        seed=0,
        created="2026-11-22T10:00:00",
    )
    study = optuna.create_study(
        storage=JournalStorage(JournalFileBackend(str(journal_path(db, name)))), study_name=name, direction="maximize"
    )
    study.set_user_attr("sweep", settings.to_attr())
    dists = {
        "train.lr": FloatDistribution(1e-5, 1e-3, log=True),
        "train.epochs": IntDistribution(1, 4),
        "model.pooling": CategoricalDistribution(["mean", "cls"]),
    }
    store = RunStore(db)
    for i, (state, value, lr, epochs, pooling, status) in enumerate(SWEEP_TRIALS):
        rid = sweep_run_id(i)
        study.add_trial(
            create_trial(
                state=getattr(TrialState, state.upper()),
                value=value,
                params={"train.lr": lr, "train.epochs": epochs, "model.pooling": pooling},
                distributions=dists,
                user_attrs={"run_id": rid},
                intermediate_values={0: 0.78} if state == "pruned" else None,
            )
        )
        cfg = _config(f"{name}-t{i}", lr, 0, folds=2, epochs=epochs)
        store.create_run(f"{name}-t{i}", cfg, run_dir=f"runs/{rid}", run_id=rid, status=status)
        start = -3000 + 300 * i
        store.update_run(
            rid,
            created=_iso(start - 5),
            started=_iso(start),
            ended=None if status == "running" else _iso(start + 240),
            host="gpu-box",
            git_commit="abc1234",
        )
        store.set_sweep_trial(rid, name, i)
        if value is not None:
            store.log_metrics(rid, [{"name": "cv/ndcg", "value": value, "fold": -1, "time": NOW + start + 240}])
    store.close()
    return name


#: the stack run of :func:`add_stack_run`: a finished ``workbench stack`` over the two finished runs
STACK_RUN = "20261122-115000-stck"
#: its feature importance: task -> (feature, gain); shares are gain / the task's total
STACK_IMPORTANCE = {
    "rank": [
        ("m1.eg_z", 520.0),
        ("m0.eg_z", 310.0),
        ("m1.p_E_qmax", 160.0),
        ("dense-e5_rank", 120.0),
        ("bm25_z", 95.0),
        ("m0.p_E", 80.0),
        ("query.products", 61.0),
        ("m1.eg_rank", 52.0),
        ("lex.title_overlap", 40.0),
        ("m0.eg_qmedian", 33.0),
        ("dense_z", 25.0),
        ("query.words", 18.0),
        ("lex.brand_in_query", 12.0),
        ("query.locale", 6.0),
    ],
    "esci": [("m1.p_S", 410.0), ("m1.p_E", 300.0), ("m0.p_C", 150.0), ("bm25", 90.0), ("query.chars", 30.0)],
    "substitute": [("m1.p_S", 200.0), ("m0.p_S", 120.0), ("m1.eg_z", 20.0)],
}
STACK_REPORT = {
    "cv": {"ndcg": 0.8712, "ndcg_probs": 0.8598, "task2_f1": 0.7234, "task3_f1": 0.8123, "majority_f1": 0.65},
    "held_out": {"ndcg": 0.8655, "ndcg_probs": 0.8541, "task2_f1": 0.7188, "task3_f1": 0.8101, "majority_f1": 0.64},
    "members": {"m0": {"run": "20261122-090000-aaaa", "oof_ndcg": 0.84}, "m1": {"run": "20261122-100000-bbbb"}},
    "rounds": {"rank": {"0": 120.0}},
    "seconds": 41.5,
}


def add_stack_run(db: Path, files: bool = True, status: str = "finished") -> str:
    """Add a stack run (``kind: stack``, as ``core.scoring.stack.record_stack`` records it) to a
    fixture runs.db: 3 folds done, its CV metrics, a train.log of INFO lines and, with ``files``,
    ``feature_importance.csv`` (:data:`STACK_IMPORTANCE`) and ``stack_report.json``
    (:data:`STACK_REPORT`) in its folder. Returns its id."""
    import pandas as pd

    root = Path(db).parent
    cfg = {
        "kind": "stack",
        "name": "stack",
        "output_dir": "runs",
        "data": {"dir": "data/esci_us_150q", "task": 1},
        "model": {"name": "lightgbm-stack"},
        "train": {"folds": 3, "seed": 0},
        "members": ["20261122-090000-aaaa", "20261122-100000-bbbb"],
        "stack": {"ranker": "lambdarank", "test_features": "per_fold"},
    }
    run_dir = root / "runs" / STACK_RUN
    run_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(db)
    store.create_run("stack", cfg, run_dir=str(run_dir), run_id=STACK_RUN, status=status)
    store.update_run(
        STACK_RUN,
        created=_iso(-605),
        started=_iso(-600),
        ended=None if status == "running" else _iso(-558),
        exit_code=None if status == "running" else 0,
        host="gpu-box",
        git_commit="abc1234",
    )
    rows = [{"name": "fold/final_ndcg", "value": 0.868 + 0.002 * k, "fold": k, "time": NOW - 590 + k} for k in range(3)]
    rows += [{"name": "fold/done", "value": 1.0, "fold": k, "time": NOW - 590 + k} for k in range(3)]
    rows += [
        {"name": f"cv/{short}", "value": STACK_REPORT["cv"][key], "fold": -1, "time": NOW - 560}
        for short, key in CV_METRICS.items()
    ]
    store.log_metrics(STACK_RUN, rows)
    store.close()
    (run_dir / "train.log").write_text(
        "2026-11-22 11:50:00 INFO stack: fold 0 (fitted on folds [1, 2])\n"
        "2026-11-22 11:50:14 INFO stack: fold 1 (fitted on folds [0, 2])\n"
        "2026-11-22 11:50:28 INFO stack: fold 2 (fitted on folds [0, 1])\n"
        f"2026-11-22 11:50:42 INFO stack {STACK_RUN}: CV final nDCG 0.8712, Task 2 F1 0.7234 (41.5 s)\n"
    )
    if files:
        frames = []
        for task, rows_ in STACK_IMPORTANCE.items():
            total = sum(g for _, g in rows_)
            frames.append(
                pd.DataFrame({"task": task, "feature": [f for f, _ in rows_], "gain": [g for _, g in rows_]}).assign(
                    share=lambda d, t=total: d["gain"] / t
                )
            )
        pd.concat(frames, ignore_index=True).to_csv(run_dir / "feature_importance.csv", index=False)
        (run_dir / "stack_report.json").write_text(json.dumps(STACK_REPORT, indent=1))
    return STACK_RUN


#: the statuses of :func:`build_many_runs`'s runs (the newest ``running`` of them are running)
MANY_STATUSES = ["finished"] * 8 + ["failed", "crashed", "stopped", "partial"]
MANY_MODELS = ["all-MiniLM-L6-v2", "multilingual-e5-small", "sentence-transformers/all-mpnet-base-v2", None]


def build_many_runs(path: Path, n_runs: int, seed: int = 0, running: int = 4) -> Path:
    """A runs.db with ``n_runs`` runs like a sweep's (bulk inserts, seconds for 100,000): each with 5
    folds of eval points (2 per fold), fold/* rows and, when finished, CV values (~35 metric rows);
    varied names, statuses (the newest ``running`` running), models (one with a folder, some none),
    tasks, sweeps and trials, every 50th a Slurm run and every 97th a stack run. ``created`` is one
    second apart from run to run; run 0 is the oldest. Returns ``path``."""
    import random

    rng = random.Random(seed)
    store = RunStore(path)
    runs, metrics = [], []
    t0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    for i in range(n_runs):
        rid = f"20261101-{i:06d}-{i % 65536:04x}"
        status = "running" if i >= n_runs - running else rng.choice(MANY_STATUSES)
        kind = "stack" if i % 97 == 0 else None
        model = rng.choice(MANY_MODELS)
        cfg = {"name": f"run{i}", "model": {"name": model}, "train": {"folds": 5, "lr": rng.choice([1e-4, 3e-5])}}
        if kind:
            cfg["kind"] = kind
        slurm = i % 50 == 0
        created = datetime.fromtimestamp(t0 + i, UTC).isoformat(timespec="seconds")
        started = datetime.fromtimestamp(t0 + i + rng.randint(1, 30), UTC).isoformat(timespec="seconds")
        ended = None if status == "running" else datetime.fromtimestamp(t0 + i + 60 + rng.randint(0, 3000), UTC)
        runs.append(
            (
                rid,
                f"{'Sweep' if i % 3 else 'sweep'}-{i % 97}-{i}",
                status,
                rng.choice([1, 1, 2, 3, None]),
                model,
                json.dumps(cfg),
                None,
                None,
                "bench",
                created,
                started,
                ended.isoformat(timespec="seconds") if ended else None,
                0,
                "abc",
                f"/tmp/runs/{rid}",
                None,
                "slurm" if slurm else None,
                str(4000 + i) if slurm else None,
                rng.choice(["PENDING", "RUNNING", "COMPLETED"]) if slurm else None,
                f"sw{i % 7}" if i % 2 else None,
                i // 2 if i % 2 else None,
            )
        )
        base = rng.uniform(0.78, 0.86)
        for f in range(5):
            for e in range(2):
                metrics.append((rid, f, e * 10, e + 1.0, "eval/ndcg", base + rng.gauss(0, 0.01), 0.0))
                metrics.append((rid, f, e * 10, e + 1.0, "eval/task2_f1", base - 0.3 + rng.gauss(0, 0.01), 0.0))
            if status != "running" or f < 2:
                metrics += [
                    (rid, f, None, None, "fold/ndcg", base, 0.0),
                    (rid, f, None, None, "fold/done", 1.0, 0.0),
                    (rid, f, None, None, "fold/task2_f1", base - 0.3, 0.0),
                ]
        if status == "finished":
            metrics += [
                (rid, -1, None, None, "cv/ndcg", base, 0.0),
                (rid, -1, None, None, "cv/task2_f1", base - 0.3, 0.0),
            ]
    with store._tx() as c:
        c.executemany(
            "INSERT INTO runs (id, name, status, task, model, config, pid, process_start_time, host, created, "
            "started, ended, exit_code, git_commit, run_dir, error, backend, job_id, job_state, sweep, trial) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            runs,
        )
        c.executemany(
            "INSERT INTO metrics (run_id, fold, step, epoch, name, value, time) VALUES (?,?,?,?,?,?,?)", metrics
        )
    store.close()
    return path
