"""runs.db: schema, best-not-last, and concurrent writers."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from core.errors import WorkbenchError
from core.runs.store import RunStore


def _writer(path: str, run_id: str, n: int) -> None:
    store = RunStore(path)
    for i in range(n):
        store.log_metrics(
            run_id,
            [
                {"name": "train/loss", "value": float(i), "fold": 0, "step": i},
                {"name": "train/lr", "value": 1e-5, "fold": 0, "step": i},
            ],
        )
    store.close()


def _reader(path: str, n_reads: int, out) -> None:
    store = RunStore(path, readonly=True)
    counts = []
    for _ in range(n_reads):
        counts.append(store.db.execute("SELECT COUNT(*) FROM metrics").fetchone()[0])
    out.put(counts)


def test_two_writer_processes_and_a_reader_lose_no_rows(tmp_path):
    path = str(tmp_path / "runs.db")
    store = RunStore(path)
    a = store.create_run("a", {"data": {"task": 1}, "model": {"name": "m"}})
    b = store.create_run("b", {"data": {"task": 1}, "model": {"name": "m"}})
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(path, a, 300)),
        ctx.Process(target=_writer, args=(path, b, 300)),
        ctx.Process(target=_reader, args=(path, 200, q)),
    ]
    for p in procs:
        p.start()
    counts = q.get(timeout=120)
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert counts == sorted(counts)  # the reader never sees rows disappear
    n = store.db.execute("SELECT run_id, COUNT(*) FROM metrics GROUP BY run_id ORDER BY run_id").fetchall()
    assert dict(n) == {a: 600, b: 600}
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_list_runs_reports_best_not_last(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    r = store.create_run("r", {"data": {"task": 1}, "model": {"name": "m"}, "train": {"folds": 2}})
    store.log_metrics(
        r,
        [
            {"name": "eval/ndcg", "value": 0.80, "fold": 0},
            {"name": "eval/ndcg", "value": 0.86, "fold": 0},
            {"name": "eval/ndcg", "value": 0.82, "fold": 0},  # last is worse than best
            {"name": "eval/ndcg", "value": 0.90, "fold": 1},
            {"name": "eval/ndcg", "value": 0.88, "fold": 1},
            {"name": "fold/done", "value": 1, "fold": 0},
        ],
    )
    row = store.list_runs()[0]
    assert row["best_ndcg"] == pytest.approx((0.86 + 0.90) / 2)
    assert row["folds_done"] == 1
    store.log_metrics(r, [{"name": "cv/ndcg", "value": 0.875, "fold": -1}])
    assert store.list_runs()[0]["best_ndcg"] == pytest.approx(0.875)


def test_get_run_prefix_and_errors(tmp_path):
    store = RunStore(tmp_path / "runs.db")
    r = store.create_run("r", {}, run_id="20260101-000000-abcd")
    assert store.get_run("20260101-000000-ab")["id"] == r
    with pytest.raises(WorkbenchError, match="no run"):
        store.get_run("nope")
    with pytest.raises(WorkbenchError, match="no run"):
        store.update_run("nope", status="x")


def test_not_a_database(tmp_path):
    bad = tmp_path / "runs.db"
    bad.write_text("this is not sqlite " * 100)
    with pytest.raises(WorkbenchError, match="runs.db"):
        RunStore(bad)
    with pytest.raises(WorkbenchError, match="no runs database"):
        RunStore(tmp_path / "missing.db", readonly=True)


def test_runs_compare_gives_each_difference_with_its_interval(tmp_path, monkeypatch):
    import json

    import workbench.cli as cli

    # an 80-column terminal, whatever width another test module gave the CLI's console (test_cli: 200)
    monkeypatch.setattr(cli.console, "width", 80)

    from typer.testing import CliRunner

    from core.scoring.significance import describe, f1_diff, ndcg_diff
    from oof_fixture import oof_frame, oof_run
    from workbench.cli import app

    store = RunStore(tmp_path / "runs.db")
    fa = oof_frame(noise=1.5, seed=1)
    fb = oof_frame(noise=0.5, seed=2)  # the same examples, better predictions
    fc = oof_frame(noise=0.6, seed=3).drop(columns="ce_score").iloc[: 6 * 30]  # 30 of the 40 queries
    a, b, c = (oof_run(store, tmp_path, n, f) for n, f in (("base", fa), ("better", fb), ("other", fc)))
    res = CliRunner().invoke(app, ["runs", "compare", a, b, c, "--db", store.path, "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["run_id"] for r in rows] == [b, c] and rows[0]["base_id"] == a
    want = ndcg_diff(fa, fb)  # the same interval from the frames themselves
    assert rows[0]["deltas"]["ndcg"] == want.to_dict()
    assert rows[0]["deltas"]["ce_ndcg"] == ndcg_diff(fa, fb, "ce_score").to_dict()
    assert rows[0]["deltas"]["task2_f1"] == f1_diff(fa, fb).to_dict()
    assert want.diff > 0 and not want.within_noise and f1_diff(fa, fb).within_noise
    assert rows[1]["deltas"]["ce_ndcg"] is None and rows[1]["deltas"]["ndcg"]["n_queries"] == 30
    res = CliRunner().invoke(app, ["runs", "compare", a, b, c, "--db", store.path], terminal_width=80)
    assert res.exit_code == 0, res.output
    assert all(len(line) <= 80 for line in res.output.splitlines()), res.output
    assert describe(want) in res.output and "(40 common queries)" in res.output and "(30 common" in res.output
    assert "no ce_score" in res.output and "(2,000 resamples of queries, seed 0)" in " ".join(res.output.split())
    # no query in common: one line, exit 2
    d = oof_run(store, tmp_path, "elsewhere", oof_frame(first_query=1000))
    res = CliRunner().invoke(app, ["runs", "compare", a, d, "--db", store.path])
    assert isinstance(res.exception, WorkbenchError) and "share no query" in str(res.exception)
    res = CliRunner().invoke(app, ["runs", "compare", a, "--db", store.path])
    assert isinstance(res.exception, WorkbenchError) and "at least two runs" in str(res.exception)
