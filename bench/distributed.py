"""Client-parallel rounds: round time with 1 and 2 processes on CPU, and what the round-end collective costs.

    python -m bench.distributed                 # MNIST label shift (30 clients/round) and the CIFAR CNN (20)
    python -m bench.distributed --quick         # MNIST only, fewer rounds
    python -m bench.distributed --out PATH      # default: bench/results_distributed.json
    python -m bench --only distributed          # the same figures in the suite's table (not in its default run)

Each configuration is a separate ``train.py fit``-equivalent run (``floral_lightning.cli.main``) in fresh processes:

- ``1 process x 1 thread`` and ``1 process x 2 threads`` (the single-process baselines: one core, or both
  cores through intra-op threads);
- ``2 processes x 1 thread`` (``--trainer.devices=2 --trainer.accelerator=cpu``: each process trains half of
  the round's clients; one intra-op thread each, so the two processes use the same two cores as the
  2-thread baseline).

The configurations run one after another in interleaved blocks (1, 2, 1x2t, then again rotated), so slow
phases of a shared machine hit all of them; a round time is the median over the timed rounds of all blocks
(after one warm-up round per run; no validation in timed rounds). ``ratio`` is the 2-process round time over
the faster single-process one. The collective's share of a round is measured two ways on the 2-process runs:
``sync`` is the whole round-end ``sync_round`` call on rank 0 (it includes waiting for the other rank to finish
its clients, i.e. load imbalance), ``transfer`` an all_gather of the same bytes right after a barrier (the
communication alone, median of 20). Bytes are the payload each rank sends per round and what it receives.
MNIST uses the offline subset (``../shared/data/mnist_subset.npz``); the CIFAR CNN trains on random images
(``RandomImages``, 64 per client), which costs the same as CIFAR-10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import ROOT, Figure, Section, machine_info

TASKS = {
    # name: (bench.tasks task, clients per round, 2-process / 1-process target)
    "mnist_label_shift": ("mnist_label_shift", 30, 0.6),
    "cifar_cnn": ("cifar10_label_shift", 20, None),
}
CONFIGS = (("1 process x 1 thread", 1, 1), ("2 processes x 1 thread", 2, 1), ("1 process x 2 threads", 1, 2))
COLLECTIVE_TARGET = 0.05


def worker(task: str, devices: int, threads: int, rounds: int, out: str) -> None:
    """One run (every rank executes this): time each round on rank 0 and record the collective's costs."""
    import lightning as L

    from bench.common import quiet_lightning
    from bench.tasks import TASKS as SPECS
    from bench.tasks import cli_args
    from callbacks import FederatedCallback
    from floral_lightning.cli import main

    torch.set_num_threads(threads)
    quiet_lightning()
    spec_name, clients, _ = TASKS[task]
    extra = [f"--federated.clients_per_round={clients}", "--trainer.accelerator=cpu", f"--trainer.devices={devices}"]
    with tempfile.TemporaryDirectory() as log_dir:
        cli = main(cli_args(spec_name, SPECS[spec_name], extra, rounds + 1, 10_000, log_dir), run=False)
        loop = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedCallback))

        class Stamps(L.Callback):
            def __init__(self) -> None:
                self.starts: list[float] = []
                self.syncs: list[dict] = []

            def on_train_epoch_start(self, trainer, pl_module) -> None:
                self.starts.append(time.perf_counter())

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                self.starts.append(time.perf_counter())
                if loop.last_sync is not None:
                    sync = loop.last_sync
                    self.syncs.append({"s": sync.seconds, "sent": sync.payload_bytes, "received": sync.received_bytes})

        stamps = Stamps()
        cli.trainer.callbacks.append(stamps)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        transfer = None
        if cli.trainer.world_size > 1:
            size = stamps.syncs[-1]["sent"]
            buffer = torch.zeros(size, dtype=torch.uint8)
            gathered = buffer.new_empty((cli.trainer.world_size, size))
            times = []
            for _ in range(20):
                torch.distributed.barrier()
                start = time.perf_counter()
                torch.distributed.all_gather(list(gathered.unbind(0)), buffer)
                times.append(time.perf_counter() - start)
            transfer = statistics.median(times)
        if cli.trainer.is_global_zero:
            rounds_s = [b - a for a, b in zip(stamps.starts[0::2], stamps.starts[1::2])][1:]  # drop the warm-up
            record = {"rounds": rounds_s, "syncs": stamps.syncs[1:], "transfer": transfer}
            Path(out).write_text(json.dumps(record))


def run_config(task: str, devices: int, threads: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "record.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "bench.distributed", "--worker", task, str(devices), str(threads)]
        command += [str(rounds), str(out)]
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def measure(quick: bool) -> dict:
    """Every task's round times, collective costs and bytes (see the module docstring)."""
    tasks = ["mnist_label_shift"] if quick else list(TASKS)
    rounds, blocks = (3, 1) if quick else (5, 2)
    results: dict = {}
    for task in tasks:
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
        for block in range(blocks):
            order = CONFIGS[block % len(CONFIGS) :] + CONFIGS[: block % len(CONFIGS)]
            for name, devices, threads in order:
                runs[name].append(run_config(task, devices, threads, rounds))
        seconds = {name: statistics.median([s for r in rs for s in r["rounds"]]) for name, rs in runs.items()}
        two = runs["2 processes x 1 thread"]
        syncs = [s for r in two for s in r["syncs"]]
        single = min(seconds["1 process x 1 thread"], seconds["1 process x 2 threads"])
        sync = statistics.median(s["s"] for s in syncs)
        transfer = statistics.median(r["transfer"] for r in two)
        results[task] = {
            "clients_per_round": TASKS[task][1],
            "round_seconds": seconds,
            "ratio_2_vs_1": seconds["2 processes x 1 thread"] / single,
            "ratio_target": TASKS[task][2],
            "sync_seconds": sync,
            "sync_share": sync / seconds["2 processes x 1 thread"],
            "transfer_seconds": transfer,
            "transfer_share": transfer / seconds["2 processes x 1 thread"],
            "collective_target": COLLECTIVE_TARGET,
            "bytes_sent_per_round_per_rank": syncs[-1]["sent"],
            "bytes_received_per_round_per_rank": syncs[-1]["received"],
            "timed_rounds_per_config": rounds * blocks,
        }
    return results


def run(quick: bool = False) -> list[Section]:
    """The ``distributed`` section of ``python -m bench`` (opt-in: ``--only distributed``)."""
    results = measure(quick)
    figures = []
    for task, r in results.items():
        figures += [
            Figure(
                f"{task}: round, 2 processes x 1 thread / best 1 process",
                r["round_seconds"]["2 processes x 1 thread"],
                "s",
                r["ratio_2_vs_1"],
                r["ratio_target"],
                detail={"round_seconds": r["round_seconds"]},
            ),
            Figure(
                f"{task}: round-end collective / round (2 processes, incl. waiting for the other)",
                r["sync_seconds"],
                "s",
                r["sync_share"],
                COLLECTIVE_TARGET,
                detail={"transfer_seconds": r["transfer_seconds"], "transfer_share": r["transfer_share"]},
            ),
            Figure(
                f"{task}: bytes sent per round per process",
                r["bytes_sent_per_round_per_rank"],
                "B",
                detail={"received": r["bytes_received_per_round_per_rank"]},
            ),
        ]
    method = __doc__.split("\n\n", 2)[2]
    return [Section("distributed", figures, method, params={"quick": quick, "results": results})]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distributed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results_distributed.json"))
    parser.add_argument("--worker", nargs=5, metavar=("TASK", "DEVICES", "THREADS", "ROUNDS", "OUT"))
    args = parser.parse_args(argv)
    if args.worker:
        task, devices, threads, rounds, out = args.worker
        worker(task, int(devices), int(threads), int(rounds), out)
        return
    info = machine_info()
    results = measure(args.quick)
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.distributed" + (" --quick" if args.quick else ""),
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| task | 1 proc x 1 thread | 1 proc x 2 threads | 2 procs x 1 thread | 2 / best 1 (target) | sync share "
        "| transfer share (target) | bytes sent / received per round per rank |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, r in results.items():
        s = r["round_seconds"]
        target = "-" if r["ratio_target"] is None else f"{r['ratio_target']:.2f}"
        lines.append(
            f"| {task} ({r['clients_per_round']} clients) | {s['1 process x 1 thread']:.3f} s "
            f"| {s['1 process x 2 threads']:.3f} s | {s['2 processes x 1 thread']:.3f} s "
            f"| {r['ratio_2_vs_1']:.2f} ({target}) | {100 * r['sync_share']:.1f} % "
            f"| {100 * r['transfer_share']:.2f} % ({100 * r['collective_target']:.0f} %) "
            f"| {r['bytes_sent_per_round_per_rank']:,} / {r['bytes_received_per_round_per_rank']:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
