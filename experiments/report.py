"""The grid's report: ``OUT/results.md`` (the paper's table, mean (std) over seeds, best per column in bold; every
value of the cells; the parameter overhead; the cells that are not in the table and why) and ``OUT/curves_TASK.png``
(personalised metric vs round, one line per method).

Only finished cells are in ``results.csv`` (the grid writes a row only after :func:`experiments.record.judge`
passed); rows are checked again here (a finite value; a stored curve, where there is one, that reaches the
requested round), so a table made from an older ``results.csv`` holds no truncated run either.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
from collections import defaultdict
from pathlib import Path

from .cells import METHODS, Cell
from .record import judge, read_record

FIELDS = [
    "task",
    "method",
    "seed",
    "rounds",
    "metric",
    "value",
    "value_unweighted",
    "value_worst",
    "routing_ari",
    "base_params",
    "extra_params",
    "extra_percent",
    "wall_s",
    "log_dir",
]
CURVE_FIELDS = ["task", "method", "seed", "rounds", "round", "value"]
CellKey = tuple[str, str, str, str]  # (task, method, seed, rounds) as results.csv spells them


def cell_key(row: dict) -> CellKey:
    return str(row["task"]), str(row["method"]), str(row["seed"]), str(row["rounds"])


def load_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Append to a CSV file (header first if new), synced: a killed grid keeps every finished cell."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def store_curve(path: Path, key: CellKey, points: list[tuple[int, float]]) -> None:
    task, method, seed, rounds = key
    rows = [{"task": task, "method": method, "seed": seed, "rounds": rounds, "round": r, "value": v} for r, v in points]
    append_rows(path, rows, CURVE_FIELDS)


def load_curves(out: Path) -> dict[CellKey, dict[int, float]]:
    """The stored curve (round -> value) of each cell in ``OUT/curves.csv``; a curve stored twice (a cell
    recorded again) is the later one, round by round."""
    curves: dict[CellKey, dict[int, float]] = defaultdict(dict)
    for r in load_rows(out / "curves.csv"):
        curves[cell_key(r)][int(r["round"])] = float(r["value"])
    return dict(curves)


def check_row(row: dict[str, str], curve: dict[int, float] | None) -> str | None:
    """Why a ``results.csv`` row is not a finished result (None: it is, as far as the files tell)."""
    if not math.isfinite(float(row["value"])):
        return f"its value is {row['value']}"
    if curve is not None and max(curve) != int(row["rounds"]):
        return f"its curve ends at round {max(curve)} of {row['rounds']}"
    return None


def missing_reason(out: Path, cell: Cell) -> str:
    """Why a requested cell has no row: what its run directory says, or that it never ran."""
    run_dir = cell.run_dir(out)
    if not run_dir.exists():
        return "not run"
    reason = judge(read_record(run_dir), cell.rounds)
    return reason or "finished but not recorded (the grid was stopped first): rerun compare to record it"


def grid_cells(args: argparse.Namespace) -> list[Cell]:
    return [Cell(t, m, s, args.rounds) for t in args.tasks for m in args.methods for s in args.seeds]


def report(out: Path, args: argparse.Namespace, wall: float | None = None) -> list[tuple[Cell, str]]:
    """Write ``results.md`` and the curves for the requested grid from ``results.csv``; returns the requested
    cells that are not in the table, each with the reason.

    ``wall`` is the wall time of the ``compare`` that ran the grid (``None`` for a report of what exists).
    A table entry with fewer seeds than requested shows how many it has (``n=2``); one with none shows ``-``.
    """
    cells_requested = grid_cells(args)
    requested = {cell.key for cell in cells_requested}
    curves = load_curves(out)
    rows, missing = [], []
    for r in load_rows(out / "results.csv"):
        if cell_key(r) in requested:
            reason = check_row(r, curves.get(cell_key(r)))
            if reason is None:
                rows.append(r)
            else:
                missing.append((Cell(r["task"], r["method"], int(r["seed"]), int(r["rounds"])), reason))
    recorded = {cell_key(r) for r in rows} | {cell.key for cell, _ in missing}
    missing += [(cell, missing_reason(out, cell)) for cell in cells_requested if cell.key not in recorded]
    no_curve = sorted(cell_key(r) for r in rows if cell_key(r) not in curves)

    cells: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        cells[r["method"], r["task"]].append(r)
    metric = {r["task"]: r["metric"] for r in rows}

    def mean(method: str, task: str, column: str) -> float:
        return statistics.fmean(float(r[column]) for r in cells[method, task])

    best = {}
    for task in args.tasks:
        means = {m: mean(m, task, "value") for m in args.methods if cells.get((m, task))}
        if means:
            best[task] = (max if metric.get(task) == "acc" else min)(means, key=means.get)

    def fmt(method: str, task: str) -> str:
        values = [float(r["value"]) for r in cells.get((method, task), [])]
        if not values:
            return "-"
        scale = 100.0 if metric[task] == "acc" else 1.0
        avg = statistics.fmean(values) * scale
        std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        text = f"{avg:.1f} ({std:.1f})" if metric[task] == "acc" else f"{avg:.3g} ({std:.2g})"
        text = f"**{text}**" if best.get(task) == method else text
        return text if len(values) == len(args.seeds) else f"{text} n={len(values)}"

    lines = [
        "# Personalised test " + ("accuracy %" if "acc" in metric.values() else "metric"),
        "",
        f"Command: `python -m experiments compare --tasks {' '.join(args.tasks)} "
        f"--methods {' '.join(args.methods)} --seeds {' '.join(map(str, args.seeds))} --rounds {args.rounds}"
        + "".join(f" --override={o}" for o in args.override)
        + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
        + f" --out {args.out}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}; "
        + ("" if wall is None else f"this invocation's wall time {wall:.0f} s ({args.jobs} cell(s) at a time); ")
        + f"the cells' wall times sum to {sum(float(r['wall_s']) for r in rows):.0f} s; "
        f"{args.rounds} rounds per run; value = mean over seeds "
        "(std) of the evaluations in the last 1 % of rounds; accuracy is the sample-weighted mean over clients.",
        "",
        "| method | " + " | ".join(args.tasks) + " |",
        "|---|" + "---|" * len(args.tasks),
    ]
    for method in args.methods:
        lines.append(f"| {METHODS[method][0]} | " + " | ".join(fmt(method, t) for t in args.tasks) + " |")
    if missing:
        lines += ["", f"## Incomplete: {len(missing)} of {len(cells_requested)} cell(s), not in the table", ""]
        lines += [f"- {cell.name}: {reason}" for cell, reason in sorted(missing, key=lambda m: m[0].key)]
    lines += ["", "## Every value (mean over the seeds in the table)", "",
              "| method | task | seeds | value | unweighted | worst client | routing ARI | wall s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for task in args.tasks:
        for method in args.methods:
            if cells.get((method, task)):
                values = [mean(method, task, c) for c in ("value", "value_unweighted", "value_worst", "routing_ari")]
                lines.append(f"| {METHODS[method][0]} | {task} | {len(cells[method, task])} | "
                             + " | ".join(f"{v:.4g}" for v in values)
                             + f" | {mean(method, task, 'wall_s'):.0f} |")  # fmt: skip
    lines += ["", "## Parameter overhead (federated parameters beyond the base model)", "",
              "| method | task | base | extra | % increase |", "|---|---|---:|---:|---:|"]  # fmt: skip
    seen = set()
    for r in rows:
        if (r["method"], r["task"]) not in seen:
            seen.add((r["method"], r["task"]))
            lines.append(
                f"| {METHODS[r['method']][0]} | {r['task']} | {int(r['base_params']):,} | "
                f"{int(r['extra_params']):,} | {float(r['extra_percent']):.2f} |"
            )
    if no_curve:
        lines += ["", f"Curves: {len(no_curve)} cell(s) have no stored curve (recorded before curves were stored), "
                  "so their completion is checked by their value alone, and they are left out of the plots: "
                  + ", ".join("/".join(key[:3]) for key in no_curve) + "."]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_curves(out, rows, curves, args)
    return missing


def plot_curves(
    out: Path, rows: list[dict[str, str]], curves: dict[CellKey, dict[int, float]], args: argparse.Namespace
) -> None:
    """One PNG per task: the personalised metric vs round, mean over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in args.tasks:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, method in enumerate(args.methods):
            seeds = [curves[cell_key(r)] for r in rows
                     if r["task"] == task and r["method"] == method and cell_key(r) in curves]  # fmt: skip
            if not seeds:
                continue
            common = sorted(set.intersection(*(set(c) for c in seeds)))
            ax.plot(
                common,
                [statistics.fmean(c[x] for c in seeds) for x in common],
                label=METHODS[method][0],
                linestyle=("-", "--", ":")[i // 10 % 3],
            )  # the colour cycle has 10 colours
        ax.set_xlabel("round")
        if any(r["metric"] == "acc" for r in rows if r["task"] == task):
            ax.set_ylabel("personalised accuracy")
        else:  # errors span orders of magnitude between methods
            ax.set_ylabel("personalised MSE")
            ax.set_yscale("log")
        ax.set_title(task)
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"curves_{task}.png", dpi=120)
        plt.close(fig)
