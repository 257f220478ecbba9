"""Training-step cost of FLoRAL's forward paths against the bare base model (spec §6).

    python bench/layers.py                # both models, full repeats, 1 torch thread
    python bench/layers.py --quick        # batch 16, fewer repeats
    python bench/layers.py --threads 0    # torch's default thread count
    python bench/layers.py --out F.json   # where the JSON goes (default bench/layers.json)

One step is forward + cross-entropy + backward + SGD step with ONE mixture for the whole batch (a client's
local training: ``model(x, client_id)`` with an int id). Variants, each its own model and optimizer:

- ``base``: the bare base network;
- ``naive``: the per-adaptor definition (``set_path("naive")``), one module pass per adaptor;
- ``factorised``: all adaptors as one rank-C·r pair (``set_path("factorised")``);
- ``merged``: the mixture folded into the weights, one base-sized op (``set_path("merged")``, what
  ``auto`` picks for a single mixture).

The variants are interleaved (see ``bench.common.interleaved_times``) and each reported as its median step
time and the ratio of that median to the base's median.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as ``python bench/layers.py``: make the ``bench`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, Figure, Section, interleaved_times, machine_info, median, spread  # noqa: E402
from floral_lightning import FloralModel  # noqa: E402
from floral_lightning.models import VGG8, CifarCNN  # noqa: E402

PATHS = ("naive", "factorised", "merged")
#: largest acceptable step time / base step time; the naive reference is context only (spec §6: 3.3x)
TARGETS: dict[str, float | None] = {"base": None, "naive": None, "factorised": 1.6, "merged": 1.15}
RANK = 0.01


@dataclass(frozen=True)
class ModelCase:
    """A base network and the FLoRAL settings of its task config."""

    label: str
    build: Callable[[], nn.Module]
    num_classes: int
    num_clients: int
    num_adaptors: int


CASES = {
    # conf/cifar.yaml: 20 clients, C = 4, rho = 1 %
    "cifar_cnn": ModelCase("CIFAR-10 CNN, C=4", lambda: CifarCNN(10), 10, 20, 4),
    # conf/cifar100.yaml: 100 clients, C = 10, rho = 1 %
    "vgg8": ModelCase("VGG8 (100 classes), C=10", lambda: VGG8(100), 100, 100, 10),
}


def _sgd_step(model: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x, y) -> Callable[[], None]:
    """A closure doing one training step of ``model`` on the fixed batch ``(x, y)``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        optimizer.step()

    return step


def step_variants(case: ModelCase, batch_size: int, seed: int = 0) -> tuple[dict[str, Callable[[], None]], dict]:
    """The four step closures of ``case`` (base, naive, factorised, merged) and facts about the model."""
    torch.manual_seed(seed)
    base = case.build().train()
    floral = FloralModel(case.build(), case.num_clients, case.num_adaptors, RANK).train()
    x = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, case.num_classes, (batch_size,))
    client = 3  # any registered client: one mixture [C] for the whole batch
    variants = {"base": _sgd_step(base, base, x, y)}
    for path in PATHS:
        model = copy.deepcopy(floral)  # own weights and optimizer per path: no variant sees another's updates
        model.set_path(path)
        variants[path] = _sgd_step(model, lambda inp, m=model: m(inp, client), x, y)
    overhead = floral.overhead()
    facts = {
        "num_adaptors": case.num_adaptors,
        "rank": RANK,
        "adaptor_params_percent": round(overhead.adaptor_percent, 2),
        "ranks": {name: layer.rank for name, layer in floral.floral_layers().items() if hasattr(layer, "rank")},
    }
    return variants, facts


def bench_case(case: ModelCase, batch_size: int, repeats: int, calls: int, seed: int = 0) -> list[Figure]:
    """Median step time of every variant of ``case`` and its ratio to the base."""
    variants, facts = step_variants(case, batch_size, seed)
    samples = interleaved_times(variants, repeats=repeats, calls=calls, warmup=2)
    base, base_cpu = median(samples["base"].wall), median(samples["base"].cpu)
    figures = []
    for name, times in samples.items():
        label = "base model" if name == "base" else f"{name} path"
        detail = {
            "step_ms": spread(times.wall, 1e3),
            "cpu_ms": spread(times.cpu, 1e3),
            "cpu_ratio": round(median(times.cpu) / base_cpu, 3),
            "batch_size": batch_size,
        }
        if name == "base":
            detail.update(facts)
        figures.append(
            Figure(
                f"{case.label}: {label}",
                round(median(times.wall) * 1e3, 3),
                "ms/step",
                ratio=round(median(times.wall) / base, 3),
                target=TARGETS[name],
                detail=detail,
            )
        )
    return figures


def run(quick: bool = False, models: tuple[str, ...] = tuple(CASES)) -> Section:
    """The ``layers`` section: every model case, full or quick sizes."""
    batch_size, repeats, calls = (16, 3, 2) if quick else (64, 9, 3)
    figures: list[Figure] = []
    for key in models:
        figures += bench_case(CASES[key], batch_size, repeats, calls)
    method = (
        "One training step (forward, cross-entropy, backward, SGD step) on a fixed random batch of 3x32x32 "
        "inputs, one mixture for the batch (an int client id, as in local training). Variants are separate "
        f"models timed interleaved: {repeats} rounds, each timing every variant for {calls} consecutive steps "
        "after 2 warm-up steps, order rotated every round; value = median seconds per step, ratio = median / "
        "median of the bare base model."
    )
    params = {"batch_size": batch_size, "repeats": repeats, "calls": calls, "rank": RANK, "models": list(models)}
    return Section("layers", figures, method, params)


def markdown(section: Section) -> str:
    """The section as a Markdown table."""
    lines = ["| figure | ms/step | x base | x base (CPU time) | target | met |", "|---|---:|---:|---:|---:|---|"]
    for f in section.figures:
        target = "-" if f.target is None else f"<= {f.target}"
        met = "-" if f.met is None else ("yes" if f.met else "NO")
        lines.append(f"| {f.name} | {f.value:.2f} | {f.ratio:.2f} | {f.detail['cpu_ratio']:.2f} | {target} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 16 and fewer repeats")
    parser.add_argument("--model", choices=[*CASES, "all"], default="all")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0: torch's default")
    parser.add_argument("--out", default=str(ROOT / "bench" / "layers.json"), help="where to write the JSON")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    models = tuple(CASES) if args.model == "all" else (args.model,)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    section = run(args.quick, models)
    print(markdown(section))
    command = "python bench/layers.py" + (" --quick" if args.quick else "") + f" --model {args.model}"
    result = {"command": command, "machine": machine_info(), "layers": section.as_dict()}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
