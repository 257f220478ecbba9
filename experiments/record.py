"""A run's own record, and whether it is a finished result.

What the runner reads is what the run wrote for itself: the CSV logger's ``metrics.csv`` (every value the run
logged, with the round as its ``step``: ``callbacks.RunReport`` logs it so) and its newest ``last.ckpt``. A run
resumed after a stop writes a new ``csv/version_N``; the versions are read in order and a later one's value of a
round replaces an earlier one's (the rounds after the last checkpoint are run again when resuming).

A cell counts only if its record shows it finished (:func:`judge`): the last round logged and the newest
checkpoint's round are the requested rounds, the requested round is evaluated, and the metric is finite.
"""

from __future__ import annotations

import csv
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

CSV_DIR = "csv"  # the CSV logger's name in the cell's command (experiments.cells.LOGGERS)


@dataclass
class RunRecord:
    """What a run's files say about it."""

    #: every logged value by name, as {round: value}; later versions replace earlier ones round by round
    metrics: dict[str, dict[int, float]] = field(default_factory=dict)
    #: the round of the newest last.ckpt (None: no checkpoint)
    checkpoint_round: int | None = None
    checkpoint: Path | None = None

    @property
    def last_round(self) -> int:
        """The last completed round logged (the round loop logs ``round/clients`` at the end of every round)."""
        return max(self.metrics.get("round/clients", {}), default=0)

    @property
    def metric(self) -> str:
        """The headline metric's name: ``acc`` for classification, ``mse`` for regression."""
        return "acc" if "val/acc" in self.metrics else "mse"

    def history(self, tag: str) -> list[tuple[int, float]]:
        """The (round, value) pairs of ``tag``, by round."""
        return sorted(self.metrics.get(tag, {}).items())


def _version(path: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", path.parent.name)
    return int(match.group(1)) if match else -1


def read_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every numeric value in the run's ``csv/version_*/metrics.csv`` files as {name: {round: value}}."""
    metrics: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob(f"{CSV_DIR}/version_*/metrics.csv"), key=_version):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                step = row.pop("step", "")
                row.pop("epoch", None)
                if not step:
                    continue
                for name, value in row.items():
                    if value not in ("", None):
                        metrics.setdefault(name, {})[int(float(step))] = float(value)
    return metrics


def checkpoint_round(path: Path) -> int | None:
    """The completed rounds stored in a checkpoint (the round loop's state), or None if it has none."""
    import floral_lightning.module  # noqa: F401  (registers the option classes a checkpoint holds as safe to load)
    from callbacks.mixture_checkpoint import checkpoint_round as round_of

    return round_of(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def read_record(run_dir: Path) -> RunRecord:
    """The record of the run in ``run_dir`` (empty if it never logged)."""
    from floral_lightning.cli import find_last_checkpoint

    record = RunRecord(metrics=read_metrics(run_dir))
    record.checkpoint = find_last_checkpoint(run_dir)
    if record.checkpoint is not None:
        record.checkpoint_round = checkpoint_round(record.checkpoint)
    return record


def judge(record: RunRecord, rounds: int) -> str | None:
    """Why the run is not a finished ``rounds``-round result, or None if it is."""
    if not record.metrics:
        return "no metrics.csv: the run logged nothing"
    if record.last_round != rounds:
        return f"stopped at round {record.last_round} of {rounds}"
    if record.checkpoint_round != rounds:
        where = "no last.ckpt" if record.checkpoint is None else f"its last.ckpt is of round {record.checkpoint_round}"
        return f"logged {rounds} rounds but {where}"
    history = record.history(f"val/{record.metric}")
    if not history or history[-1][0] != rounds:
        return f"no evaluation of val/{record.metric} at round {rounds}"
    value = summarise(record, rounds)["value"]
    if not math.isfinite(value):
        return f"val/{record.metric} over the last 1 % of rounds is {value}"
    return None


def summarise(record: RunRecord, rounds: int) -> dict[str, float | str]:
    """The cell's values: each the mean of the evaluations in the last 1 % of rounds (at least the last one),
    as in the paper."""
    window = max(1, math.ceil(0.01 * rounds))

    def tail_mean(tag: str) -> float:
        points = [v for r, v in record.history(tag) if r > rounds - window]
        return statistics.fmean(points) if points else float("nan")

    metric = record.metric
    return {
        "metric": metric,
        "value": tail_mean(f"val/{metric}"),
        "value_unweighted": tail_mean(f"val/{metric}_unweighted"),
        "value_worst": tail_mean(f"val/{metric}_worst"),
        "routing_ari": tail_mean("val/routing_ari"),
    }
