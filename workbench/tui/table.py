"""A virtual table for many runs: renders only the visible lines (Textual's Line API).

Why not ``textual-fastdatatable``: its Arrow backend is immutable (``clear()`` raises, rows cannot
be replaced), while the Runs screen replaces its rows every refresh (live status, best values,
durations), keeps the cursor on the same run across refreshes, filters and marks. Holding the rows
in a plain list and drawing only the visible slice costs O(visible rows) per frame whatever the
number of runs, which is what keeps 10,000 runs fluid.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip


@dataclass
class Column:
    """One column: ``key`` into the row dicts, header ``label``, ``width`` (cells; 0 = flexible
    with ``min_width``), ``align`` "left"/"right", ``render`` value -> (text, style name)."""

    key: str
    label: str
    width: int = 0
    min_width: int = 6
    align: str = "left"
    render: Callable[[Any, dict], tuple[str, str]] | None = None


def _fit(text: str, width: int, align: str) -> str:
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…" if width > 1 else text[:width]
    return text.rjust(width) if align == "right" else text.ljust(width)


class PagedRows(Sequence):
    """``len(ids)`` rows of which one window is held: ``rows[i]`` is the row dict at positions
    ``start <= i < start + len(window)``, None elsewhere (not read yet); ``id_at(i)`` is known
    for every row. A :class:`VirtualTable` showing one asks for the rows it lacks
    (:class:`VirtualTable.RowsNeeded`)."""

    def __init__(self, ids: list[str], start: int = 0, window: Sequence[dict] = ()):
        self.ids = ids
        self.start = start
        self.window = list(window)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self.ids)))]
        if i < 0:
            i += len(self.ids)
        if not 0 <= i < len(self.ids):
            raise IndexError(i)
        j = i - self.start
        return self.window[j] if 0 <= j < len(self.window) else None

    def id_at(self, i: int) -> str:
        """The id of row ``i`` (read or not)."""
        return self.ids[i]

    def index_of(self, row_id: str) -> int | None:
        """The position of ``row_id``, None when it is not listed."""
        try:
            return self.ids.index(row_id)
        except ValueError:
            return None

    def covers(self, lo: int, hi: int) -> bool:
        """Whether rows ``lo`` .. ``hi - 1`` (clipped to the list) are all read."""
        lo, hi = max(0, lo), min(hi, len(self.ids))
        return lo >= hi or (self.start <= lo and hi <= self.start + len(self.window))


class VirtualTable(ScrollView, can_focus=True):
    """A scrollable table of row dicts with a fixed header, a row cursor, marks and sorting.

    Rows are identified by ``row[id_key]``; the cursor follows its row id across
    :meth:`set_rows` calls (refreshes, sorts, filters).
    """

    DEFAULT_CSS = """
    VirtualTable { height: 1fr; overflow-x: hidden; }
    VirtualTable > .vtable--header { text-style: bold; }
    """
    COMPONENT_CLASSES = {"vtable--header", "vtable--cursor", "vtable--mark"}

    BINDINGS = [
        Binding("up", "cursor(-1)", "up", show=False),
        Binding("down", "cursor(1)", "down", show=False),
        Binding("k", "cursor(-1)", show=False),
        Binding("j", "cursor(1)", show=False),
        Binding("pageup", "page(-1)", show=False),
        Binding("pagedown", "page(1)", show=False),
        Binding("home", "first", show=False),
        Binding("end", "last", show=False),
    ]

    class CursorMoved(Message):
        """The cursor is on another row (``row`` is None when the table is empty)."""

        def __init__(self, table: VirtualTable, row: dict | None):
            super().__init__()
            self.table = table
            self.row = row

    class RowsNeeded(Message):
        """Row ``index`` is drawn but not read (the rows are :class:`PagedRows`)."""

        def __init__(self, table: VirtualTable, index: int):
            super().__init__()
            self.table = table
            self.index = index

    def __init__(
        self,
        columns: Sequence[Column],
        id_key: str = "id",
        styles: dict[str, Style] | None = None,
        *,
        id: str | None = None,
    ):
        super().__init__(id=id)
        self.columns = list(columns)
        self.id_key = id_key
        self.cell_styles = styles or {}
        self.rows: Sequence[dict] = []
        self._asked: tuple[int, int] | None = None  # (id of the PagedRows, first row) asked for
        self.cursor = 0
        self.marked: set[str] = set()
        self.sort_key: str | None = None
        self.sort_reverse = False
        self._widths: list[int] = []

    # -- data -------------------------------------------------------------------------------
    def set_columns(self, columns: Sequence[Column]) -> None:
        """Show ``columns`` (a no-op when they are the ones shown); the widths are laid out again."""
        if [c.key for c in columns] != [c.key for c in self.columns]:
            self.columns = list(columns)
            self._widths = []
            self.refresh()

    def set_rows(self, rows: Sequence[dict]) -> None:
        """Replace the rows (already sorted/filtered by the caller; a list, or :class:`PagedRows`
        holding one window); keep the cursor on its row id."""
        current = self.current_id
        self.rows = rows
        self.virtual_size = Size(self.size.width, len(rows) + 1)
        if current is not None:
            if isinstance(rows, PagedRows):
                index = rows.index_of(current)
                self.cursor = self.cursor if index is None else index
            else:
                for i, r in enumerate(rows):
                    if r[self.id_key] == current:
                        self.cursor = i
                        break
        self.cursor = min(self.cursor, max(0, len(rows) - 1))
        self._scroll_to_cursor()
        self.refresh()

    @property
    def current(self) -> dict | None:
        """The cursor's row (None when there is none, or it is not read yet)."""
        return self.rows[self.cursor] if 0 <= self.cursor < len(self.rows) else None

    @property
    def current_id(self) -> str | None:
        """The cursor's row id (known for a row not read yet too)."""
        if isinstance(self.rows, PagedRows) and 0 <= self.cursor < len(self.rows):
            return self.rows.id_at(self.cursor)
        row = self.current
        return row[self.id_key] if row else None

    @property
    def top(self) -> int:
        """The first row in view."""
        return int(self.scroll_y)

    def toggle_mark(self) -> None:
        rid = self.current_id
        if rid is not None:
            self.marked.symmetric_difference_update({rid})
            self.refresh()

    # -- cursor -----------------------------------------------------------------------------
    @property
    def body_height(self) -> int:
        return max(1, self.size.height - 1)

    def move_to(self, index: int) -> None:
        if not self.rows:
            return
        index = max(0, min(len(self.rows) - 1, index))
        if index != self.cursor:
            self.cursor = index
            self._scroll_to_cursor()
            self.refresh()
            self.post_message(self.CursorMoved(self, self.current))

    def _scroll_to_cursor(self) -> None:
        top = int(self.scroll_y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + self.body_height:
            self.scroll_to(y=self.cursor - self.body_height + 1, animate=False, immediate=True)

    def action_cursor(self, delta: int) -> None:
        self.move_to(self.cursor + delta)

    def action_page(self, direction: int) -> None:
        self.move_to(self.cursor + direction * self.body_height)

    def action_first(self) -> None:
        self.move_to(0)

    def action_last(self) -> None:
        self.move_to(len(self.rows) - 1)

    def on_click(self, event) -> None:
        y = event.y
        if y == 0:  # header: sort by the clicked column
            x = 0
            for col, w in zip(self.columns, self._widths):
                if x <= event.x < x + w + 1:
                    self.post_message(self.HeaderClicked(self, col.key))
                    return
                x += w + 1
            return
        self.move_to(int(self.scroll_y) + y - 1)

    class HeaderClicked(Message):
        def __init__(self, table: VirtualTable, key: str):
            super().__init__()
            self.table = table
            self.key = key

    # -- rendering --------------------------------------------------------------------------
    def on_resize(self) -> None:
        self.virtual_size = Size(self.size.width, len(self.rows) + 1)
        self._widths = []
        self._scroll_to_cursor()

    def _layout(self) -> list[int]:
        width = self.size.width
        fixed = sum(c.width for c in self.columns if c.width) + len(self.columns)  # one space each
        flex = [c for c in self.columns if not c.width]
        room = max(0, width - fixed)
        widths = []
        share = room // len(flex) if flex else 0
        extra = room - share * len(flex) if flex else 0
        for c in self.columns:
            if c.width:
                widths.append(c.width)
            else:
                w = max(c.min_width, share + (1 if extra > 0 else 0))
                extra -= 1
                widths.append(w)
        return widths

    def render_line(self, y: int) -> Strip:
        if not self._widths:
            self._widths = self._layout()
        width = self.size.width
        base = self.rich_style
        if y == 0:
            header = self.get_component_rich_style("vtable--header")
            segs = []
            for col, w in zip(self.columns, self._widths):
                label = col.label
                if col.key == self.sort_key:
                    label = label + ("▼" if self.sort_reverse else "▲")
                segs.append(Segment(_fit(label, w, col.align) + " ", header))
            return Strip(segs).crop_extend(0, width, header)
        index = int(self.scroll_y) + y - 1
        if index >= len(self.rows):
            return Strip.blank(width, base)
        row = self.rows[index]
        if row is None:  # not read yet: a placeholder, and one request for the rows in view
            asked = (id(self.rows), int(self.scroll_y))
            if asked != self._asked:
                self._asked = asked
                self.post_message(self.RowsNeeded(self, index))
            return Strip([Segment(_fit("…", width, "left"), base)])
        is_cursor = index == self.cursor and self.has_focus
        cursor_style = self.get_component_rich_style("vtable--cursor")
        mark_style = self.get_component_rich_style("vtable--mark")
        marked = row[self.id_key] in self.marked
        segs = []
        for col, w in zip(self.columns, self._widths):
            value = row.get(col.key)
            if col.key == "mark":
                text, style_name = ("●" if marked else ""), ""
            elif col.render:
                text, style_name = col.render(value, row)
            else:
                text, style_name = ("" if value is None else str(value)), ""
            style = base + self.cell_styles.get(style_name, Style())
            if marked:
                style = style + mark_style
            if is_cursor or (index == self.cursor and not self.has_focus):
                style = style + (cursor_style if is_cursor else Style(underline=True))
            segs.append(Segment(_fit(text, w, col.align), style))
            segs.append(
                Segment(" ", base + (cursor_style if is_cursor else Style()) + (mark_style if marked else Style()))
            )
        return Strip(segs).crop_extend(0, width, base + (cursor_style if is_cursor else Style()))

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    def plain_lines(self) -> list[str]:
        """The visible lines as text (tests, benchmarks)."""
        return ["".join(s.text for s in self.render_line(y)) for y in range(self.size.height)]


def styled(text: str, style: str) -> Text:
    return Text(text, style=style)
