"""Runs screen at sweep scale: first paint, page-down and filter with 1,000, 10,000 and 100,000 runs
in runs.db, the paged screen against the old code path (every run read, filtered and sorted in
memory: ``RunsScreen.PAGED_ABOVE`` set above the number of runs) in the same process.

Targets (issue 16, part 4), at 100,000 runs: first paint < 1 s, page-down < 100 ms, filter < 300 ms.

- first paint: from creating the app to the first frame with the runs drawn (100x30, headless).
- page-down: mean of ``--pages`` presses, each until the new page's rows are drawn (read, when
  the page lies outside the window held).
- page-down (screen): the same pages, timing only the key's action and the drawing of the page's
  lines (and, for a page not read yet, the wait for its rows), not Pilot's key delivery.
- filter: the filter box holds all but the last character of ``--filter``; from that last key to
  the frame with exactly the matching runs (the mean of ``--repeats`` tries, the box cleared between).

    python benchmarks/tui_runs.py [--sizes 1000 10000 100000] [--pages 30] [--filter sweep-7] [--dbdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fixture builder, FakeGpuProbe

from tui_fixture import FakeGpuProbe, build_many_runs

TARGETS = {"first paint": 1.0, "page-down": 0.100, "page-down (screen)": 0.100, "filter": 0.300}


def _all_drawn(screen) -> bool:
    """Whether every body line of the table shows a run (none is the placeholder of a row not read)."""
    return not any(line.strip() == "…" for line in screen.table.plain_lines()[1:])


async def _until(pilot, pred, timeout: float = 120.0) -> None:
    end = time.perf_counter() + timeout
    while not pred():
        if time.perf_counter() > end:
            raise TimeoutError("the screen did not get there")
        await pilot.pause(0.001)


async def measure(
    db: Path, pages: int, text: str, n_match: tuple[int, int], repeats: int, old_path: bool
) -> dict[str, float]:
    """{first paint, page-down, filter} in seconds for the Runs screen over ``db``; ``old_path``:
    every run read and filtered in memory (the code before paging); ``n_match``: the runs that
    ``text`` and ``text[:-1]`` keep."""
    import core.runs.slurm
    from workbench.tui.app import WorkbenchApp
    from workbench.tui.runs import RunsScreen

    core.runs.slurm.refresh = lambda store: []  # the fixture's Slurm jobs are made up: squeue is not asked
    n_match, n_prefix = n_match
    saved = RunsScreen.PAGED_ABOVE
    RunsScreen.PAGED_ABOVE = 10**9 if old_path else saved
    try:
        t0 = time.perf_counter()
        app = WorkbenchApp(str(db), gpu_probe=FakeGpuProbe(), refresh_interval=3600)
        async with app.run_test(size=(100, 30)) as pilot:
            await _until(pilot, lambda: getattr(app.screen, "loaded", False))
            screen = app.screen
            await pilot.pause()  # the frame with the rows is drawn
            out = {"first paint": time.perf_counter() - t0}
            t = screen.table
            t1 = time.perf_counter()
            for page in range(1, pages + 1):
                await pilot.press("pagedown")
                await _until(pilot, lambda p=page: t.cursor == p * t.body_height and _all_drawn(screen))
            out["page-down"] = (time.perf_counter() - t1) / pages
            await pilot.press("home")
            await _until(pilot, lambda: t.current is not None)
            # the screen's own share of a page-down: the key's action and drawing the page's lines,
            # without Pilot's key delivery and idle waits (a page outside the window: its read too)
            t1 = time.perf_counter()
            for _ in range(pages):
                t.action_page(1)
                t.plain_lines()
                if not _all_drawn(screen):
                    await _until(pilot, lambda: _all_drawn(screen))
            out["page-down (screen)"] = (time.perf_counter() - t1) / pages
            await pilot.press("home")
            await _until(pilot, lambda: t.current is not None)
            times = []
            for _ in range(repeats):
                await pilot.press("slash", *text[:-1])
                # the list for all but the last character shown, no read of runs.db under way
                await _until(pilot, lambda: len(t.rows) == n_prefix and not screen._reading and _all_drawn(screen))
                await pilot.pause()
                t2 = time.perf_counter()
                await pilot.press(text[-1])
                await _until(pilot, lambda: len(t.rows) == n_match and _all_drawn(screen))
                await pilot.pause()
                times.append(time.perf_counter() - t2)
                await pilot.press("escape")
                await _until(pilot, lambda: screen.filter_text == "" and len(t.rows) > n_match)
            out["filter"] = sum(times) / len(times)
        return out
    finally:
        RunsScreen.PAGED_ABOVE = saved


def count_matches(db: Path, text: str) -> int:
    """How many runs the filter ``text`` keeps (the in-memory filter over every run)."""
    from core.runs.store import RunStore
    from workbench.tui.runs import matches, run_rows
    from workbench.tui.services import Services

    store = RunStore(db, readonly=True)
    try:
        return sum(matches(r, text) for r in run_rows(store.list_runs(), Services(str(db))))
    finally:
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--pages", type=int, default=30)
    ap.add_argument("--filter", default="sweep-7")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-old", action="store_true", help="skip the old code path (slow at 100,000 runs)")
    ap.add_argument("--dbdir", type=Path, help="keep the built runs<N>.db here and reuse them (else a temp folder)")
    args = ap.parse_args()
    print(
        f"{'runs':>7} {'measure':>18} {'paged':>10} {'old path':>10} {'old/paged':>9} {'target':>8} {'paged/target':>12}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            db = (args.dbdir or Path(tmp)) / f"runs{n}.db"
            t = time.perf_counter()
            if not db.exists():
                build_many_runs(db, n)
            n_match = count_matches(db, args.filter)
            n_prefix = count_matches(db, args.filter[:-1])
            print(
                f"# {n} runs built or found in {time.perf_counter() - t:.1f} s; filter {args.filter!r} keeps {n_match}"
            )
            new = asyncio.run(measure(db, args.pages, args.filter, (n_match, n_prefix), args.repeats, old_path=False))
            old = (
                None
                if args.no_old
                else asyncio.run(measure(db, args.pages, args.filter, (n_match, n_prefix), 1, old_path=True))
            )
            for key, target in TARGETS.items():
                o = f"{old[key] * 1000:>7.0f} ms {old[key] / new[key]:>8.2f}x" if old else f"{'-':>10} {'-':>9}"
                print(
                    f"{n:>7} {key:>18} {new[key] * 1000:>7.0f} ms {o} {target * 1000:>5.0f} ms "
                    f"{new[key] / target:>11.2f}x",
                    flush=True,
                )
    print("paged: this screen; old path: every run read, filtered and sorted in memory (the code before paging,")
    print("RunsScreen.PAGED_ABOVE raised), same process; paged/target < 1 meets the target")


if __name__ == "__main__":
    main()
