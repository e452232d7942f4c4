"""Per-check results and figures parsed from a lab run's serial log.

dom0 prints one line per check and per figure, so one boot serves many pytest tests:
    LAB-CHECK: <name> PASS|FAIL|SKIP <detail>
    LAB-FIGURE: <name> <value> <unit> [<detail>]
A check printed more than once keeps its worst outcome (FAIL over SKIP over PASS).
"""

from __future__ import annotations

import dataclasses
import re

from .handovers import HandoverStalls, format_handover_stalls

CHECK_LINE = re.compile(r"LAB-CHECK: (\S+) (PASS|FAIL|SKIP)\b ?(.*)")
FIGURE_LINE = re.compile(r"LAB-FIGURE: (\S+) (-?[0-9.]+) (\S+) ?(.*)")
_RANK = {"PASS": 0, "SKIP": 1, "FAIL": 2}


@dataclasses.dataclass
class Check:
    name: str
    outcome: str
    detail: str


@dataclasses.dataclass
class Figure:
    name: str
    value: float
    unit: str
    detail: str


def parse_checks(text: str) -> dict[str, Check]:
    checks: dict[str, Check] = {}
    for m in CHECK_LINE.finditer(text):
        new = Check(m.group(1), m.group(2), m.group(3).strip())
        old = checks.get(new.name)
        if old is None or _RANK[new.outcome] > _RANK[old.outcome]:
            checks[new.name] = new
    return checks


def parse_figures(text: str) -> dict[str, Figure]:
    return {m.group(1): Figure(m.group(1), float(m.group(2)), m.group(3), m.group(4).strip())
            for m in FIGURE_LINE.finditer(text)}


#: the same guest job ran against the kernel's blkback (phase blkback) and blkpy (phase func)
BASELINE, CANDIDATE = "blkback.perf.", "func.perf."
#: what each blkpy : blkback ratio aims at (issue 7); reported, never asserted: the lab is
#: emulated and shares the host's cores
RATIO_GOAL = 1.0


def side_by_side(figures: dict[str, Figure]) -> list[tuple[str, Figure, Figure, float]]:
    """(measure, blkback figure, blkpy figure, blkpy/blkback ratio) for every measure both
    sides reported. Under emulation only the ratio means anything."""
    rows = []
    for name, base in figures.items():
        if not name.startswith(BASELINE):
            continue
        measure = name[len(BASELINE):]
        cand = figures.get(CANDIDATE + measure)
        if cand is not None and base.value > 0:
            rows.append((measure, base, cand, cand.value / base.value))
    return rows


#: xentop's counters of a disk beside the guest's own (phase vbd3):
#: LAB-FIGURE: <phase>.xentop.<disk>.<counter> <xentop's value> <unit> guest <guest's value>
XENTOP_FIGURE = re.compile(r"[^.]+\.xentop\.(?P<disk>[^.]+)\.(?P<counter>\w+)$")
XENTOP_COUNTERS = ("rd_req", "rd_sect", "wr_req", "wr_sect", "f_req")


def xentop_rows(figures: dict[str, Figure]) -> dict[str, dict[str, tuple[int, int | None]]]:
    """disk -> counter -> (xentop's value, the guest's value or None)."""
    rows: dict[str, dict[str, tuple[int, int | None]]] = {}
    for name, fig in figures.items():
        m = XENTOP_FIGURE.match(name)
        if m is None:
            continue
        g = re.search(r"guest (\d+)", fig.detail)
        rows.setdefault(m["disk"], {})[m["counter"]] = (int(fig.value),
                                                        int(g[1]) if g else None)
    return dict(sorted(rows.items()))


def format_xentop(rows: dict[str, dict[str, tuple[int, int | None]]]) -> list[str]:
    lines = ["xentop -x : the guest's /sys/block/<disk>/stat (requests and 512-byte sectors; "
             "f_req: the backend's flushes, which xentop does not show):"]
    for disk, counters in rows.items():
        cells = []
        for c in XENTOP_COUNTERS:
            top, guest = counters.get(c, (None, None))
            mark = "" if top == guest or top is None or guest is None else f" (guest {guest - top:+d})"
            cells.append(f"{c} {top}:{guest}{mark}")
        lines.append(f"  {disk:5} " + "  ".join(cells))
    return lines


#: the longest request the guest saw while dom0 did each kind of restart (phase lifecycle):
#: LAB-FIGURE: lifecycle.<kind>.stall-ms <ms> ms ...; issue 9's targets where it sets one.
#: The guest times each request itself in microseconds and reports ms with one decimal.
#: Beside it, lifecycle.<kind>.gap-ms: the longest a stream went without a completion, and
#: lifecycle.<kind>.window-ms where the serves measure their own hand-over window.
STALL_FIGURE = re.compile(r"lifecycle\.(?P<kind>\w+)\.stall-ms$")
STALL_TARGET_MS = {"kill": 1000, "upgrade": 200}
#: the table's row order: the reference window, then the phase's default order (the figures
#: come in console order, and a migrated guest's console log is read first)
STALL_ORDER = ("warmup", "upgrade", "save", "migrate", "snapshot", "kill")


def format_stalls(figures: dict[str, Figure], checks: dict[str, Check]) -> list[str]:
    """One line per kind: the stall, its target, the longest gap without a completion when
    the guest reported one, and the kind's error and data checks."""
    rows = []
    for name, fig in figures.items():
        m = STALL_FIGURE.match(name)
        if m is not None:
            rows.append((m["kind"], fig))
    rows.sort(key=lambda row: (STALL_ORDER.index(row[0]) if row[0] in STALL_ORDER
                               else len(STALL_ORDER)))
    lines = []
    for kind, fig in rows:
        target = STALL_TARGET_MS.get(kind)
        goal = (f"target <= {target} ms {'met' if fig.value <= target else 'short'}"
                if target else "no target")
        gap = figures.get(f"lifecycle.{kind}.gap-ms")
        gap_text = f"gap {gap.value:8.1f} ms" if gap is not None else ""
        # the backend's own share where it measures one (an upgrade's hand-over window)
        window = figures.get(f"lifecycle.{kind}.window-ms")
        if window is not None:
            gap_text += f"  window {window.value:6.1f} ms"
        outcomes = [f"{what} {checks[f'lifecycle.{kind}.{what}'].outcome}"
                    for what in ("io-errors", "data") if f"lifecycle.{kind}.{what}" in checks]
        # a kind this host cannot run (xl migrate without shadow paging) says so here too
        outcomes += [f"{c.name.rsplit('.', 1)[-1]} SKIP (not runnable here, see above)"
                     for c in checks.values()
                     if c.name.startswith(f"lifecycle.{kind}.") and c.outcome == "SKIP"]
        lines.append(f"  {kind:9} stall {fig.value:8.1f} ms  {goal:24} {gap_text:16} "
                     f"{'  '.join(outcomes)}".rstrip())
    return ["guest stall per kind (lifecycle):", *lines] if lines else []


def format_summary(checks: dict[str, Check], figures: dict[str, Figure],
                   handovers: HandoverStalls | None = None) -> str:
    counts = {o: sum(c.outcome == o for c in checks.values()) for o in _RANK}
    lines = [f"checks: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped"]
    lines += [f"  {c.outcome:4} {c.name}  {c.detail}" for c in checks.values()]
    lines += [f"  {f.name} = {f.value:g} {f.unit}  {f.detail}".rstrip() for f in figures.values()]
    xentop = xentop_rows(figures)
    if xentop:
        lines += format_xentop(xentop)
    lines += format_stalls(figures, checks)
    # the upgrade's stall as the requests its hand-overs held (the kind's longest request
    # may be the emulation's own, as the warmup's is)
    lines += format_handover_stalls(handovers, STALL_TARGET_MS["upgrade"])
    rows = side_by_side(figures)
    if rows:
        lines.append(f"side by side (same guest job; blkpy : kernel blkback; goal >= {RATIO_GOAL:.1f}):")
        lines += [format_row(*row) for row in rows]
    return "\n".join(lines)


def format_row(measure: str, base: Figure, cand: Figure, ratio: float) -> str:
    mark = "met" if ratio >= RATIO_GOAL else "short"
    return (f"  {measure:18} blkback {base.value:8.1f} {base.unit:5} blkpy {cand.value:8.1f} "
            f"{cand.unit:5} ratio {ratio:.2f} {mark}")
