"""Runs screen at scale: time to first paint with 1,000 and 10,000 runs in runs.db, and time per
scroll page, against Textual's built-in DataTable filled with the same rows in the same process.

Target (issue 3): first paint < 1 s at 1,000 runs.

    python benchmarks/tui_runs.py [--sizes 1000 10000] [--pages 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test double FakeGpuProbe

from core.runs.store import RunStore
from tui_fixture import FakeGpuProbe

STATUSES = ["finished"] * 8 + ["failed", "crashed", "stopped", "running"]


def build_db(path: Path, n_runs: int, seed: int = 0) -> None:
    """``n_runs`` runs, each with 5 folds of fold/* metrics, 10 eval points and CV values
    (~35 metric rows per run), written with bulk inserts."""
    rng = random.Random(seed)
    store = RunStore(path)
    runs, metrics = [], []
    for i in range(n_runs):
        rid = f"20261101-{i // 3600:02d}{i // 60 % 60:02d}{i % 60:02d}-{i:05x}"
        status = rng.choice(STATUSES)
        cfg = {
            "name": f"run{i}",
            "model": {"name": rng.choice(["all-MiniLM-L6-v2", "multilingual-e5-small"])},
            "train": {"folds": 5, "lr": rng.choice([1e-4, 3e-5, 2e-5]), "seed": i},
        }
        runs.append(
            (
                rid,
                f"sweep-{i % 97}-{i}",
                status,
                1,
                cfg["model"]["name"],
                json.dumps(cfg),
                None,
                None,
                "bench",
                f"2026-11-01T00:{i % 60:02d}:00+00:00",
                f"2026-11-01T00:{i % 60:02d}:05+00:00",
                f"2026-11-01T01:{i % 60:02d}:00+00:00",
                0,
                "abc",
                f"runs/{rid}",
                None,
            )
        )
        base = rng.uniform(0.78, 0.86)
        for f in range(5):
            for e in range(2):
                metrics.append((rid, f, e * 10, e + 1.0, "eval/ndcg", base + rng.gauss(0, 0.01), 0.0))
                metrics.append((rid, f, e * 10, e + 1.0, "eval/task2_f1", base - 0.3 + rng.gauss(0, 0.01), 0.0))
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
            "started, ended, exit_code, git_commit, run_dir, error) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            runs,
        )
        c.executemany(
            "INSERT INTO metrics (run_id, fold, step, epoch, name, value, time) VALUES (?,?,?,?,?,?,?)", metrics
        )
    store.close()


async def _page_down_time(pilot, pages: int) -> float:
    """Mean seconds per page-down, each followed by a redraw."""
    t1 = time.perf_counter()
    for _ in range(pages):
        await pilot.press("pagedown")
        await pilot.pause()
    return (time.perf_counter() - t1) / pages


async def time_workbench(db: Path, pages: int) -> tuple[float, float]:
    """(seconds to first paint of the Runs screen with all rows, seconds per page-down)."""
    from workbench.tui.app import WorkbenchApp

    t0 = time.perf_counter()
    app = WorkbenchApp(str(db), gpu_probe=FakeGpuProbe(), refresh_interval=3600)
    async with app.run_test(size=(100, 30)) as pilot:
        screen = app.screen
        while not getattr(screen, "loaded", False):
            await asyncio.sleep(0.005)
            screen = app.screen
        await pilot.pause()  # the frame with the rows is drawn
        first = time.perf_counter() - t0
        per_page = await _page_down_time(pilot, pages)
        assert screen.table.cursor > 0
    return first, per_page


async def time_builtin_datatable(db: Path, pages: int) -> tuple[float, float]:
    """Baseline: the same query, rows added to Textual's built-in DataTable."""
    from textual.app import App
    from textual.widgets import DataTable

    class Baseline(App):
        def compose(self):
            yield DataTable(cursor_type="row")

        def on_mount(self):
            store = RunStore(db)
            rows = store.list_runs()
            t = self.query_one(DataTable)
            t.add_columns("name", "status", "T", "model", "folds", "nDCG", "F1", "started")
            t.add_rows(
                [
                    (
                        r["name"],
                        r["status"],
                        r["task"],
                        r["model"],
                        r["folds_done"],
                        r["best_ndcg"],
                        r["best_f1"],
                        r["started"],
                    )
                    for r in rows
                ]
            )
            t.focus()
            self.ready = True

    t0 = time.perf_counter()
    app = Baseline()
    app.ready = False
    async with app.run_test(size=(100, 30)) as pilot:
        while not app.ready:
            await asyncio.sleep(0.005)
        await pilot.pause()
        first = time.perf_counter() - t0
        per_page = await _page_down_time(pilot, pages)
    return first, per_page


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--pages", type=int, default=30)
    args = ap.parse_args()
    print(
        f"{'runs':>6} {'workbench first paint':>22} {'per page':>9} {'DataTable first paint':>22} {'per page':>9} {'ratio':>6}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            db = Path(tmp) / f"runs{n}.db"
            build_db(db, n)
            wb_first, wb_page = asyncio.run(time_workbench(db, args.pages))
            dt_first, dt_page = asyncio.run(time_builtin_datatable(db, args.pages))
            print(
                f"{n:>6} {wb_first:>20.3f} s {wb_page * 1000:>6.1f} ms {dt_first:>20.3f} s {dt_page * 1000:>6.1f} ms "
                f"{wb_first / dt_first:>5.2f}x",
                flush=True,
            )
    print(
        "ratio = workbench first paint / built-in DataTable first paint (same rows, same process); "
        "target: workbench first paint < 1 s at 1,000 runs"
    )


if __name__ == "__main__":
    main()
