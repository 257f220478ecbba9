"""Several local batches in one Lightning step (``federated.lightning_step``: ``client`` or ``round``).

Lightning's loop costs about a millisecond per training step (hook dispatch over every callback, the closure,
the logging bookkeeping), as long as a whole local step of the paper's small models. With
``lightning_step="client"`` the round loader serves each sampled client's batches as one item, a ``BatchRun``;
with ``"round"`` the whole round's. A run's last batch is trained by Lightning's own step, with everything its
loop does; the round loop trains the run's earlier batches just before (:func:`train_local_step`, switching
clients as it goes), with the calls Lightning's automatic optimization makes for a step: ``training_step``,
``optimizer.zero_grad()``, ``loss.backward()``, the module's ``on_before_optimizer_step`` (where FLoRAL
preconditions), ``optimizer.step()``. The rounds are the same, bit for bit, as one step per batch; Lightning's
per-step costs are paid once per client, or once per round.

What runs per local batch and what per Lightning step is listed in the README ("Several local batches in one
Lightning step"). The settings under which Lightning's step does more than those calls (gradient clipping,
mixed precision, hooks on backward or on the optimizer step, manual optimization) keep one step per batch:
:func:`batch_runs_reason` names the first one found.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer import call

__all__ = ["LIGHTNING_STEPS", "batch_runs_reason", "train_local_step"]

#: what one Lightning training step trains: one local batch (Lightning's own loop), a client's local batches,
#: or a whole round's
LIGHTNING_STEPS = ("batch", "client", "round")
#: LightningModule hooks that Lightning calls around a training step's backward and optimizer step;
#: a module that overrides one of them steps differently from :func:`train_local_step`
MODULE_STEP_HOOKS = (
    "backward",
    "on_before_backward",
    "on_after_backward",
    "on_before_zero_grad",
    "optimizer_zero_grad",
    "optimizer_step",
    "configure_gradient_clipping",
)
#: callback hooks Lightning calls inside a training step (the batch hooks run once per Lightning step instead)
CALLBACK_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_zero_grad", "on_before_optimizer_step")


def batch_runs_reason(trainer: L.Trainer, pl_module: L.LightningModule, loader: Any) -> str | None:
    """Why this fit cannot train several local batches per Lightning step, or ``None`` when it can. Each reason
    names the setting, hook or class that rules it out."""
    if not pl_module.automatic_optimization:
        return f"{type(pl_module).__name__} uses manual optimization"
    for hook in MODULE_STEP_HOOKS:
        if getattr(type(pl_module), hook) is not getattr(L.LightningModule, hook):
            return f"{type(pl_module).__name__} overrides {hook}, which Lightning calls at every local step"
    if len(trainer.optimizers) != 1:
        return f"{len(trainer.optimizers)} optimizers (Lightning steps each in turn)"
    if trainer.gradient_clip_val:
        return f"gradient_clip_val={trainer.gradient_clip_val} (Lightning clips at every local step)"
    if trainer.precision != "32-true":
        return f"precision={trainer.precision!r} (Lightning's precision plugin acts on every local step)"
    for callback in trainer.callbacks:
        hooks = [h for h in CALLBACK_STEP_HOOKS if getattr(type(callback), h) is not getattr(Callback, h)]
        if hooks:
            return f"callback {type(callback).__name__} runs {hooks} at every local step"
    if trainer.world_size > 1:
        return f"world_size={trainer.world_size}: several processes keep in step batch by batch (padding batches)"
    if not hasattr(loader, "batch_runs"):
        return f"the train loader is a {type(loader).__name__}, which cannot serve several batches as one item"
    return None


def train_local_step(trainer: L.Trainer, batch: Any, batch_idx: int) -> torch.Tensor | None:
    """Train one local batch as Lightning's automatic optimization steps a batch, and return its loss: the
    training step (its ``loss``, or ``None``: no backward and no optimizer step, as in Lightning), zero grad,
    backward, ``on_before_optimizer_step``, the optimizer step. ``batch_idx`` is Lightning's index of the step
    the batch is trained in.

    ``training_step`` is called the way Lightning's loop calls it (``_call_strategy_hook``: through the strategy,
    with the module's current hook named ``training_step``), so that what it logs is reduced with the logs of
    the steps Lightning runs itself.
    """
    pl_module, optimizer = trainer.lightning_module, trainer.optimizers[0]
    output = call._call_strategy_hook(trainer, "training_step", batch, batch_idx)
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if loss is not None:
        optimizer.zero_grad()
        loss.backward()
        pl_module.on_before_optimizer_step(optimizer)
        optimizer.step()
    return loss
