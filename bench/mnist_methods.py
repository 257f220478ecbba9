"""FLoRAL vs FedAvg on an MNIST task config, run in full on the offline MNIST subset.

    python bench/mnist_methods.py --config conf/mnist_label_shift.yaml --rounds 500 \
        --out bench/mnist_label_shift.json

Runs ``train.py fit`` once per method with the data source pointed at ``../shared/data/mnist_subset.npz``
and reports the personalised test accuracy (sample-weighted mean over clients, the paper's number),
unweighted mean, worst client and routing purity (ARI) of the final round, with wall time.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from floral_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"FLoRAL(1%)": [], "FedAvg": ["--model.init_args.num_adaptors=0"]}


def run_method(config: str, npz: str, rounds: int, extra: list[str], log_dir: str) -> dict:
    args = [
        "fit",
        "--config",
        config,
        "--data.init_args.source=floral_lightning.data.NpzArrays",
        f"--data.init_args.source.init_args.path={npz}",
        f"--trainer.max_epochs={rounds}",
        f"--trainer.default_root_dir={log_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        *extra,
    ]
    start = time.perf_counter()
    cli = main(args)
    wall = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return {"wall_s": round(wall, 1), "command": "python train.py " + " ".join(args), **metrics}


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="conf/mnist_label_shift.yaml")
    parser.add_argument("--npz", default=str(ROOT.parent / "shared" / "data" / "mnist_subset.npz"))
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--out", default="bench/mnist_label_shift.json")
    parser.add_argument("--log-dir", default="lightning_logs/bench_mnist")
    parser.add_argument("--override", action="append", default=[], help="extra train.py argument, repeatable")
    args = parser.parse_args()
    results = {
        "config": args.config,
        "rounds": args.rounds,
        "overrides": args.override,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "methods": {},
    }
    for name, extra in METHODS.items():
        log_dir = f"{args.log_dir}/{name}"
        results["methods"][name] = run_method(args.config, args.npz, args.rounds, extra + args.override, log_dir)
        Path(args.out).write_text(json.dumps(results, indent=2))
    columns = ["val/acc", "val/acc_unweighted", "val/acc_worst", "val/routing_ari"]
    print("| method | acc (weighted) | acc (unweighted) | worst client | routing ARI | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in results["methods"].items():
        cells = " | ".join(f"{r.get(c, float('nan')):.4f}" for c in columns)
        print(f"| {name} | {cells} | {r['wall_s']} |")


if __name__ == "__main__":
    main_cli()
