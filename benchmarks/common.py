"""What every section of the bench shares: its error, its table row, the guard that turns a
failure into a row, the ratios between rows, the goals, and the plain-text table.

A ``Row`` is one line of any section's table: a name, a status, how it was set up, its rate
(samples, tokens or images per second: the section says which) and the section's other
numbers in ``values``; ``ratios`` are its rate over other rows of the same run.  A peer that is
not installed is a skipped row whose status is the install hint; a row that failed says why in
its status, and the other rows still run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from batchfeed.shared.errors import BatchfeedError

GB = 1e9
MIB = 2**20


class BenchError(Exception):
    """A row could not be measured (a server, a client or a peer failed); the message says why."""


# What a row's measurement may raise and still leave the run going: our errors, the product's
# typed errors, and what servers, processes, sockets and peers' libraries raise.
ROW_ERRORS: tuple[type[BaseException], ...] = (BenchError, BatchfeedError, RuntimeError, OSError,
                                               ValueError)


def failed_status(exc: BaseException) -> str:
    """A row's status for a failure: its first line, at most 200 characters."""
    return f"failed: {exc}".splitlines()[0][:200]


@dataclass
class Row:
    """One line of a section's table."""

    name: str
    status: str = "ok"  # "ok", "skipped: <install hint>", or "failed: <why>"
    setup: str = ""  # how the loader was configured (peers say their fastest setup)
    rate: float | None = None  # the section's unit per second
    values: dict[str, Any] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")

    def get(self, key: str) -> Any:
        """A column's value: ``rate``, a ratio, or one of ``values`` (None if absent)."""
        if key == "rate":
            return self.rate
        if key in self.ratios:
            return self.ratios[key]
        return self.values.get(key)

    @classmethod
    def skipped(cls, name: str, hint: str, **values: Any) -> Row:
        return cls(name, status=f"skipped: {hint}", values=dict(values))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Row:
        return cls(**d)


def guarded(name: str, measure: Callable[[], Row], **values: Any) -> Row:
    """Run one row; a failure becomes a failed row (with ``values``), the run goes on."""
    try:
        return measure()
    except ROW_ERRORS as exc:
        return Row(name, status=failed_status(exc), values=dict(values))


def add_ratio(rows: Iterable[Row], key: str, base: Row | None) -> None:
    """Set ``ratios[key]`` of every measured row to its rate over ``base``'s."""
    if base is None or not base.rate:
        return
    for r in rows:
        if r.rate is not None:
            r.ratios[key] = r.rate / base.rate


def by_name(rows: Iterable[Row]) -> dict[str, Row]:
    return {r.name: r for r in rows}


def fastest(rows: Iterable[Row], names: Iterable[str]) -> Row | None:
    """The measured row of ``names`` with the highest rate (the best of a peer's setups)."""
    table = by_name(rows)
    measured = [table[n] for n in names if n in table and table[n].rate]
    return max(measured, key=lambda r: r.rate or 0.0, default=None)


def ratio(rows: Iterable[Row], name: str, base: str) -> float | None:
    """``name``'s rate over ``base``'s, or None if either was not measured."""
    table = by_name(rows)
    a, b = table.get(name), table.get(base)
    if a is None or b is None or not a.rate or not b.rate:
        return None
    return a.rate / b.rate


@dataclass
class Goal:
    """A target of the bench with what this run measured; ``met`` is None without a target or
    a measurement.  ``beside``: the same ratio for related rows, for context."""

    goal: str
    measured: float | None
    target: float | None = None
    higher_is_better: bool = True
    beside: dict[str, float | None] = field(default_factory=dict)
    met: bool | None = None

    def __post_init__(self) -> None:
        if self.measured is not None and self.target is not None:
            self.met = (self.measured >= self.target if self.higher_is_better
                        else self.measured <= self.target)

    def line(self) -> str:
        if self.measured is None:
            return f"{self.goal}: not measured"
        verdict = "" if self.met is None else (", met" if self.met else ", missed")
        beside = ", ".join(f"{k}: {v:.2f}x" for k, v in self.beside.items() if v is not None)
        return f"{self.goal}: {self.measured:.2f}x{verdict}" + (f" ({beside})" if beside else "")


def goal_lines(goals: Sequence[dict[str, Any]]) -> list[str]:
    return ["  goals:"] + [f"    {Goal(**g).line()}" for g in goals]


def fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


@dataclass(frozen=True)
class Column:
    """A table column: its title, the row's key (see ``Row.get``) and a format spec, or a
    function of the row giving the cell's text."""

    title: str
    key: str = ""
    spec: str = ""
    cell: Callable[[Row], str] | None = None

    def text(self, row: Row) -> str:
        return self.cell(row) if self.cell is not None else fmt(row.get(self.key), self.spec)


def text_table(header: Sequence[str], rows: Sequence[tuple[str, str, Sequence[str]]]) -> list[str]:
    """Right-aligned columns after a left-aligned name; ``rows`` are (name, status, cells), a
    row whose status is not "ok" printing its status instead of cells."""
    name_w = max(len(header[0]), *(len(name) for name, _, _ in rows)) if rows else len(header[0])
    widths = [max([len(h)] + [len(cells[i]) for _, status, cells in rows if status == "ok"])
              for i, h in enumerate(header[1:])]
    lines = ["  " + header[0].ljust(name_w)
             + "".join(f"  {h:>{w}}" for h, w in zip(header[1:], widths))]
    for name, status, cells in rows:
        if status != "ok":
            lines.append(f"  {name.ljust(name_w)}  {status}")
        else:
            lines.append("  " + name.ljust(name_w)
                         + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths)))
    return lines


def row_table(columns: Sequence[Column], rows: Iterable[Row], first: str = "row") -> list[str]:
    """A table of rows: the name, then one cell per column."""
    return text_table([first, *(c.title for c in columns)],
                      [(r.name, r.status, [c.text(r) for c in columns] if r.ok else [])
                       for r in rows])


def setup_lines(rows: Iterable[Row]) -> list[str]:
    """How each row was set up, one line each (rows that say so)."""
    return [f"  {r.name}: {r.setup}" for r in rows if r.setup]


def failures(result: dict[str, Any], prefix: str) -> list[str]:
    """A section's failed rows (in any of its row lists) and its problems."""
    failed = [f"{prefix}: {r['name']}" for key in ("rows", "memory")
              for r in result.get(key, []) if r["status"].startswith("failed")]
    return failed + [f"{prefix}: {p}" for p in result.get("problems", [])]
