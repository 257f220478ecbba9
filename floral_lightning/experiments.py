"""Run a grid of tasks x methods x seeds through ``train.py`` and report it in the paper's layout.

    python -m floral_lightning.experiments compare --tasks mnist_rotate mnist_label_shift \\
        --methods fedavg floral1 floral1_oracle --seeds 0 1 2 --rounds 100 --out results/mnist

Every cell is one ``train.py fit`` in its own process (a crash loses one cell, not the grid). Finished cells
are recorded in ``OUT/results.csv`` and skipped when the command is run again, so an interrupted grid
resumes where it stopped. Each cell's curve (personalised metric per evaluated round) goes to
``OUT/curves.csv``, so the report never needs the run logs under ``OUT/runs/``. The report is
``OUT/results.md`` (mean (std) over seeds, best per column in bold, parameter overhead per method) and
``OUT/curves_TASK.png`` (personalised metric vs round per method).
The value of a cell is the mean of the evaluations in the last 1 % of rounds (at least the final one), as
in the paper.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: task name -> (config files, later ones overlaying earlier ones; number of clusters C)
TASKS: dict[str, tuple[list[str], int]] = {
    "mnist_rotate": (["conf/mnist.yaml"], 4),
    "mnist_label_shift": (["conf/mnist_label_shift.yaml"], 4),
    "mnist_rotate_reduced": (["conf/mnist.yaml", "conf/reduced.yaml"], 4),
    "mnist_label_shift_reduced": (["conf/mnist_label_shift.yaml", "conf/reduced.yaml"], 4),
    "cifar10_rotate": (["conf/cifar.yaml"], 4),
    "cifar10_label_shift": (["conf/cifar_label_shift.yaml"], 4),
    "cifar10_rotate_reduced": (["conf/cifar.yaml", "conf/reduced.yaml"], 4),
    "cifar10_label_shift_reduced": (["conf/cifar_label_shift.yaml", "conf/reduced.yaml"], 4),
    "cifar100_reduced": (["conf/cifar100.yaml", "conf/reduced.yaml"], 10),
    "synthetic_linear": (["conf/synthetic_linear.yaml"], 2),
    "synthetic_mlp": (["conf/synthetic_mlp.yaml"], 4),
}

FEDAVG = ["--model.init_args.num_adaptors=0"]
ORACLE = ["--model.init_args.router.oracle=true"]
#: method name -> (label in the table, class in floral_lightning.methods or None for the config's own
#: module, train.py overrides). ``{C}`` in an override is replaced by the task's number of clusters.
METHODS: dict[str, tuple[str, str | None, list[str]]] = {
    "fedavg": ("FedAvg", None, FEDAVG),
    "local_adaptor": ("Local Adaptor", "LocalAdaptorModule", []),
    "ensemble": ("Ensemble", "EnsembleModule", ["--model.init_args.num_members={C}"]),
    "ensemble_oracle": ("Ensemble (oracle)", "EnsembleModule", ["--model.init_args.num_members={C}", *ORACLE]),
    "floral1": ("FLoRAL(1%)", None, ["--model.init_args.rank=0.01"]),
    "floral1_noprecond": ("FLoRAL(1%) no precond.", None, ["--model.init_args.rank=0.01",
                                                           "--model.init_args.precondition=false"]),
    "floral1_oracle": ("FLoRAL(1%) (oracle)", None, ["--model.init_args.rank=0.01", *ORACLE]),
    # beyond the paper (issue 12): router logits from a clustering of the clients' first updates
    "floral1_cluster": ("FLoRAL(1%) cluster init", None, ["--model.init_args.rank=0.01",
                                                          "--trainer.callbacks+=callbacks.ClusteredRouterInit"]),
    "floral10": ("FLoRAL(10%)", None, ["--model.init_args.rank=0.1"]),
    "floral10_oracle": ("FLoRAL(10%) (oracle)", None, ["--model.init_args.rank=0.1", *ORACLE]),
    # FineTune and FedProx also run on top of FLoRAL; pin them to the plain base here
    "finetune": ("FedAvg + fine-tuning", "FineTuneModule", FEDAVG),
    "ditto": ("Ditto", "DittoModule", []),
    "fedprox": ("FedProx", "FedProxModule", FEDAVG),
}  # fmt: skip


def method_overrides(task: str, method: str) -> list[str]:
    """The ``train.py`` arguments that turn a task's config into ``method``."""
    _, cls, overrides = METHODS[method]
    args = [o.replace("{C}", str(TASKS[task][1])) for o in overrides]
    if cls is not None:  # the config's init_args (its task included) carry over to the method's class
        args.insert(0, f"--model.class_path=floral_lightning.methods.{cls}")
    return args


def config_args(task: str) -> list[str]:
    return [arg for cfg in TASKS[task][0] for arg in ("--config", str(ROOT / cfg))]


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


def cell_command(task: str, method: str, seed: int, rounds: int, log_dir: Path, extra: list[str]) -> list[str]:
    """The ``train.py fit`` command of one cell."""
    return [
        sys.executable, str(ROOT / "train.py"), "fit", *config_args(task), *method_overrides(task, method),
        f"--seed_everything={seed}", f"--trainer.max_epochs={rounds}",
        f"--trainer.check_val_every_n_epoch={max(1, rounds // 20)}",
        f"--trainer.default_root_dir={log_dir}", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", *extra,
    ]  # fmt: skip


RUN_LOG = "lightning_logs/version_*/events.out.tfevents.*"  # a cell's TensorBoard events, under its log dir


def read_history(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``val/*`` scalar of a run as (round, value) pairs, from its TensorBoard events (``RunReport`` logs
    every value with the round as its step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = sorted(log_dir.glob(RUN_LOG))[-1:]
    acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("val/")
    }


def summarise_cell(history: dict[str, list[tuple[int, float]]], rounds: int) -> dict[str, float | str]:
    """The cell's value: mean of the evaluations in the last 1 % of rounds (at least the last one)."""
    metric = "acc" if "val/acc" in history else "mse"

    def tail_mean(tag: str) -> float:
        points = history.get(tag, [])
        if not points:
            return float("nan")
        last = points[-1][0]
        window = [v for r, v in points if r > last - max(1, math.ceil(0.01 * rounds))]
        return statistics.fmean(window)

    return {
        "metric": metric,
        "value": tail_mean(f"val/{metric}"),
        "value_unweighted": tail_mean(f"val/{metric}_unweighted"),
        "value_worst": tail_mean(f"val/{metric}_worst"),
        "routing_ari": tail_mean("val/routing_ari"),
    }


def client_parameters(module) -> int:
    """Parameters one client trains: all of the module's, counting one row of the router table."""
    return sum(
        p.numel() // p.shape[0] if name.endswith("router.logits") else p.numel()
        for name, p in module.named_parameters()
    )


def parameter_overhead(task: str, method: str, extra: list[str]) -> tuple[int, int]:
    """(base parameters, extra parameters per client) of a method on a task, without training.

    Extra counts everything a client trains beyond the base model: adaptors and its mixture logits, other
    ensemble members, a local adaptor or a personal model.
    """
    from .cli import main

    configs = config_args(task)
    fedavg = main([*configs, *method_overrides(task, "fedavg"), *extra], run=False).model
    model = main([*configs, *method_overrides(task, method), *extra], run=False).model
    base = client_parameters(fedavg)
    return base, client_parameters(model) - base


CURVE_FIELDS = ["task", "method", "seed", "rounds", "round", "value"]
CellKey = tuple[str, str, str, str]  # (task, method, seed, rounds) as results.csv spells them


def cell_key(row: dict) -> CellKey:
    return str(row["task"]), str(row["method"]), str(row["seed"]), str(row["rounds"])


def has_run_log(log_dir: Path) -> bool:
    return any(log_dir.glob(RUN_LOG))


def load_rows(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as f:
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


def load_curves(out: Path, rows: list[dict[str, str]]) -> dict[CellKey, dict[int, float]]:
    """The stored curve (round -> value) of each cell in ``rows``; a cell with none is read from its run log,
    where that still exists, and stored. Cells with neither are absent."""
    curves: dict[CellKey, dict[int, float]] = defaultdict(dict)
    for r in load_rows(out / "curves.csv"):  # a cell redone after a kill stored twice: the later one wins
        curves[cell_key(r)][int(r["round"])] = float(r["value"])
    for r in rows:
        key, log_dir = cell_key(r), out / r["log_dir"]
        if key not in curves and has_run_log(log_dir):
            points = read_history(log_dir).get(f"val/{r['metric']}", [])
            store_curve(out / "curves.csv", key, points)
            curves[key] = dict(points)
    return {key: points for key, points in curves.items() if points}


def run_cell(command: list[str], threads: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run one cell's ``train.py`` with ``threads`` torch threads; its result and wall time."""
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    return result, time.perf_counter() - t0


def compare(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    done = {(r["task"], r["method"], r["seed"], r["rounds"]) for r in load_rows(csv_path)}
    todo = [
        (task, method, seed)
        for task in args.tasks
        for method in args.methods
        for seed in args.seeds
        if (task, method, str(seed), str(args.rounds)) not in done
    ]
    # Small models do not gain from a second thread as much as from a second cell running beside them.
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    overhead: dict[tuple[str, str], tuple[int, int]] = {}
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        running = {}
        for task, method, seed in todo:
            log_dir = out / "runs" / task / method / f"seed{seed}"
            command = cell_command(task, method, seed, args.rounds, log_dir, args.override)
            running[pool.submit(run_cell, command, threads)] = (task, method, seed, log_dir, command)
        for future in as_completed(running):
            task, method, seed, log_dir, command = running[future]
            result, wall = future.result()
            print(f"[{time.perf_counter() - start:7.0f}s] {task} / {method} / seed {seed}: {wall:.0f} s", flush=True)
            if result.returncode != 0:
                print(result.stderr[-4000:], file=sys.stderr)
                for other in running:
                    other.cancel()
                raise SystemExit(f"cell {task}/{method}/seed {seed} failed (exit {result.returncode}); command: "
                                 + " ".join(command))  # fmt: skip
            if (task, method) not in overhead:
                overhead[task, method] = parameter_overhead(task, method, args.override)
            base, extra_params = overhead[task, method]
            history = read_history(log_dir)
            row = {
                "task": task, "method": method, "seed": seed, "rounds": args.rounds,
                **summarise_cell(history, args.rounds),
                "base_params": base, "extra_params": extra_params,
                "extra_percent": round(100.0 * extra_params / base, 2),
                "wall_s": round(wall, 1), "log_dir": str(log_dir.relative_to(out)),
            }  # fmt: skip
            store_curve(out / "curves.csv", cell_key(row), history.get(f"val/{row['metric']}", []))
            append_rows(csv_path, [row], FIELDS)
    report(out, args, time.perf_counter() - start)


def report(out: Path, args: argparse.Namespace, wall: float | None = None) -> None:
    """Write ``results.md`` and the curves from ``results.csv`` (rows of the requested grid only).

    ``wall`` is the wall time of the ``compare`` that ran the grid (``None`` for a report of what exists).
    A cell with fewer seeds than requested shows how many it has (``n=2``); a cell with none shows ``-``.
    """
    seeds = {str(seed) for seed in args.seeds}
    rows = [
        r
        for r in load_rows(out / "results.csv")
        if r["task"] in args.tasks
        and r["method"] in args.methods
        and r["rounds"] == str(args.rounds)
        and r["seed"] in seeds
    ]
    curves = load_curves(out, rows)
    no_curve = sorted(cell_key(r) for r in rows if cell_key(r) not in curves)
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        cells[r["method"], r["task"]].append(float(r["value"]))
    metric = {r["task"]: r["metric"] for r in rows}
    best = {}
    for task in args.tasks:
        means = {m: statistics.fmean(cells[m, task]) for m in args.methods if cells.get((m, task))}
        if means:
            pick = max if metric.get(task) == "acc" else min
            best[task] = pick(means, key=means.get)

    def fmt(method: str, task: str) -> str:
        values = cells.get((method, task))
        if not values:
            return "-"
        scale = 100.0 if metric[task] == "acc" else 1.0
        mean = statistics.fmean(values) * scale
        std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
        text = f"{mean:.1f} ({std:.1f})" if metric[task] == "acc" else f"{mean:.3g} ({std:.2g})"
        text = f"**{text}**" if best.get(task) == method else text
        return text if len(values) == len(seeds) else f"{text} n={len(values)}"

    lines = [
        "# Personalised test " + ("accuracy %" if "acc" in metric.values() else "metric"),
        "",
        f"Command: `python -m floral_lightning.experiments compare --tasks {' '.join(args.tasks)} "
        f"--methods {' '.join(args.methods)} --seeds {' '.join(map(str, args.seeds))} --rounds {args.rounds}"
        + "".join(f" --override={o}" for o in args.override)
        + (f" --jobs {args.jobs}" if getattr(args, "jobs", 1) > 1 else "")
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
        lines += ["", f"Curves: {len(no_curve)} cell(s) have no stored curve (run before curves were stored, "
                  "their run logs gone) and are left out of the plots: "
                  + ", ".join("/".join(key[:3]) for key in no_curve) + "."]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_curves(out, rows, curves, args)


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m floral_lightning.experiments", description=__doc__,
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
        grid.add_argument("--override", action="append", default=[],
                          help="extra train.py argument for every cell, repeatable (e.g. a data source)")  # fmt: skip
        # report accepts them too so that one argument list serves both verbs; it runs nothing, so for report
        # --jobs only appears in the command line written to results.md and --threads has no effect
        grid.add_argument("--jobs", type=int, default=1, help="cells run at the same time (default 1)")
        grid.add_argument("--threads", type=int, default=0,
                          help="torch threads per cell (default: CPU cores / jobs)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "compare":
        compare(args)
    else:
        results = Path(args.out) / "results.csv"
        if not results.exists():
            raise SystemExit(f"report: {results} does not exist; run 'compare' with the same --out first")
        report(Path(args.out), args)


if __name__ == "__main__":
    main()
