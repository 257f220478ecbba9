"""Shared pieces of the benchmark suite: reported figures, interleaved timing, quiet Lightning, the machine."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Figure:
    """One reported number.

    ``ratio`` is the figure divided by its reference (the base model, the hand-written floor, ...) and
    ``target`` the largest acceptable ratio; a figure without a target is context, not a requirement.
    """

    name: str
    value: float
    unit: str
    ratio: float | None = None
    target: float | None = None
    command: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        """Whether ``ratio <= target``; ``None`` when the figure has no target."""
        if self.target is None or self.ratio is None:
            return None
        return bool(self.ratio <= self.target)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "ratio": self.ratio,
            "target": self.target,
            "met": self.met,
            "command": self.command,
            "detail": self.detail,
        }


@dataclass
class Section:
    """The figures of one benchmark section, how they were measured, and the sizes used."""

    name: str
    figures: list[Figure]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "params": self.params,
            "seconds": round(self.seconds, 2),
            "figures": [f.as_dict() for f in self.figures],
        }


@dataclass
class Samples:
    """Per-call seconds of one variant: wall clock (``time.perf_counter``) and process CPU time
    (``time.process_time``, all threads; with one torch thread it is barely disturbed by other processes)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def interleaved_times(
    variants: dict[str, Callable[[], object]], repeats: int, calls: int = 1, warmup: int = 1
) -> dict[str, Samples]:
    """Seconds per call of every variant, measured in ``repeats`` rounds.

    Each round times every variant for ``calls`` consecutive calls; the order rotates from round to round so
    that slow drifts of the machine's load (other processes) hit all variants alike and no variant always
    runs first. ``warmup`` untimed calls per variant come first (lazy allocations, kernel selection).
    """
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    samples = {name: Samples() for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            fn = variants[name]
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                fn()
            samples[name].wall.append((time.perf_counter() - wall) / calls)
            samples[name].cpu.append((time.process_time() - cpu) / calls)
    return samples


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """Median, min, max and the number of samples (scaled, e.g. to milliseconds), for the JSON."""
    return {
        "median": round(median(values) * scale, 4),
        "min": round(min(values) * scale, 4),
        "max": round(max(values) * scale, 4),
        "samples": len(values),
    }


def rotated(items: Sequence[Any], shift: int) -> list[Any]:
    """``items`` rotated left by ``shift`` (the run order of one interleaving block)."""
    shift %= max(len(items), 1)
    return list(items[shift:]) + list(items[:shift])


def quiet_lightning() -> None:
    """Silence Lightning's start-up banners and advice warnings (e.g. "few workers"): they are printed on
    every ``fit`` and would drown the tables; they do not change what is measured."""
    import lightning.pytorch  # noqa: F401  (its import sets its logger to INFO: set levels after it)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(num_workers|log_every_n_steps|does not have many workers).*")


def machine_info() -> dict[str, Any]:
    """What the timings were taken on, including the load from other processes when the run started."""
    import lightning

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_num_threads": torch.get_num_threads(),
    }
    cpu_model = _cpu_model()
    if cpu_model:
        info["cpu_model"] = cpu_model
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def bench_command(section: str, quick: bool) -> str:
    """The command that reproduces one section's figures."""
    return f"python -m bench --only {section}" + (" --quick" if quick else "")
