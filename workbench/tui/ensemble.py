"""The Ensemble screen: mark members, change weights, watch the OOF scores, build submissions.

Open it with the marked runs: ``app.push_screen(EnsembleScreen(db_path, run_ids))``. The runs' blend
scorers (``bm25``, ``dense``, from the first run's ``oof.parquet``) are offered as extra members
(Task 1 only). All heavy work (parquet loading, fitting, writing) runs in thread workers that post
MembersLoaded / EnsembleComputed / EnsembleBuilt; each opens its own runs.db connection and closes
it (the build's writable one only for its one write). Errors become error toasts. Fits 80x24.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from core.runs.store import RunStore
from core.scoring.ensemble import SCORERS, MemberSet, build_ensemble, load_members, write_ensemble
from workbench.tui.messages import EnsembleBuilt, EnsembleComputed, MembersLoaded, WorkerFailed
from workbench.tui.workers import WorkerErrors

STEP = 0.1


class EnsembleScreen(WorkerErrors, Screen):
    """Ensemble builder over ``run_ids`` of the runs.db at ``store`` (a path, or a
    :class:`core.runs.store.RunStore` whose ``path`` is used).

    Keys: space mark/unmark the highlighted member, ``+``/``-`` change its weight by 0.1 (the
    weights are renormalised over the marked members), ``a`` fit weights on OOF (Caruana
    selection), ``e`` equal weights, ``b`` build: fit nothing, combine with the shown weights,
    write + validate the three tasks' files under ``out_dir/<name>/`` and record the ensemble.
    """

    BINDINGS = [
        Binding("space", "toggle", "mark"),
        Binding("plus,equals_sign", "weight(1)", "w+"),
        Binding("minus", "weight(-1)", "w-"),
        Binding("a", "auto", "auto w"),
        Binding("e", "equal", "equal w"),
        Binding("b", "build", "build"),
        Binding("escape", "back", "back"),
    ]
    WORKER_TITLES = {"ens-load": "ensemble", "ens-fit": "ensemble", "ens-build": "build"}
    DEFAULT_CSS = """
    EnsembleScreen { layout: vertical; }
    EnsembleScreen #ens-title { height: 1; background: $boost; text-style: bold; }
    EnsembleScreen DataTable { height: 1fr; }
    EnsembleScreen #ens-score { height: 3; }
    EnsembleScreen #ens-status { height: 3; color: $text-muted; }
    """

    def __init__(self, store, run_ids: list[str], out_dir: str | Path = "submissions", name: str | None = None):
        super().__init__(name=name)
        self.db_path = str(getattr(store, "path", store))
        self.run_ids = list(run_ids)
        self.out_dir = Path(out_dir)
        self.ms: MemberSet | None = None
        self.marked: list[bool] = []
        self.weights: np.ndarray = np.zeros(0)
        self.last_tasks: dict = {}
        self.last_paths: list[str] = []

    def compose(self) -> ComposeResult:
        yield Static(f"Ensemble of {len(self.run_ids)} run(s): loading OOF predictions…", id="ens-title")
        table = DataTable(id="ens-table", cursor_type="row", zebra_stripes=True)
        table.add_columns("", "member", "w", "T1 nDCG", "T2 F1", "T3 F1")
        yield table
        yield Static("", id="ens-score")
        yield Static("space mark  +/- weight  a auto  e equal  b build all tasks  esc back", id="ens-status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).focus()
        self._load()

    # -- loading ---------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="ens-load", exit_on_error=False)
    def _load(self) -> None:
        import pyarrow.parquet as pq

        store = RunStore(self.db_path, readonly=True)
        try:
            specs = list(self.run_ids)
            if specs:  # offer the first run's blend scorers (bm25, dense) as Task 1 members
                oof_path = Path(store.get_run(specs[0])["run_dir"] or "") / "oof.parquet"
                if oof_path.is_file():
                    cols = set(pq.read_schema(oof_path).names)
                    specs += [s for s in SCORERS if s in cols]
            ms = load_members(store, specs)
        finally:
            store.close()
        self.post_message(MembersLoaded(ms))

    def on_worker_failed(self, message: WorkerFailed) -> None:
        if message.group == "ens-load":
            self._set_title(f"Ensemble: cannot load ({message.error})")
        elif message.group == "ens-build":
            self.query_one("#ens-status", Static).update(f"build failed: {message.error}")

    def _set_title(self, text: str) -> None:
        self.query_one("#ens-title", Static).update(text)

    def on_members_loaded(self, message: MembersLoaded) -> None:
        self.ms = ms = message.members
        n = len(ms.members)
        self.marked = [m.kind == "run" for m in ms.members]
        self.weights = np.array([1.0 if mk else 0.0 for mk in self.marked])
        self.weights /= max(self.weights.sum(), 1e-12)
        test = f"{len(ms.test)} test rows" if ms.test is not None else "no test rows"
        self._set_title(f"Ensemble: {n} members, {len(ms.oof)} OOF rows, {test}")
        self._refresh_table()
        self._recompute()

    # -- table -----------------------------------------------------------------------------------
    def _refresh_table(self) -> None:
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        t = self.last_tasks
        for i, m in enumerate(self.ms.members):
            vals = []
            for task in (1, 2, 3):
                per = t.get(task, {}).get("oof_member", {})
                vals.append(f"{per[m.name]:.4f}" if m.name in per else "-")
            name = m.name if len(m.name) <= 24 else m.name[:23] + "…"
            table.add_row("●" if self.marked[i] else " ", name, f"{self.weights[i]:.2f}", *vals, key=str(i))
        if t:
            vals = [f"{t[k]['oof_ensemble']:.4f}" if k in t else "-" for k in (1, 2, 3)]
            table.add_row("", "ensemble", "", *vals, key="ensemble")
        if row is not None and 0 <= row < len(self.ms.members):
            table.move_cursor(row=row)

    def _cursor_member(self) -> int | None:
        if self.ms is None:
            return None
        row = self.query_one(DataTable).cursor_row
        return row if row is not None and 0 <= row < len(self.ms.members) else None

    def _subset(self) -> tuple[MemberSet, np.ndarray]:
        idx = [i for i, mk in enumerate(self.marked) if mk]
        sub = MemberSet([self.ms.members[i] for i in idx], self.ms.oof, self.ms.test)
        w = self.weights[idx]
        return sub, (w / w.sum() if w.sum() > 0 else np.full(len(idx), 1.0 / max(len(idx), 1)))

    def _tasks(self, sub: MemberSet) -> tuple[int, ...]:
        return (1, 2, 3) if any(m.has_probs for m in sub.members) else (1,)

    # -- actions ---------------------------------------------------------------------------------
    def action_toggle(self) -> None:
        i = self._cursor_member()
        if i is None:
            return
        self.marked[i] = not self.marked[i]
        if self.marked[i] and self.weights[i] == 0:
            self.weights[i] = STEP
        if not self.marked[i]:
            self.weights[i] = 0.0
        self._normalise()
        self._refresh_table()
        self._recompute()

    def action_weight(self, direction: int) -> None:
        i = self._cursor_member()
        if i is None or not self.marked[i]:
            return
        self.weights[i] = max(0.0, self.weights[i] + direction * STEP)
        self._normalise()
        self._refresh_table()
        self._recompute()

    def _normalise(self) -> None:
        self.weights = np.where(self.marked, self.weights, 0.0)
        s = self.weights.sum()
        if s > 0:
            self.weights = self.weights / s

    def action_equal(self) -> None:
        if self.ms is None:
            return
        self.weights = np.array([1.0 if mk else 0.0 for mk in self.marked])
        self._normalise()
        self._refresh_table()
        self._recompute()

    def action_auto(self) -> None:
        if self.ms is not None and any(self.marked):
            self._recompute(fit=True)

    def action_back(self) -> None:
        self.app.pop_screen()

    # -- workers ---------------------------------------------------------------------------------
    def _recompute(self, fit: bool = False) -> None:
        """Score the ensemble with the shown weights (``fit``: fit them on OOF) in a worker."""
        if self.ms is None or not any(self.marked):
            return
        if fit:
            sub, _ = self._subset()
            self._score(sub, self._tasks(sub), "auto", fit, list(self.marked))
        else:  # all members (unmarked ones with weight 0), so every member's own figure shows
            w = np.where(self.marked, self.weights, 0.0)
            if w.sum() <= 0:
                w = np.array(self.marked, dtype=float)
            probs = any(m.has_probs and wi > 0 for m, wi in zip(self.ms.members, w))
            self._score(self.ms, (1, 2, 3) if probs else (1,), w / w.sum(), fit, list(self.marked))

    @work(thread=True, exclusive=True, group="ens-fit", exit_on_error=False)
    def _score(self, members: MemberSet, tasks: tuple[int, ...], weights, fit: bool, marked: list[bool]) -> None:
        self.post_message(EnsembleComputed(build_ensemble(members, tasks, weights), fit, marked))

    def on_ensemble_computed(self, message: EnsembleComputed) -> None:
        self._show(message.result, message.fit, message.marked)

    def _show(self, res, fit: bool, marked: list[bool] | None = None) -> None:
        if fit and 1 in res.tasks:
            idx = [i for i, mk in enumerate(marked or self.marked) if mk]
            w = np.zeros(len(self.marked))
            w[idx] = res.tasks[1]["weights"]
            self.weights = w
        self.last_tasks = res.tasks
        self._refresh_table()
        parts = [f"T{k} {v['oof_ensemble']:.4f}" for k, v in sorted(res.tasks.items())]
        thr = f"  T3 threshold p(S) >= {res.tasks[3]['threshold']:.3f}" if 3 in res.tasks else ""
        self.query_one("#ens-score", Static).update(
            "OOF ensemble: " + "  ".join(parts) + thr + ("\n" + "; ".join(res.notes) if res.notes else "")
        )

    def action_build(self) -> None:
        if self.ms is None or not any(self.marked):
            self.notify("mark at least one member first", severity="warning")
            return
        self.query_one("#ens-status", Static).update("building…")
        sub, w = self._subset()
        self._build(sub, w)

    @work(thread=True, exclusive=True, group="ens-build", exit_on_error=False)
    def _build(self, sub: MemberSet, w: np.ndarray) -> None:
        """Worker: combine, write + validate the files, record the ensemble (its own writable
        connection, closed after the one write)."""
        res = build_ensemble(sub, self._tasks(sub), w)
        name = time.strftime("ens-%Y%m%d-%H%M%S")
        writer = RunStore(self.db_path)
        try:
            manifest = write_ensemble(
                res,
                sub,
                self.out_dir / name,
                name,
                store=writer,
                extra={"options": {"weights": [float(x) for x in w], "source": "tui"}},
            )
        finally:
            writer.close()
        self.post_message(EnsembleBuilt(res, manifest))

    def on_ensemble_built(self, message: EnsembleBuilt) -> None:
        res, manifest = message.result, message.manifest
        self._show(res, False)
        self.last_paths = [f["path"] for f in manifest["files"].values()]
        self.query_one("#ens-status", Static).update("written + valid: " + "  ".join(self.last_paths))
        self.notify(f"built {manifest['name']}: {len(self.last_paths)} file(s) valid")
