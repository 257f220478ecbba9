"""Run a grid of tasks x methods x seeds through ``train.py`` and report it in the paper's layout.

    python -m experiments compare --tasks mnist_rotate mnist_label_shift \\
        --methods fedavg floral1 floral1_oracle --seeds 0 1 2 --rounds 100 --out results/mnist

Every cell is one ``train.py fit`` in its own process, ``--jobs`` of them at a time. A cell is recorded in
``OUT/results.csv`` (and its curve in ``OUT/curves.csv``) only when it exited 0 and its own record shows it
finished (``experiments.record.judge``: the requested rounds logged and checkpointed, a finite metric); every
finished cell is recorded as soon as it ends, whatever happens to the others. A cell that did not finish is
reported at the end with the reason, its command and its last lines; the exit code is 0 only if every cell of
the grid is recorded. Running the same command again skips recorded cells and resumes the others from their
newest round-end checkpoint (``--ckpt_path=last``), not from round 0. SIGTERM or SIGINT to the grid stops
its running cells at a round (one SIGTERM each), records those that finish meanwhile, writes the report and
exits 128 + the signal. Each cell's output is in
``OUT/runs/TASK/METHOD/seedS_roundsR/train.log``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from .cells import METHODS, ROOT, TASKS, Cell, cell_command, parameter_overhead
from .record import judge, read_record, summarise
from .report import FIELDS, append_rows, cell_key, grid_cells, load_rows, report, store_curve

LOG = "train.log"  # each cell's stdout and stderr, every attempt appended, in its run directory
WALLS = "wall_s.txt"  # each attempt's wall time, one a line, in its run directory: a resumed cell's time is their sum
TAIL_LINES = 15  # lines of a failed cell's output shown at the end of the grid


@dataclass
class Outcome:
    """How one cell's process ended."""

    cell: Cell
    command: list[str]
    returncode: int
    wall_s: float


@dataclass
class Failure:
    """A cell that did not finish, and why."""

    cell: Cell
    command: list[str]
    returncode: int
    reason: str
    tail: list[str]


class Cells:
    """The cells' live processes, so that a grid that is stopped can stop them (each at a round, with its
    round-end checkpoint) instead of leaving them running unsupervised."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live: set[subprocess.Popen] = set()
        self.stopping = False

    def stop(self) -> None:
        """Send SIGTERM to every running cell, and start no more."""
        with self.lock:
            self.stopping = True
            for process in self.live:
                process.send_signal(signal.SIGTERM)

    def run(self, cell: Cell, command: list[str], run_dir: Path, threads: int) -> Outcome | None:
        """Run one cell's ``train.py`` with ``threads`` torch threads, its output appended to ``run_dir/train.log``;
        None if the grid was stopped before it started."""
        run_dir.mkdir(parents=True, exist_ok=True)
        env = os.environ | {"OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        with (run_dir / LOG).open("a") as log:
            with self.lock:  # no process starts after stop() has looked at the live ones
                if self.stopping:
                    return None
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
                log.flush()
                # a session of its own: a Ctrl-C in the terminal reaches the grid alone, which sends each cell one
                # SIGTERM (a second signal could cut a cell's clean stop short)
                process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)  # fmt: skip
                self.live.add(process)
            try:
                returncode = process.wait()
            finally:
                with self.lock:
                    self.live.discard(process)
        wall = time.perf_counter() - t0
        with (run_dir / WALLS).open("a") as f:
            f.write(f"{wall:.1f}\n")
        return Outcome(cell, command, returncode, wall)


def last_lines(path: Path, n: int = TAIL_LINES) -> list[str]:
    if not path.exists():
        return []
    with path.open(errors="replace") as f:
        return list(deque((line.rstrip("\n") for line in f), maxlen=n))


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    """Counts of the grid's cells and the time left, estimated from the cells finished so far."""

    def __init__(self, total: int, jobs: int) -> None:
        self.total, self.jobs, self.start = total, jobs, time.perf_counter()
        self.recorded = self.failed = self.running = 0
        self.walls: list[float] = []

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.start
        left = self.total - self.recorded - self.failed - self.running
        text = (f"{self.recorded}/{self.total} recorded, {self.failed} incomplete, {self.running} running, "
                f"{left} left; elapsed {duration(elapsed)}")  # fmt: skip
        if self.walls and left + self.running:
            # cells still to run, at the mean cell time, jobs at a time (running ones count half done)
            eta = sum(self.walls) / len(self.walls) * (left + self.running / 2) / self.jobs
            text += f", about {duration(eta)} left"
        return text


def record_cell(
    out: Path, outcome: Outcome, overhead: dict[tuple[str, str], tuple[int, int]], extra: list[str]
) -> dict | Failure:
    """Judge a cell that ended; write its row and curve if it finished, else return its :class:`Failure`."""
    cell, run_dir = outcome.cell, outcome.cell.run_dir(out)
    try:
        record = read_record(run_dir)
        reason = judge(record, cell.rounds)
    except Exception as err:  # an unreadable record is an incomplete cell, not the end of the grid
        record, reason = None, f"its record cannot be read ({type(err).__name__}: {err})"
    if outcome.returncode != 0:
        reason = f"exit {outcome.returncode}" + (f"; {reason}" if reason else "")
    if reason is not None:
        return Failure(cell, outcome.command, outcome.returncode, reason, last_lines(run_dir / LOG))
    if (cell.task, cell.method) not in overhead:
        overhead[cell.task, cell.method] = parameter_overhead(cell.task, cell.method, extra)
    base, extra_params = overhead[cell.task, cell.method]
    row = {
        "task": cell.task, "method": cell.method, "seed": cell.seed, "rounds": cell.rounds,
        **summarise(record, cell.rounds),
        "base_params": base, "extra_params": extra_params,
        "extra_percent": round(100.0 * extra_params / base, 2),
        "wall_s": round(sum(map(float, (run_dir / WALLS).read_text().split())), 1),
        "log_dir": str(run_dir.relative_to(out)),
    }  # fmt: skip
    # the curve first: a grid killed between the two writes re-records the cell, and the later curve wins
    store_curve(out / "curves.csv", cell_key(row), record.history(f"val/{row['metric']}"))
    append_rows(out / "results.csv", [row], FIELDS)
    return row


def compare(args: argparse.Namespace) -> int:
    """Run (or resume) the grid and write its report; 0 if every cell is recorded, 1 if not, 128 + the signal if
    the grid was stopped by SIGTERM or SIGINT."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = {cell_key(r) for r in load_rows(out / "results.csv")}
    cells = grid_cells(args)
    todo = [cell for cell in cells if cell.key not in done]
    # Small models do not gain from a second thread as much as from a second cell running beside them.
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    progress = Progress(len(cells), args.jobs)
    progress.recorded = len(cells) - len(todo)
    print(f"grid: {len(cells)} cell(s), {len(todo)} to run, {args.jobs} at a time", flush=True)
    overhead: dict[tuple[str, str], tuple[int, int]] = {}
    failures: list[Failure] = []
    pending: set[Future] = set()
    queue, runner, stopped = deque(todo), Cells(), None

    def collect(finished: set[Future]) -> None:
        for future in finished:
            progress.running -= 1
            outcome = future.result()
            if outcome is None:  # never started: the grid was stopped first
                continue
            progress.walls.append(outcome.wall_s)
            result = record_cell(out, outcome, overhead, args.override)
            if isinstance(result, Failure):
                failures.append(result)
                progress.failed += 1
                what = f"INCOMPLETE {outcome.cell.name}: {result.reason}"
            else:
                progress.recorded += 1
                what = f"recorded {outcome.cell.name}: {result['metric']} {result['value']:.4g}"
            print(f"{what} ({outcome.wall_s:.0f} s) | {progress.summary()}", flush=True)

    def on_signal(signum: int, frame) -> None:
        # SIGTERM or SIGINT to the grid stops its cells at a round (their checkpoints kept); the loop below then
        # records the cells that end meanwhile and writes the report: a stopped grid loses nothing and resumes.
        # No exception is raised here, so no finished cell can be dropped between its end and its row.
        nonlocal stopped
        if stopped is None:
            stopped = signal.Signals(signum)
            runner.stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            announced = False
            while pending or (queue and stopped is None):
                while queue and stopped is None and len(pending) < args.jobs:  # as slots free: "running" is exact
                    cell = queue.popleft()
                    run_dir = cell.run_dir(out)
                    command = cell_command(cell, run_dir, args.override)
                    pending.add(pool.submit(runner.run, cell, command, run_dir, threads))
                    progress.running += 1
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                if stopped is not None and not announced:
                    announced = True
                    print(f"grid: {stopped.name}: stopping the running cell(s) at a round", flush=True)
                collect(finished)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    wall = time.perf_counter() - progress.start
    missing = report(out, args, wall)
    for failure in failures:
        print(f"\nINCOMPLETE {failure.cell.name}: {failure.reason}\n  command: "
              f"{shlex.join(failure.command)}\n  last lines of {failure.cell.run_dir(out) / LOG}:",
              file=sys.stderr)  # fmt: skip
        print("\n".join(f"    {line}" for line in failure.tail), file=sys.stderr)
    if stopped is not None:
        print(f"\ngrid stopped by {stopped.name}: {len(missing)} of {len(cells)} cell(s) not recorded; rerun the "
              "same command to resume them", file=sys.stderr)  # fmt: skip
        return 128 + stopped
    if missing:
        print(f"\ngrid incomplete: {len(missing)} of {len(cells)} cell(s) not recorded "
              f"(listed in {out / 'results.md'}); rerun the same command to resume them", file=sys.stderr)  # fmt: skip
        return 1
    print(f"\ngrid complete: {len(cells)} cell(s) recorded in {out / 'results.csv'}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("compare", help="run (or resume) a grid and write the report")
    only = sub.add_parser("report", help="write the report of a grid from the cells results.csv has, running none")
    for grid in (run, only):
        grid.add_argument("--tasks", nargs="+", required=True, choices=sorted(TASKS))
        grid.add_argument("--methods", nargs="+", required=True, choices=list(METHODS))
        grid.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
        grid.add_argument("--rounds", type=int, required=True, help="rounds per run (the configs' max_epochs)")
        grid.add_argument("--out", required=True, help="folder for results.csv, results.md, curves and runs/")
        grid.add_argument(
            "--override",
            action="append",
            default=[],
            help="extra train.py argument for every cell, repeatable (e.g. a data source); "
            "keep it the same for every run of a grid, as resumed cells continue with it",
        )
        # report accepts them too so that one argument list serves both verbs; it runs nothing, so for report
        # --jobs only appears in the command line written to results.md and --threads has no effect
        grid.add_argument("--jobs", type=int, default=1, help="cells run at the same time (default 1)")
        grid.add_argument("--threads", type=int, default=0,
                          help="torch threads per cell (default: CPU cores / jobs)")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("rounds", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """``compare`` or ``report``; the exit code: 0 if every cell of the grid is recorded, 1 if not."""
    args = parse_args(argv)
    if args.command == "compare":
        return compare(args)
    results = Path(args.out) / "results.csv"
    if not results.exists():
        raise SystemExit(f"report: {results} does not exist; run 'compare' with the same --out first")
    return 1 if report(Path(args.out), args) else 0
