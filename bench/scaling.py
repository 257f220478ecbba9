"""How a round's time and the process's memory grow with registered and with sampled clients.

A small task so that 10,000 clients fit: ``RandomImages`` 1x8x8 (12 train and 2 test images per client),
``MLP(64, [32], 10)``, FLoRAL C = 4, rho = 10 %, batch 8, one local epoch, through the real Trainer +
``FederatedCallback`` (validation, logging, checkpoints off).

- **Registered clients** K = 20 → 1,000 → 10,000 with 10 clients sampled per round: the round time should
  not depend on K (only the router table, K x C, grows).
- **Sampled clients** m = 5, 10, 20 per round (K = 1,000): the round time should grow linearly; reported
  per sampled client, with a least-squares fit ``round = fixed + m x per_client``.
- **Memory**: one fresh subprocess per K builds the same data and model, then a Trainer runs 2 rounds. Peak
  resident set sizes come from the kernel (``VmHWM`` in ``/proc/self/status``, reset with
  ``/proc/self/clear_refs`` after the imports and again after set-up; ``ru_maxrss`` where that is not
  available): the rounds' peak above the RSS after set-up (the round's working memory, which must stay
  flat), and the whole run's peak above the RSS after the imports. Bytes per registered client are the slope
  of the latter between the smallest and the largest K (data and set-up transients included). The model
  side is also counted exactly from the tensors: the router logits (K x C float32), their gradient and the
  optimizer state, divided by K.

Round times are measured in-process, all configurations interleaved in blocks (order rotated per block),
one warm-up round per run, timed start-to-start of ``on_train_epoch_start``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import ROOT, Figure, Section, median, quiet_lightning, rotated, spread
from bench.rounds import SEED, quiet_trainer, timed_fit
from callbacks import FederatedCallback
from floral_lightning.data import FederatedDataModule, RandomImages
from floral_lightning.models import MLP
from floral_lightning.module import FloralModule

REGISTERED = (20, 1_000, 10_000)
SAMPLED = (5, 10, 20)
SAMPLED_AT = 1_000  # registered clients of the sampled-clients runs
DEFAULT_SAMPLED = 10
TRAIN_PER_CLIENT, TEST_PER_CLIENT, BATCH = 12, 2, 8
NUM_ADAPTORS = 4
FLAT_TARGET = 1.1  # round time at K / round time at the smallest K
LINEAR_TARGET = 1.1  # time per sampled client at m / at the smallest m


@dataclass(frozen=True)
class ScalingSizes:
    """How many rounds and interleaving blocks are timed, and how many rounds the memory runs train."""

    warmup: int = 1
    rounds: int = 10
    blocks: int = 3
    memory_rounds: int = 2


FULL = ScalingSizes()
QUICK = ScalingSizes(rounds=3, blocks=1)


def small_data(num_clients: int) -> FederatedDataModule:
    """``num_clients`` clients with 12 train / 2 test 1x8x8 images each (built and set up)."""
    source = RandomImages(num_clients * TRAIN_PER_CLIENT, num_clients * TEST_PER_CLIENT, (1, 8, 8), 10, SEED)
    data = FederatedDataModule(source, num_clients=num_clients, batch_size=BATCH, seed=SEED)
    data.setup("fit")
    return data


def small_module(num_clients: int) -> FloralModule:
    """A 64-32-10 MLP with FLoRAL C=4, rho=10 % (ranks 2 and 1), the same initial weights on every call."""
    torch.manual_seed(SEED)
    return FloralModule(MLP(64, [32], 10), num_clients=num_clients, num_adaptors=NUM_ADAPTORS, rank=0.1)


def round_times(sizes: ScalingSizes) -> dict[tuple[int, int], list[tuple[float, float]]]:
    """Trainer round (wall, CPU) times of every (registered, sampled) configuration, interleaved in blocks."""
    configs = [(k, DEFAULT_SAMPLED) for k in REGISTERED] + [(SAMPLED_AT, m) for m in SAMPLED if m != DEFAULT_SAMPLED]
    data = {k: small_data(k) for k in {k for k, _ in configs}}
    times: dict[tuple[int, int], list[tuple[float, float]]] = {c: [] for c in configs}
    for block in range(sizes.blocks):
        for k, m in rotated(configs, block):
            callback = FederatedCallback(clients_per_round=m, seed=SEED)
            times[(k, m)] += timed_fit(small_module(k), data[k], callback, sizes.warmup, sizes.rounds)
    return times


# --- memory: one subprocess per K ---------------------------------------------------------------------------
def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes; ``None`` off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_and_baseline() -> tuple[Callable[[], int], int, str]:
    """A function returning the peak RSS so far, the current RSS, and the method's name.

    Importing torch and Lightning leaves a high-water mark above what a small run adds, so the mark is reset
    after the imports where the kernel allows it; elsewhere ``ru_maxrss`` is the fallback (coarser).
    """
    if _reset_peak() and _status_bytes("VmHWM") is not None:
        return (lambda: _status_bytes("VmHWM")), _status_bytes("VmRSS"), "VmHWM after clear_refs=5, minus VmRSS"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kilobytes on Linux

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    return peak, peak(), "ru_maxrss difference"


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def memory_child(num_clients: int, rounds: int) -> dict:
    """Build and train ``rounds`` rounds at ``num_clients`` registered clients; report peak memory and the
    exact sizes of everything that grows with the number of clients."""
    peak, baseline, how = _peak_and_baseline()
    data = small_data(num_clients)
    module = small_module(num_clients)
    setup_peak = peak()
    after_setup = _status_bytes("VmRSS") or setup_peak
    _reset_peak()  # where supported, the next peak is that of the rounds alone
    trainer = quiet_trainer(rounds, [FederatedCallback(clients_per_round=DEFAULT_SAMPLED, seed=SEED)])
    trainer.fit(module, datamodule=data)
    rounds_peak = peak()
    logits = module.model.router.logits
    optimizer_state = [v for state in trainer.optimizers[0].state.values() for v in state.values()]
    splits = {id(data.split(s)): data.split(s) for s in ("train", "val", "test")}.values()  # val is test
    return {
        "num_clients": num_clients,
        "baseline_rss_bytes": baseline,
        "peak_growth_bytes": max(setup_peak, rounds_peak) - baseline,
        "setup_peak_growth_bytes": setup_peak - baseline,
        "rounds_peak_over_setup_bytes": rounds_peak - after_setup,
        "method": how,
        "router_bytes": _tensor_bytes([logits]),
        "router_grad_bytes": _tensor_bytes([logits.grad]),
        "optimizer_state_bytes": _tensor_bytes(optimizer_state),
        "data_bytes": _tensor_bytes([t for s in splits for t in (s.x, s.y, s.offsets)]),
    }


def memory(sizes: ScalingSizes) -> dict[int, dict]:
    """Run :func:`memory_child` in a fresh interpreter for every registered-client count."""
    out = {}
    for k in REGISTERED:
        cmd = [sys.executable, "-m", "bench.scaling", "--memory-child", str(k), "--rounds", str(sizes.memory_rounds)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
        out[k] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# --- the section --------------------------------------------------------------------------------------------
def _linear_fit(ms: list[int], ts: list[float]) -> tuple[float, float]:
    """Least-squares ``t = fixed + m * per_client``."""
    x, y = torch.tensor(ms, dtype=torch.float64), torch.tensor(ts, dtype=torch.float64)
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return float(y.mean()) - slope * float(x.mean()), slope


def run(quick: bool = False) -> Section:
    """The ``scaling`` section."""
    sizes = QUICK if quick else FULL
    both = round_times(sizes)
    times = {key: [w for w, _ in samples] for key, samples in both.items()}
    cpu = {key: [c for _, c in samples] for key, samples in both.items()}
    mem = memory(sizes)
    figures = []
    ref = median(times[(REGISTERED[0], DEFAULT_SAMPLED)])
    for k in REGISTERED:
        t = median(times[(k, DEFAULT_SAMPLED)])
        figures.append(
            Figure(
                f"round time, {k:,} registered / {DEFAULT_SAMPLED} sampled clients",
                round(t * 1e3, 2),
                "ms/round",
                ratio=round(t / ref, 3),
                target=None if k == REGISTERED[0] else FLAT_TARGET,
                detail={
                    "round_ms": spread(times[(k, DEFAULT_SAMPLED)], 1e3),
                    "cpu_ms": spread(cpu[(k, DEFAULT_SAMPLED)], 1e3),
                },
            )
        )
    sampled = {m: median(times[(SAMPLED_AT, m)]) for m in SAMPLED}
    fixed, per_client = _linear_fit(list(sampled), list(sampled.values()))
    smallest = SAMPLED[0]
    for m, t in sampled.items():
        figures.append(
            Figure(
                f"time per sampled client, {m} sampled / {SAMPLED_AT:,} registered",
                round(t / m * 1e3, 3),
                "ms/client",
                ratio=round((t / m) / (sampled[smallest] / smallest), 3),
                target=None if m == smallest else LINEAR_TARGET,
                detail={"round_ms": spread(times[(SAMPLED_AT, m)], 1e3), "cpu_ms": spread(cpu[(SAMPLED_AT, m)], 1e3)}
                | (
                    {"fit_fixed_ms": round(fixed * 1e3, 3), "fit_per_client_ms": round(per_client * 1e3, 3)}
                    if m == smallest
                    else {}
                ),
            )
        )
    figures += _memory_figures(mem)
    params = {
        **vars(sizes),
        "registered": list(REGISTERED),
        "sampled": list(SAMPLED),
        "sampled_at": SAMPLED_AT,
        "train_per_client": TRAIN_PER_CLIENT,
        "batch_size": BATCH,
        "num_adaptors": NUM_ADAPTORS,
    }
    method = (
        __doc__.split("\n\n", 1)[1].strip().replace("\n", " ")
        + f" {sizes.blocks} block(s) of {sizes.rounds} timed rounds per configuration."
    )
    return Section("scaling", figures, method, params)


def _memory_figures(mem: dict[int, dict]) -> list[Figure]:
    """Per K: the rounds' working memory (target: flat) and the whole run's peak; then bytes per client."""
    small, large = mem[REGISTERED[0]], mem[REGISTERED[-1]]
    figures = []
    for k, m in mem.items():
        figures.append(
            Figure(
                f"peak memory of the rounds above set-up, {k:,} registered clients",
                round(m["rounds_peak_over_setup_bytes"] / 2**20, 2),
                "MiB",
                ratio=round(m["rounds_peak_over_setup_bytes"] / max(small["rounds_peak_over_setup_bytes"], 1), 3),
                target=None if k == REGISTERED[0] else FLAT_TARGET,
                detail=m,
            )
        )
    for k, m in mem.items():
        figures.append(
            Figure(
                f"peak memory growth of the run (set-up + rounds), {k:,} registered clients",
                round(m["peak_growth_bytes"] / 2**20, 2),
                "MiB",
                ratio=round(m["peak_growth_bytes"] / max(small["peak_growth_bytes"], 1), 3),
            )
        )
    span = large["num_clients"] - small["num_clients"]
    model_side = sum(large[key] for key in ("router_bytes", "router_grad_bytes", "optimizer_state_bytes"))
    figures += [
        Figure(
            "peak memory per registered client (slope of the run's peak, data and set-up included)",
            round((large["peak_growth_bytes"] - small["peak_growth_bytes"]) / span, 1),
            "bytes/client",
            detail={"data_bytes_per_client": round(large["data_bytes"] / large["num_clients"], 1)},
        ),
        Figure(
            "model-side memory per registered client (router logits + grad + optimizer state)",
            round(model_side / large["num_clients"], 1),
            "bytes/client",
            detail={"num_adaptors": NUM_ADAPTORS, "counted_from": "tensor sizes after the run"},
        ),
    ]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-child", type=int, metavar="K", help="(internal) measure memory at K clients")
    parser.add_argument("--rounds", type=int, default=FULL.memory_rounds)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quiet_lightning()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.rounds)))
        return
    for figure in run(args.quick).figures:
        print(figure.as_dict())


if __name__ == "__main__":
    main()
