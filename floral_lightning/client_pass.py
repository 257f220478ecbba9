"""One Lightning step per client (``federated.client_passes``): a client's local batches inside one training step.

Lightning's loop costs about a millisecond per training step (hook dispatch over every callback, the closure,
the logging bookkeeping), as long as a whole local step of the paper's small models. With client passes the
round loader serves each sampled client's batches as one item, a ``ClientPass``: the client's last batch, which
Lightning's own step trains with everything its loop does, carrying the client's earlier batches, which the
round loop trains just before (:func:`train_earlier_batches`) with the calls Lightning's automatic optimization
makes for a step: ``training_step``, ``optimizer.zero_grad()``, ``loss.backward()``, the module's
``on_before_optimizer_step`` (where FLoRAL preconditions), ``optimizer.step()``. The rounds are the same, bit
for bit, as batch by batch; Lightning's per-step costs are paid once per client.

What runs per local batch and what per client is listed in the README ("One Lightning step per client"). The
settings under which Lightning's step does more than those calls (gradient clipping, mixed precision, hooks
on backward or on the optimizer step, manual optimization) keep the batch-by-batch loop:
:func:`client_pass_reason` names the first one found.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer import call

__all__ = ["client_pass_reason", "train_earlier_batches"]

#: LightningModule hooks that Lightning calls around a training step's backward and optimizer step;
#: a module that overrides one of them steps differently from :func:`train_earlier_batches`
MODULE_STEP_HOOKS = (
    "backward",
    "on_before_backward",
    "on_after_backward",
    "on_before_zero_grad",
    "optimizer_zero_grad",
    "optimizer_step",
    "configure_gradient_clipping",
)
#: callback hooks Lightning calls inside a training step (the batch hooks run once per client step instead)
CALLBACK_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_zero_grad", "on_before_optimizer_step")


def client_pass_reason(trainer: L.Trainer, pl_module: L.LightningModule, loader: Any) -> str | None:
    """Why this fit's clients cannot train one Lightning step each, or ``None`` when they can. Each reason names
    the setting, hook or class that rules it out."""
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
    if not hasattr(loader, "client_passes"):
        return f"the train loader is a {type(loader).__name__}, which cannot serve a client's batches as one item"
    return None


def train_earlier_batches(
    trainer: L.Trainer, batches: list[Any], batch_idx: int, after_step: Callable[[torch.Tensor | None], None]
) -> None:
    """Train ``batches`` one local step each, as Lightning's automatic optimization steps a batch: the training
    step (its ``loss``, or ``None``: no backward and no optimizer step, as in Lightning), zero grad, backward,
    ``on_before_optimizer_step``, the optimizer step; then ``after_step(loss)``. Every batch is given Lightning's
    ``batch_idx`` of the client's step.

    ``training_step`` is called the way Lightning's loop calls it (``_call_strategy_hook``: through the strategy,
    with the module's current hook named ``training_step``), so that what it logs is reduced with the logs of
    the steps Lightning runs itself.
    """
    pl_module, optimizer = trainer.lightning_module, trainer.optimizers[0]
    for batch in batches:
        output = call._call_strategy_hook(trainer, "training_step", batch, batch_idx)
        loss = output.get("loss") if isinstance(output, Mapping) else output
        if loss is not None:
            optimizer.zero_grad()
            loss.backward()
            pl_module.on_before_optimizer_step(optimizer)
            optimizer.step()
        after_step(loss)
