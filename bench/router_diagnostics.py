"""Why the learned router lags the oracle (issue 12): per-round router diagnostics of router variants.

    python bench/router_diagnostics.py --task mnist_label_shift --rounds 150 --seed 0 \
        --variants paper cluster noise_b router_lr --out bench/router_diagnostics.json

Runs ``train.py fit`` once per variant (FLoRAL(1%) on the offline MNIST subset for the MNIST tasks) with
``callbacks.RouterDiagnostics`` and an evaluation every ``--eval-every`` rounds, then prints a table per
variant: per round the router gradient norm (mean over the round's local steps), the mean pairwise distance
of the C adaptors of a layer (mean over layers), the routing ARI of the clients' argmax adaptor, and the
personalised validation metric; and a summary (final metric, first round with ARI >= 0.95). Everything,
with the commands, goes to ``--out`` as JSON.

    python bench/router_diagnostics.py --grid results/mnist --grid-methods floral1_cluster

runs nothing: it prints, for every cell of a runner grid whose run log still exists, its value, final routing
ARI and the first evaluated round from which the routing ARI stays >= 0.95; with ``--at-round R``, every
stored curve's value at round R instead (runs of different lengths compared at one round).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as ``python bench/router_diagnostics.py``: the grid runner's package is beside
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.cells import LOGGERS, TASKS, config_args, method_overrides  # noqa: E402
from experiments.record import CSV_DIR, read_metrics  # noqa: E402
from floral_lightning.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "mnist_subset.npz"


def _clustered_init(**init_args: float) -> list[str]:
    """The override that adds ``callbacks.ClusteredRouterInit`` with ``init_args``."""
    spec = {"class_path": "callbacks.ClusteredRouterInit", "init_args": init_args}
    return [f"--trainer.callbacks+={json.dumps(spec)}"]


#: variant -> train.py overrides on top of FLoRAL(1%) (the runner's ``floral1``)
VARIANTS: dict[str, list[str]] = {
    "paper": [],
    # the diagnosis ran the clustered start from each client's first gradient (local_steps=1); "clustered" is today's
    # default start (router.init=clustered: 20 local steps)
    "cluster": _clustered_init(local_steps=1),
    "clustered": ["--model.init_args.router.init=clustered"],
    "cluster_logit5": _clustered_init(logit=5.0, local_steps=1),
    "cluster_reassign50": _clustered_init(reassign_every=50, local_steps=1),
    "noise_b": ['--trainer.callbacks+={"class_path": "callbacks.AdaptorInitNoise", "init_args": {"std": 0.01}}'],
    "router_lr": ["--model.init_args.optimizer.router_lr=1.0"],
    "noise_b_router_lr": [
        '--trainer.callbacks+={"class_path": "callbacks.AdaptorInitNoise", "init_args": {"std": 0.01}}',
        "--model.init_args.optimizer.router_lr=1.0",
    ],
    "oracle": ["--model.init_args.router.oracle=true"],
}
ARI_TARGET = 0.95


def variant_command(task: str, variant: str, seed: int, rounds: int, eval_every: int, log_dir: Path) -> list[str]:
    """The ``train.py fit`` arguments of one variant's run (diagnostics written to ``log_dir/diagnostics.json``)."""
    data = []
    if task.startswith("mnist"):
        data = ["--data.init_args.source=floral_lightning.data.NpzArrays",
                f"--data.init_args.source.init_args.path={NPZ}"]  # fmt: skip
    path = str(log_dir / "diagnostics.json")
    diagnostics = {"class_path": "callbacks.RouterDiagnostics", "init_args": {"path": path}}
    return [
        "fit", *config_args(task), *method_overrides(task, "floral1"), *data, *VARIANTS[variant],
        f"--trainer.callbacks+={json.dumps(diagnostics)}", f"--seed_everything={seed}",
        f"--trainer.max_epochs={rounds}", f"--trainer.check_val_every_n_epoch={eval_every}",
        f"--trainer.default_root_dir={log_dir}", f"--trainer.logger={LOGGERS.format(dir=log_dir)}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]  # fmt: skip


def read_history(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``val/*`` value of a run as (round, value) pairs in round order, from its CSV logger's
    ``metrics.csv`` (what the grid runner reads too: :func:`experiments.record.read_metrics`)."""
    metrics = read_metrics(log_dir)
    return {tag: sorted(points.items()) for tag, points in metrics.items() if tag.startswith("val/")}


def first_round_at(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first round (rounds completed) from which the curve stays >= target, or ``None``."""
    for i, (round_idx, _) in enumerate(curve):
        if all(v >= target for _, v in curve[i:]):
            return round_idx
    return None


def run_variant(task: str, variant: str, seed: int, rounds: int, eval_every: int, log_root: Path) -> dict:
    log_dir = log_root / task / variant / f"seed{seed}"
    args = variant_command(task, variant, seed, rounds, eval_every, log_dir)
    start = time.perf_counter()
    main(args)
    wall = time.perf_counter() - start
    diagnostics = json.loads((log_dir / "diagnostics.json").read_text())
    history = read_history(log_dir)
    metric = "acc" if "val/acc" in history else "mse"
    ari = [(int(row["round"]), row.get("router/ari", math.nan)) for row in diagnostics]  # rounds completed
    return {
        "command": "python train.py " + " ".join(args),
        "wall_s": round(wall, 1),
        "metric": metric,
        "diagnostics": diagnostics,
        "val": {tag: history[tag] for tag in (f"val/{metric}", "val/routing_ari") if tag in history},
        "final": history[f"val/{metric}"][-1][1] if history.get(f"val/{metric}") else math.nan,
        "first_round_ari_target": first_round_at(ari, ARI_TARGET),
    }


def table(name: str, result: dict, every: int) -> list[str]:
    """Markdown rows of one variant: diagnostics every ``every`` rounds, with the nearest evaluation."""
    val = dict(result["val"].get(f"val/{result['metric']}", []))
    lines = [f"### {name}", "", f"| round | router grad norm | adaptor spread | ARI | val {result['metric']} |",
             "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in result["diagnostics"]:
        done = int(row["round"])
        if done == 1 or done % every == 0:
            value = val.get(done, math.nan)
            lines.append(f"| {done} | {row['router/grad_norm']:.2e} | {row['router/adaptor_spread']:.3f} | "
                         f"{row.get('router/ari', math.nan):.3f} | {value:.4f} |")  # fmt: skip
    return lines


def grid_rows(out: Path, methods: list[str]) -> list[str]:
    """Markdown rows, one per cell of a runner grid (``python -m experiments``) in ``out`` whose
    run log still exists: the cell's value, its final routing ARI and the first evaluated round from which
    the routing ARI stays >= 0.95."""
    lines = [f"| task | method | seed | value | routing ARI | first round with ARI >= {ARI_TARGET} |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    with (out / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["method"] in methods]
    for r in rows:
        log_dir = out / r["log_dir"]
        if not (log_dir / CSV_DIR).is_dir():
            continue
        curve = read_history(log_dir).get("val/routing_ari", [])
        first = first_round_at(curve, ARI_TARGET) if curve else None
        lines.append(f"| {r['task']} | {r['method']} | {r['seed']} | {float(r['value']):.4g} | "
                     f"{float(r['routing_ari']):.3f} | {first if first is not None else '-'} |")  # fmt: skip
    return lines


def curve_rows(out: Path, methods: list[str], round_idx: int) -> list[str]:
    """Markdown rows: every stored curve (``curves.csv`` of a runner folder) of ``methods`` at ``round_idx``,
    so runs of different lengths compare at one round (a run's first R rounds do not depend on its length)."""
    lines = [f"| task | method | seed | run's rounds | value at round {round_idx} |", "|---|---|---:|---:|---:|"]
    with (out / "curves.csv").open() as f:
        points = [r for r in csv.DictReader(f) if r["method"] in methods and int(r["round"]) == round_idx]
    for r in sorted(points, key=lambda r: (r["task"], methods.index(r["method"]), int(r["seed"]), int(r["rounds"]))):
        lines.append(f"| {r['task']} | {r['method']} | {r['seed']} | {r['rounds']} | {float(r['value']):.4g} |")
    return lines


def main_cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="mnist_label_shift", choices=sorted(TASKS))
    parser.add_argument("--variants", nargs="+", default=["paper", "cluster"], choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--print-every", type=int, default=10, help="rows of the printed table, in rounds")
    parser.add_argument("--out", default="bench/router_diagnostics.json")
    parser.add_argument("--log-dir", default="lightning_logs/bench_router")
    parser.add_argument("--grid", help="instead of running: per-cell routing table of this runner output folder")
    parser.add_argument("--grid-methods", nargs="+", default=["floral1", "floral1_cluster"])
    parser.add_argument("--at-round", type=int, help="with --grid: each stored curve's value at this round")
    args = parser.parse_args(argv)
    if args.grid:
        grid = Path(args.grid)
        if args.at_round is None:
            print("\n".join(grid_rows(grid, args.grid_methods)))
        else:
            print("\n".join(curve_rows(grid, args.grid_methods, args.at_round)))
        return
    results = {
        "task": args.task, "seed": args.seed, "rounds": args.rounds, "eval_every": args.eval_every,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "variants": {},
    }  # fmt: skip
    for variant in args.variants:
        results["variants"][variant] = run_variant(
            args.task, variant, args.seed, args.rounds, args.eval_every, Path(args.log_dir)
        )
        Path(args.out).write_text(json.dumps(results, indent=1))
    lines = [f"## {args.task}, seed {args.seed}, {args.rounds} rounds", "",
             f"| variant | final val metric | first round with ARI >= {ARI_TARGET} (to the end) | wall s |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for name, r in results["variants"].items():
        lines.append(f"| {name} | {r['final']:.4f} | {r['first_round_ari_target'] or '-'} | {r['wall_s']} |")
    for name, r in results["variants"].items():
        lines += ["", *table(name, r, args.print_every)]
    print("\n".join(lines))


if __name__ == "__main__":
    main_cli()
