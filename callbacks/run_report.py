"""``RunReport``: what a federated run shows a person, in every logger, with the round as the x-axis.

``FloralModule`` logs its summaries with ``self.log`` and hands each whole evaluation over as
``last_evaluation``; this callback adds:

- the round as the step of every epoch-level value (``val/*``, ``train/*``, ``round/*``): it logs Lightning's
  ``step`` key, which Lightning's logger connector uses as the loggers' step (see ``log_metrics`` there), at
  the end of every round and every evaluation;
- ``hp_metric`` = the last evaluation's headline metric (personalised accuracy, or MSE for regression) and
  the best evaluation so far (``*_best``, ``*_best_round``);
- HPARAMS with the run's options (the CLI passes its model, data and federated options) and the metrics;
- TensorBoard: a custom-scalars layout (accuracy mean / unweighted / worst first, then per cluster, then
  routing), the mixtures figure, per-client histograms, the parameter-overhead table as text;
- every logger's run directory: ``mixtures/<split>_round<R>.png``, ``clients_<split>.csv`` (one row per client
  per evaluation) and ``overhead.md``, so CSVLogger (or any logger without images) gets them too;
- with the progress bar off, one console line per evaluation.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import tempfile
import time
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.tensorboard.summary import hparams

from floral_lightning.figures import mixtures_figure, render_figure
from floral_lightning.module import Evaluation

from .federated import FederatedCallback

UMASK = os.umask(0o022)  # read the process's umask (setting it is the only way), then put it back
os.umask(UMASK)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp's file is private (0600); give it a normal file's permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def flatten_options(options: Any, prefix: str = "") -> dict[str, Any]:
    """Nested options (dicts, dataclasses) as one flat ``{"a.b.c": value}`` dict of HPARAMS-friendly values:
    numbers, strings and bools stay, ``None`` and lists become strings."""
    if is_dataclass(options) and not isinstance(options, type):
        options = asdict(options)
    if isinstance(options, dict):
        flat: dict[str, Any] = {}
        for key, value in options.items():
            flat.update(flatten_options(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    if isinstance(options, (bool, int, float, str)):
        return {prefix: options}
    return {prefix: str(options)}


def exact(tag: str) -> str:
    """A custom-scalars pattern matching ``tag`` alone (TensorBoard searches with the pattern as a regex)."""
    return f"^{re.escape(tag)}$"


def custom_scalars_layout(scalars: dict[str, float], headline: str) -> dict[str, dict[str, list]]:
    """TensorBoard's custom-scalars layout for one split: the headline metric's mean / unweighted / worst client
    first, then its per-cluster curves, then routing ARI and router entropy. Only tags in ``scalars`` appear."""
    split = headline.split("/")[0]
    summary = [t for t in (headline, f"{headline}_unweighted", f"{headline}_worst") if t in scalars]
    clusters = sorted(
        (t for t in scalars if re.fullmatch(re.escape(headline) + r"_cluster\d+", t)),
        key=lambda t: int(t.rsplit("cluster", 1)[1]),
    )
    routing = [t for t in (f"{split}/routing_ari", f"{split}/router_entropy") if t in scalars]
    charts = {
        f"{headline}: mean, unweighted, worst client": summary,
        f"{headline} per true cluster": clusters,
        "routing: ARI (1 = clusters recovered), router entropy": routing,
    }
    return {
        f"FLoRAL {split}": {title: ["Multiline", [exact(t) for t in tags]] for title, tags in charts.items() if tags}
    }


def completed_rounds(trainer: L.Trainer) -> int:
    """Rounds completed so far: the round loop's count (restored with checkpoints), else the epochs."""
    loop = next((cb for cb in trainer.callbacks if isinstance(cb, FederatedCallback)), None)
    if loop is not None:
        return loop.round
    return trainer.current_epoch + (1 if trainer.state.fn == "fit" else 0)


class RunReport(Callback):
    """Logs a federated run for people (see the module docstring); the CLI adds it to every run.

    Args:
        figure_max_clients: above this many clients the mixtures figure draws a sample of each cluster.
        figure_every_n_rounds: draw the mixtures figure only at evaluations after a multiple of this many rounds,
            and at the last round of a fit and every test (``None``: at every evaluation). A draw costs about
            half a second, so a long run evaluated often spends a tenth of its time drawing otherwise.
    """

    def __init__(self, figure_max_clients: int = 400, figure_every_n_rounds: int | None = None) -> None:
        if figure_max_clients < 1:
            raise ValueError(f"figure_max_clients={figure_max_clients}: must be >= 1")
        if figure_every_n_rounds is not None and figure_every_n_rounds < 1:
            raise ValueError(
                f"figure_every_n_rounds={figure_every_n_rounds}: must be >= 1, or None for every evaluation"
            )
        self.figure_max_clients = figure_max_clients
        self.figure_every_n_rounds = figure_every_n_rounds
        #: the run's options for HPARAMS as a flat dict; the CLI sets the model, data and federated options
        #: as configured, and ``None`` logs the module's own hyperparameters
        self.hyperparameters: dict[str, Any] | None = None
        #: best headline value so far and its round, per headline tag (``{"val/acc": (0.93, 120)}``)
        self.best: dict[str, tuple[float, int]] = {}
        self._reported: object | None = None  # the evaluation logged last (each is logged once)
        self._started: set[int] = set()  # loggers (by id) that have the overhead table (and non-TB: hparams)
        self._evaluated: set[int] = set()  # TensorBoard loggers (by id) that have the layout and HPARAMS
        self._clock: tuple[float, int] | None = None  # (time, round) of the previous report, for s/round

    # --- where things go ---------------------------------------------------------------------------------
    @staticmethod
    def run_dirs(trainer: L.Trainer) -> list[Path]:
        """Every logger's run directory (once each); none without loggers."""
        dirs = [getattr(logger, "log_dir", None) or trainer.log_dir for logger in trainer.loggers]
        return [Path(d) for d in dict.fromkeys(d for d in dirs if d)]

    def _params(self, pl_module: L.LightningModule) -> dict[str, Any]:
        if self.hyperparameters is not None:
            return dict(self.hyperparameters)
        options = {k: v for k, v in pl_module.hparams_initial.items() if not k.startswith("_")}
        return flatten_options(options, "model")

    # --- Lightning hooks ---------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._clock = None
        # Lightning advises a lower log_every_n_steps when a round has fewer batches; it does not apply here:
        # nothing is logged per step, every value is an epoch-level one, logged once per round or evaluation.
        warnings.filterwarnings(
            "ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval"
        )

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._clock = (time.perf_counter(), completed_rounds(trainer))
        self._start_loggers(trainer, pl_module)

    @rank_zero_only
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_loggers(trainer, pl_module)

    @rank_zero_only
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_loggers(trainer, pl_module)

    def _start_loggers(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Once per logger: the overhead table, and the hyperparameters for loggers other than TensorBoard
        (TensorBoard gets them at the first evaluation, with the metrics its HPARAMS tab compares)."""
        model = getattr(pl_module, "model", None)
        # the table of what personalisation adds: for models with client mixtures (FedAvg has nothing to add)
        table = model.overhead().as_markdown() if getattr(model, "router", None) is not None else None
        for logger in trainer.loggers:
            if id(logger) in self._started:
                continue
            self._started.add(id(logger))
            if not isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(self._params(pl_module))
            elif table is not None:
                logger.experiment.add_text("model/overhead", table, global_step=0)
        if table is not None:
            for run_dir in self.run_dirs(trainer):
                write_bytes_atomic((table + "\n").encode(), run_dir / "overhead.md")

    # The ``step`` key: Lightning logs the epoch's values with it as the step and drops it from what it writes.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("step", float(completed_rounds(trainer)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("step", float(completed_rounds(trainer)))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.log("step", float(completed_rounds(trainer)))

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report_evaluation(trainer, pl_module)

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report_evaluation(trainer, pl_module)

    # --- one evaluation ----------------------------------------------------------------------------------
    def _report_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluation = getattr(pl_module, "last_evaluation", None)
        if evaluation is None or evaluation is self._reported or trainer.sanity_checking:
            return
        self._reported = evaluation
        round_idx = completed_rounds(trainer)
        scalars = evaluation.scalars
        headline = evaluation.headline
        value = scalars.get(headline, math.nan)
        best = self.update_best(headline, value, round_idx, evaluation.higher_is_better)
        extras = {f"{headline}_best": best[0], f"{headline}_best_round": float(best[1]), "hp_metric": value}

        pixels = png = None
        if evaluation.mixtures is not None and self._draws_figure(trainer, round_idx):
            ari = scalars.get(f"{evaluation.split}/routing_ari")
            title = f"{evaluation.split} mixtures  —  round {round_idx}"
            title += f"  —  routing ARI {ari:.3f}" if ari is not None else "  —  true clusters unknown"
            figure = mixtures_figure(
                evaluation.mixtures, evaluation.clusters, title=title, max_clients=self.figure_max_clients
            )
            pixels, png = render_figure(figure)  # drawn once, for TensorBoard and for the run directory

        for logger in trainer.loggers:
            logger.log_metrics(extras, step=round_idx)
            if isinstance(logger, TensorBoardLogger):
                self._tensorboard_evaluation(logger, pl_module, evaluation, {**scalars, **extras}, round_idx, pixels)
            logger.save()

        rows = self._client_rows(evaluation, round_idx)
        for run_dir in self.run_dirs(trainer):
            if png is not None:
                write_bytes_atomic(png, run_dir / "mixtures" / f"{evaluation.split}_round{round_idx:05d}.png")
            self._append_csv(run_dir / f"clients_{evaluation.split}.csv", rows)

        if trainer.progress_bar_callback is None:
            rank_zero_info(self._console_line(trainer, evaluation.split, scalars, headline, round_idx))

    def _draws_figure(self, trainer: L.Trainer, round_idx: int) -> bool:
        """Whether this evaluation draws the mixtures figure: never without a logger (nothing would get it), else
        at every evaluation or as ``figure_every_n_rounds`` says."""
        if not trainer.loggers:
            return False
        every = self.figure_every_n_rounds
        last = trainer.state.fn != "fit" or (trainer.max_epochs is not None and round_idx >= trainer.max_epochs)
        return every is None or round_idx % every == 0 or last

    def _tensorboard_evaluation(
        self,
        logger: TensorBoardLogger,
        pl_module: L.LightningModule,
        evaluation: Evaluation,
        scalars: dict[str, float],
        round_idx: int,
        pixels: np.ndarray | None,
    ) -> None:
        """The layout and HPARAMS (once per logger), the per-client histograms and the mixtures figure."""
        writer = logger.experiment
        if id(logger) not in self._evaluated:
            self._evaluated.add(id(logger))
            writer.add_custom_scalars(custom_scalars_layout(scalars, evaluation.headline))
            # HPARAMS: the options, and these metrics as its columns (their values are the scalars already
            # logged: the tab shows each one's latest). Written directly rather than with log_hyperparams,
            # which would log the metrics a second time at the same step.
            params = self._params(pl_module)
            for summary in hparams(params, scalars):
                writer.file_writer.add_summary(summary, round_idx)
            write_bytes_atomic(yaml.safe_dump(params).encode(), Path(logger.log_dir) / "hparams.yaml")
        for name, means in evaluation.per_client.items():
            seen = means[(evaluation.counts > 0) & torch.isfinite(means)]  # a diverged client's inf/NaN is left out
            if len(seen):
                # numpy's bins: TensorBoard's default ones stop at 1e20, and a diverging client's loss goes past it
                writer.add_histogram(f"{evaluation.split}/{name}_clients", seen, global_step=round_idx, bins="auto")
        if pixels is not None:
            writer.add_image(f"{evaluation.split}/mixtures", pixels, global_step=round_idx, dataformats="HWC")

    def update_best(self, tag: str, value: float, round_idx: int, higher_is_better: bool) -> tuple[float, int]:
        """Record ``value`` of ``tag`` at ``round_idx``; return the best (value, round) so far (ties keep the
        earlier round; a NaN best is replaced by any value)."""
        best = self.best.get(tag)
        if best is None or math.isnan(best[0]) or (value > best[0] if higher_is_better else value < best[0]):
            self.best[tag] = best = (value, round_idx)
        return best

    @staticmethod
    def _client_rows(evaluation: Evaluation, round_idx: int) -> list[dict[str, Any]]:
        """One row per client: its metrics, samples, true cluster, argmax adaptor and mixture."""
        rows = []
        mixtures = evaluation.mixtures
        for k in range(len(evaluation.counts)):
            row: dict[str, Any] = {
                "round": round_idx,
                "client": k,
                "cluster": "" if evaluation.clusters is None else int(evaluation.clusters[k]),
                "samples": int(evaluation.counts[k]),
            }
            row |= {name: float(means[k]) for name, means in evaluation.per_client.items()}
            if mixtures is not None:
                row["adaptor"] = "" if torch.isnan(mixtures[k]).any() else int(mixtures[k].argmax())
                row |= {f"mixture_{c}": float(w) for c, w in enumerate(mixtures[k])}
            rows.append(row)
        return rows

    @staticmethod
    def _append_csv(path: Path, rows: list[dict[str, Any]]) -> None:
        """Append rows to a CSV, rewriting it atomically (a reader never sees a half-written row)."""
        previous = path.read_text() if path.exists() else ""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        if not previous:
            writer.writeheader()
        writer.writerows(rows)
        write_bytes_atomic((previous + buffer.getvalue()).encode(), path)

    def _console_line(
        self, trainer: L.Trainer, split: str, scalars: dict[str, float], headline: str, round_idx: int
    ) -> str:
        fitting = trainer.state.fn == "fit" and trainer.max_epochs
        parts = [f"round {round_idx}/{trainer.max_epochs}" if fitting else f"{split} after round {round_idx}"]
        parts.append(f"{headline} {scalars.get(headline, math.nan):.4f}")
        if f"{headline}_worst" in scalars:
            parts.append(f"worst client {scalars[f'{headline}_worst']:.4f}")
        if f"{split}/routing_ari" in scalars:
            parts.append(f"routing ARI {scalars[f'{split}/routing_ari']:.3f}")
        now = time.perf_counter()
        if self._clock is not None and round_idx > self._clock[1]:
            parts.append(f"{(now - self._clock[0]) / (round_idx - self._clock[1]):.2f} s/round")
        self._clock = (now, round_idx)
        return " | ".join(parts)

    # --- checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"best": {tag: list(best) for tag, best in self.best.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = {tag: (float(value), int(round_idx)) for tag, (value, round_idx) in state_dict["best"].items()}
