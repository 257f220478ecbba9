"""Tasks: what a model's outputs are scored by — the training loss and the per-sample evaluation metrics.

A task is an object that any method (``FloralModule`` and every baseline in ``methods``) takes as its ``task``
option, so a method is written once for all tasks: ``--model.init_args.task=regression`` turns any method into
its regression variant. Register a new task under a name with ``register_task``, or subclass ``FloralModule``
and override ``compute_loss`` / ``compute_metrics`` for a one-off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["TASKS", "Classification", "Regression", "Task", "get_task", "register_task"]


class Task:
    """The loss a client trains on and the per-sample scores evaluation averages per client."""

    #: metric names where larger is better (decides the "worst client")
    higher_is_better: frozenset[str] = frozenset()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample scores ``{name: Tensor[B]}``."""
        raise NotImplementedError


class Classification(Task):
    """Cross-entropy; accuracy and loss per sample."""

    higher_is_better = frozenset({"acc"})

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "acc": (outputs.argmax(-1) == targets).float(),
            "loss": F.cross_entropy(outputs, targets, reduction="none"),
        }


class Regression(Task):
    """Mean squared error (the synthetic tasks); per-sample MSE."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"mse": (outputs - targets).pow(2).flatten(1).mean(1)}


TASKS: dict[str, Task] = {"classification": Classification(), "regression": Regression()}


def register_task(name: str, task: Task) -> None:
    """Make ``task`` available as ``task=name`` (e.g. ``--model.init_args.task=name``)."""
    if not isinstance(task, Task):
        raise TypeError(f"register_task({name!r}, ...): expected a Task instance, got {type(task).__name__}")
    TASKS[name] = task


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"task={name!r}: expected one of {sorted(TASKS)} (or register_task a new one)")
    return TASKS[name]


def __getattr__(name: str):
    # ``floral_lightning.tasks.RegressionModule`` is where configs have always found the regression module; it
    # is defined beside FloralModule (which imports this file), so it is looked up lazily
    if name == "RegressionModule":
        from .module import RegressionModule

        return RegressionModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
