"""The run detail's panel of a stack run (``workbench stack``, ``kind: stack``): the stacker's
feature importance (LightGBM gain) as horizontal bars, one task at a time, and a line with the
stack's figures from ``stack_report.json``.

:func:`read_stack_files` runs in the detail screen's worker (it never raises for a missing or
unreadable file: it says why in a notice); :class:`ImportanceBars` draws as many features as its
height allows, largest share first.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text
from textual.widget import Widget

IMPORTANCE_FILE = "feature_importance.csv"
REPORT_FILE = "stack_report.json"
#: the stacker's tasks, in the order ``m`` cycles them (``core.scoring.stack.TASKS``)
TASK_ORDER = ("rank", "esci", "substitute")
IMPORTANCE_COLUMNS = ("task", "feature", "gain", "share")
EIGHTHS = " ▏▎▍▌▋▊▉█"


@dataclass
class StackFiles:
    """What the panel shows of a stack run's folder.

    Attributes:
        importance: task -> ``(feature, gain, share)`` rows, largest share first; tasks in
            :data:`TASK_ORDER` first, any other after them.
        report: ``stack_report.json`` as read (``cv``, ``held_out``, ...), or None.
        importance_notice: why there are no bars (missing or unreadable file), else None.
        report_notice: why there is no report, else None.
    """

    importance: dict[str, list[tuple[str, float, float]]] = field(default_factory=dict)
    report: dict | None = None
    importance_notice: str | None = None
    report_notice: str | None = None

    @property
    def tasks(self) -> list[str]:
        """The tasks with bars, in the order ``m`` cycles them."""
        return list(self.importance)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def read_importance(path: Path) -> dict[str, list[tuple[str, float, float]]]:
    """``feature_importance.csv`` (columns task, feature, gain, share) as task -> rows, largest
    share first.

    Raises:
        OSError: the file cannot be read. ValueError: a column is missing, a number does not parse,
            or there is no row.
    """
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in IMPORTANCE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"no column {', '.join(missing)} (expected {','.join(IMPORTANCE_COLUMNS)})")
        by_task: dict[str, list[tuple[str, float, float]]] = {}
        for n, row in enumerate(reader, start=2):
            try:
                gain, share = float(row["gain"]), float(row["share"])
            except (TypeError, ValueError):
                raise ValueError(f"line {n}: gain/share {row['gain']!r}, {row['share']!r} are not numbers") from None
            if math.isfinite(share):
                by_task.setdefault(row["task"] or "?", []).append((row["feature"] or "?", gain, share))
    if not by_task:
        raise ValueError("no rows")
    order = [t for t in TASK_ORDER if t in by_task] + [t for t in by_task if t not in TASK_ORDER]
    return {t: sorted(by_task[t], key=lambda r: -r[2]) for t in order}


def read_stack_files(run_dir: Path | None) -> StackFiles:
    """The panel's data from a stack run's folder; a missing or unreadable file becomes a notice."""
    out = StackFiles()
    if run_dir is None:
        out.importance_notice = out.report_notice = "the run has no run folder"
        return out
    path = run_dir / IMPORTANCE_FILE
    if not path.is_file():
        out.importance_notice = f"no {IMPORTANCE_FILE} in the run folder (written at the end)"
    else:
        try:
            out.importance = read_importance(path)
        except (OSError, ValueError, csv.Error, UnicodeDecodeError) as exc:
            out.importance_notice = f"cannot read {IMPORTANCE_FILE}: {_first_line(exc)}"
    path = run_dir / REPORT_FILE
    if not path.is_file():
        out.report_notice = f"no {REPORT_FILE}"
        return out
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(report, dict):
            raise ValueError("not a JSON object")
        out.report = report
    except (OSError, ValueError) as exc:
        out.report_notice = f"cannot read {REPORT_FILE}: {_first_line(exc)}"
    return out


def _figure(section: object, key: str) -> float | None:
    value = section.get(key) if isinstance(section, dict) else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def figures_line(files: StackFiles) -> str:
    """The stack's figures (markup): CV final nDCG, held-out nDCG when the test rows were labelled,
    CV Task 2 F1; the report's notice when there is none."""
    if files.report is None:
        return f"[dim]{files.report_notice or 'no ' + REPORT_FILE}[/]"
    cv, held = files.report.get("cv"), files.report.get("held_out")
    parts = []
    for label, section, key in (
        ("CV final nDCG", cv, "ndcg"),
        ("held-out nDCG", held, "ndcg"),
        ("Task 2 F1", cv, "task2_f1"),
    ):
        value = _figure(section, key)
        if value is not None:
            parts.append(f"{label} [b]{value:.4f}[/]")
    return " · ".join(parts) if parts else f"[dim]{REPORT_FILE} has no figures[/]"


def bar_lines(rows: list[tuple[str, float, float]], width: int, height: int) -> list[Text]:
    """``feature  share  bar`` lines for a ``width`` x ``height`` area, largest share first; bars
    scaled to the largest share; the last line says how many features did not fit."""
    if height <= 0 or width <= 0 or not rows:
        return []
    shown = rows if len(rows) <= height else rows[: max(0, height - 1)]
    name_w = min(max(len(r[0]) for r in shown or rows), max(8, width // 3))
    bar_w = max(1, width - name_w - 8)
    top = max(r[2] for r in rows) or 1.0
    lines = []
    for feature, _, share in shown:
        name = feature if len(feature) <= name_w else feature[: name_w - 1] + "…"
        cells = max(0.0, share / top) * bar_w
        full, part = int(cells), int(round((cells - int(cells)) * 8))
        if part == 8:
            full, part = full + 1, 0
        bar = "█" * full + (EIGHTHS[part] if part else "")
        line = Text(f"{name:<{name_w}} {share:6.3f} ", no_wrap=True, overflow="crop")
        line.append(bar or "▏", style="cyan")
        lines.append(line)
    if len(shown) < len(rows):
        rest = rows[len(shown) :]
        more = f"… {len(rest)} more features, share {sum(r[2] for r in rest):.3f}"
        lines.append(Text(more, style="dim", no_wrap=True, overflow="ellipsis"))
    return lines


class ImportanceBars(Widget):
    """One task's feature importance as bars (as many as fit), or a one-line notice."""

    DEFAULT_CSS = """
    ImportanceBars { height: 1fr; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rows: list[tuple[str, float, float]] = []
        self.notice = "reading the stack's files…"

    def show(self, rows: list[tuple[str, float, float]], notice: str | None = None) -> None:
        """Draw ``rows`` (largest share first), or ``notice`` when there are none."""
        self.rows, self.notice = list(rows), notice or ""
        self.refresh()

    def plain_lines(self) -> list[str]:
        """The lines as drawn now (for tests)."""
        if not self.rows:
            return [self.notice]
        return [t.plain for t in bar_lines(self.rows, self.size.width, self.size.height)]

    def render(self) -> Text:
        """The bars for the widget's size now, or the notice."""
        if not self.rows:
            return Text(self.notice, style="dim", no_wrap=True, overflow="ellipsis")
        return Text("\n").join(bar_lines(self.rows, self.size.width, self.size.height))
