"""A local step of FLoRAL from two versions of this package, interleaved in one process, against the base model.

    mkdir -p /tmp/old && git archive 72e0cd5 floral_lightning | tar -x -C /tmp/old
    mv /tmp/old/floral_lightning /tmp/old/floral_old
    python -m bench.step_ab --old /tmp/old --out /tmp/step_ab.json

``--old DIR`` holds an older copy of the package renamed ``floral_old`` (its imports are relative, so it loads
beside the current one). A step is plain PyTorch: zero_grad, forward with one client's mixture, MSE loss,
backward, ``precondition_gradients_``, SGD step. The three variants (base model, FLoRAL old, FLoRAL new) run
in rotated order, 15 rotations of 200 steps each after 5 warm-up steps; the figure is the median process CPU
time per step (one torch thread), so the load of other processes disturbs it little and the three share it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import floral_lightning
from floral_lightning.models import MLP

#: model, batch, input and output width, rank, C, K of the small tasks' local steps
CASES: dict[str, tuple[Callable[[], nn.Module], int, int, int, int | float, int, int]] = {
    "synthetic_linear": (lambda: nn.Linear(10, 3), 4, 10, 3, 1, 2, 10),
    "synthetic_mlp": (lambda: MLP(10, [20], 1), 8, 10, 1, 1, 4, 20),
    "mnist": (lambda: MLP(784, [200], 10), 32, 784, 10, 0.01, 4, 300),
}


def stepper(package, case: str) -> Callable[[], None]:
    """One local step of ``case``: the bare base model when ``package`` is None, else its ``FloralModel``."""
    build, batch, d_in, d_out, rank, num_adaptors, num_clients = CASES[case]
    torch.manual_seed(0)
    base = build()
    x, y = torch.randn(batch, d_in), torch.randn(batch, d_out)
    if package is None:
        optimizer = torch.optim.SGD(base.parameters(), lr=0.01)

        def base_step() -> None:
            optimizer.zero_grad()
            F.mse_loss(base(x), y).backward()
            optimizer.step()

        return base_step
    model = package.FloralModel(base, num_clients, num_adaptors, rank)
    groups = [model.shared_parameters(), model.adaptor_parameters(), model.private_parameters()]
    optimizer = torch.optim.SGD([{"params": g} for g in groups], lr=0.01)

    def floral_step() -> None:
        optimizer.zero_grad()
        F.mse_loss(model(x, 1), y).backward()
        model.precondition_gradients_()
        optimizer.step()

    return floral_step


def measure(old_package, rotations: int = 15, steps: int = 200) -> dict[str, dict[str, float]]:
    """Median CPU microseconds per step of every case and variant."""
    out = {}
    for case in CASES:
        variants = {
            "base": stepper(None, case),
            "old": stepper(old_package, case),
            "new": stepper(floral_lightning, case),
        }
        names = list(variants)
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rotations):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                step = variants[name]
                for _ in range(5):
                    step()
                start = time.process_time()
                for _ in range(steps):
                    step()
                samples[name].append((time.process_time() - start) / steps * 1e6)
        out[case] = {n: round(statistics.median(v), 1) for n, v in samples.items()}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="directory holding the older package as floral_old/")
    parser.add_argument("--out", default=None, help="write the medians as JSON here")
    args = parser.parse_args(argv)
    if not (Path(args.old) / "floral_old" / "__init__.py").is_file():
        parser.error(f"--old {args.old}: expected {args.old}/floral_old/__init__.py (the older package, renamed)")
    sys.path.insert(0, str(Path(args.old).resolve()))
    torch.set_num_threads(1)
    result = measure(importlib.import_module("floral_old"))
    print("| local step | base | FLoRAL old | FLoRAL new | new / old |")
    print("|---|---:|---:|---:|---:|")
    for case, t in result.items():
        print(
            f"| {case} | {t['base']:,.0f} µs | {t['old']:,.0f} µs ({t['old'] / t['base']:.2f}x) | "
            f"{t['new']:,.0f} µs ({t['new'] / t['base']:.2f}x) | {t['new'] / t['old']:.2f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"unit": "CPU us per step (median)", "cases": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
