"""Symmetry breakers for the learned router (issue 12): opt-in callbacks, beyond the paper.

With the second factor of every adaptor at zero (the paper's initialisation) all C adaptors of a layer are
identical at round 0, so the loss does not depend on the mixture and the gradient with respect to the router
logits is exactly zero; only the router's training noise separates the adaptors, slowly (see
``callbacks.RouterDiagnostics`` and ``bench/router_diagnostics.py``). Two ways out:

* ``ClusteredRouterInit`` starts the logits from a clustering of the clients' first updates (the direction of
  each client's update of the shared weights from the initial global model after a few full-batch gradient
  steps, grouped by cosine similarity with spherical k-means, as IFCA/CFL group clients). Adaptor c is then
  averaged mostly over the clients of group c, so the adaptors separate from the first round. The model at
  step 0 is unchanged.
  Optionally it re-assigns every client to its lowest-loss adaptor every N rounds (IFCA's assignment step).
* ``AdaptorInitNoise`` draws every adaptor's zero factor from ``N(0, std^2)``, distinct per adaptor, so the
  router gradient is non-zero from the first step. The model at step 0 no longer equals the base model.

Both run only when a fit starts from scratch: a resumed fit takes its logits and weights from the checkpoint.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from floral_lightning.router_init import (
    LOCAL_STEPS,
    LOGIT,
    RESTARTS,
    client_gradients,
    clustered_start,
    lowest_loss_adaptor,
    set_assigned_logits,
    spherical_kmeans,
)
from floral_lightning.seeding import Stream, run_seed, seeded_generator

__all__ = ["AdaptorInitNoise", "ClusteredRouterInit", "client_gradients", "lowest_loss_adaptor", "spherical_kmeans"]


def _router(pl_module: L.LightningModule, who: str):
    """The module's router, refusing FedAvg (no router) and the oracle (fixed logits) by name."""
    router = getattr(getattr(pl_module, "model", None), "router", None)
    if router is None:
        raise ValueError(f"{who} needs a FLoRAL model with a router (num_adaptors >= 1); this model has none")
    options = getattr(pl_module, "router_options", None)
    if router.frozen or getattr(options, "oracle", False):
        raise ValueError(f"{who} with router.oracle=true: the oracle fixes the logits; use one or the other")
    return router


class ClusteredRouterInit(Callback):
    """Start every client's router logits from a clustering of the clients' first updates (opt-in).

    When a fit starts from scratch, every client's update of the shared weights from the initial global model
    (``client_gradients``: ``local_steps`` full-batch gradient steps at the client learning rate) is grouped by
    cosine similarity into C groups (``spherical_kmeans``, seeded from ``Stream.ROUTER_INIT``); client k in
    group g gets logits ``logit`` at adaptor g and 0 elsewhere. The router keeps learning from there. This
    costs ``local_steps`` passes over every client's train data before round 0, and it asks every client once
    (not only the sampled ones) — unlike the paper's protocol, where a client contributes only when sampled.

    Args:
        logit: the assigned adaptor's logit (the others 0); 3 gives ``softmax`` weight 0.87 with C = 4.
        local_steps: full-batch gradient steps (at the client optimizer's ``lr``) whose summed gradients are a
            client's update; 1 is the gradient at the initial model. A few local steps separate clusters whose
            first gradients still point alike: on synthetic_mlp seed 1 one step groups the clients with ARI 0.49,
            20 steps with ARI 1.0 (``bench/router_diagnostics.py``).
        restarts: k-means++ restarts (the best total cosine wins).
        reassign_every: if > 0, at the start of every round that is a multiple of it (round 0 excepted), every
            client is re-assigned to the adaptor with its lowest train loss under a one-adaptor mixture
            (IFCA's step), logits ``logit`` there and 0 elsewhere. 0: never.
        seed: the clustering's seed (``None``: the run's ``seed_everything``).
    """

    def __init__(
        self,
        logit: float = LOGIT,
        local_steps: int = LOCAL_STEPS,
        restarts: int = RESTARTS,
        reassign_every: int = 0,
        seed: int | None = None,
    ) -> None:
        if not logit > 0:
            raise ValueError(f"logit={logit}: must be > 0 (the assigned adaptor's logit, the others are 0)")
        if local_steps < 1:
            raise ValueError(f"local_steps={local_steps}: must be >= 1 (1: the gradient at the initial model)")
        if restarts < 1:
            raise ValueError(f"restarts={restarts}: must be >= 1")
        if reassign_every < 0:
            raise ValueError(f"reassign_every={reassign_every}: must be >= 0 (0: never)")
        self.logit = float(logit)
        self.local_steps = local_steps
        self.restarts = restarts
        self.reassign_every = reassign_every
        self.seed = run_seed(seed)
        #: the groups of the initial clustering [K] (``None`` until a fit started from scratch)
        self.assignment: torch.Tensor | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _router(pl_module, "ClusteredRouterInit")  # refuses a model without a learned router
        if trainer.ckpt_path is not None:  # resumed: the logits come from the checkpoint
            return
        # The logits are private (never part of the global state), so they may be set after the round loop
        # has taken its copy of the global weights.
        self.assignment = clustered_start(
            pl_module, trainer.datamodule, self.seed, self.logit, self.local_steps, self.restarts
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        round_idx = trainer.current_epoch
        if self.reassign_every <= 0 or round_idx == 0 or round_idx % self.reassign_every:
            return
        router = pl_module.model.router
        set_assigned_logits(router, lowest_loss_adaptor(pl_module, trainer.datamodule), self.logit)


class AdaptorInitNoise(Callback):
    """Draw every adaptor's zero-initialised second factor from ``N(0, std^2)``, distinct per adaptor (opt-in).

    With the paper's ``*_in`` initialisation the factor is ``adaptor_B`` (``*_out``: ``adaptor_A``); the draw
    comes from ``Stream.ROUTER_INIT`` so a seed gives the same model. Consequence, stated: the model at step 0
    is no longer the base model (each client's network differs from it by its mixture of the drawn adaptors).
    Runs in ``setup``, before the round loop copies the global weights, and only when a fit starts from
    scratch.

    Args:
        std: standard deviation of the draw (> 0).
        seed: the draw's seed (``None``: the run's ``seed_everything``).
    """

    def __init__(self, std: float = 0.01, seed: int | None = None) -> None:
        if not std > 0:
            raise ValueError(f"std={std}: must be > 0")
        self.std = float(std)
        self.seed = run_seed(seed)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.ckpt_path is not None:
            return
        _router(pl_module, "AdaptorInitNoise")
        generator = seeded_generator(self.seed, Stream.ROUTER_INIT, 1)
        with torch.no_grad():
            for _, layer in sorted(pl_module.model.floral_layers().items()):
                for name in ("adaptor_B", "adaptor_A"):
                    factor = getattr(layer, name, None)
                    if factor is not None and not bool(factor.any()):  # the zero factor of the pair
                        draw = torch.randn(factor.shape, generator=generator, dtype=factor.dtype)
                        factor.copy_(draw.to(factor.device) * self.std)
                        break
