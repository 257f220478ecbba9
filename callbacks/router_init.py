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

from floral_lightning.data.federated import BatchPrep
from floral_lightning.seeding import Stream, run_seed, seeded_generator

__all__ = ["AdaptorInitNoise", "ClusteredRouterInit", "client_gradients", "spherical_kmeans"]


def _router(pl_module: L.LightningModule, who: str):
    """The module's router, refusing FedAvg (no router) and the oracle (fixed logits) by name."""
    router = getattr(getattr(pl_module, "model", None), "router", None)
    if router is None:
        raise ValueError(f"{who} needs a FLoRAL model with a router (num_adaptors >= 1); this model has none")
    options = getattr(pl_module, "router_options", None)
    if router.frozen or getattr(options, "oracle", False):
        raise ValueError(f"{who} with router.oracle=true: the oracle fixes the logits; use one or the other")
    return router


def _client_batches(datamodule, client_id: int, chunk: int = 4096):
    """Client ``client_id``'s train data as model inputs (normalised, no augmentation), in chunks."""
    x, y = datamodule.client_split(client_id, "train")
    prep = BatchPrep(datamodule.mean, datamodule.std)
    for start in range(0, len(y), chunk):
        yield prep(x[start : start + chunk]), y[start : start + chunk]


def client_gradients(
    pl_module: L.LightningModule, datamodule, client_ids: list[int], local_steps: int = 1, lr: float | None = None
) -> torch.Tensor:
    """Each client's update direction from the module's current weights, one flattened row per client
    [len(client_ids), D] over the shared (base) weights: the sum of the full-batch gradients of its mean training
    loss along ``local_steps`` full-batch gradient steps of size ``lr`` on those weights.

    With ``local_steps=1`` this is the gradient at the current weights: the direction of a client's first SGD
    step (up to sign and lr). With more steps it is ``(w_0 - w_T) / lr``, the client's whole local update, which
    separates clients whose first gradients still point alike (a ReLU network at its random initialisation).
    Evaluated in eval mode (no router noise, no dropout); the shared weights are restored afterwards. The
    adaptors do not enter it: with the paper's zero second factor they contribute nothing to the output.
    """
    if local_steps < 1:
        raise ValueError(f"local_steps={local_steps}: must be >= 1")
    if local_steps > 1 and not (lr is not None and lr > 0):
        raise ValueError(f"lr={lr}: local_steps={local_steps} needs the step size, a learning rate > 0")
    params = [p for p in pl_module.model.shared_parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    was_training = pl_module.training
    pl_module.eval()
    rows = []
    try:
        for k in client_ids:
            update = [torch.zeros_like(p) for p in params]
            for step in range(local_steps):
                grads = _full_batch_gradient(pl_module, datamodule, k, params)
                for u, g in zip(update, grads, strict=True):
                    u.add_(g)
                if step + 1 < local_steps:
                    with torch.no_grad():
                        for p, g in zip(params, grads, strict=True):
                            p.sub_(g, alpha=lr)
            with torch.no_grad():
                for p, s in zip(params, start, strict=True):
                    p.copy_(s)
            rows.append(torch.cat([u.flatten() for u in update]))
    finally:
        with torch.no_grad():
            for p, s in zip(params, start, strict=True):
                p.copy_(s)
        pl_module.train(was_training)
    return torch.stack(rows).cpu()


def _full_batch_gradient(pl_module, datamodule, client_id: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient of client ``client_id``'s mean training loss over all its samples w.r.t. ``params``."""
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in _client_batches(datamodule, client_id):
        x, y = x.to(pl_module.device), y.to(pl_module.device)
        loss = pl_module.compute_loss(pl_module(x, client_id), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for t, g in zip(total, grads, strict=True):
            if g is not None:
                t.add_(g, alpha=len(y))  # the mean over all the client's samples, chunk by chunk
        count += len(y)
    return [t / max(count, 1) for t in total]


def spherical_kmeans(
    vectors: torch.Tensor, k: int, generator: torch.Generator, restarts: int = 10, max_iter: int = 100
) -> torch.Tensor:
    """Group the rows of ``vectors`` [N, D] into ``k`` groups by cosine similarity; the labels [N] (0..k-1).

    Spherical k-means: rows and centres on the unit sphere, each row assigned to the centre of highest
    cosine, each centre the normalised mean of its rows. k-means++ seeding (distance ``1 - cos``) from
    ``generator``; of ``restarts`` runs the one with the highest total cosine to its centres wins, so the
    result is a pure function of the rows and the generator's seed.
    """
    if vectors.ndim != 2 or len(vectors) == 0:
        raise ValueError(f"vectors of shape {tuple(vectors.shape)}: expected [N >= 1, D]")
    if not 1 <= k <= len(vectors):
        raise ValueError(f"k={k}: must lie in [1, number of rows={len(vectors)}]")
    if restarts < 1 or max_iter < 1:
        raise ValueError(f"restarts={restarts}, max_iter={max_iter}: both must be >= 1")
    v = torch.nn.functional.normalize(vectors.double(), dim=1)
    best_labels, best_score = None, -float("inf")
    for _ in range(restarts):
        centres = v[torch.randint(len(v), (1,), generator=generator)]
        while len(centres) < k:
            distance = (1.0 - v @ centres.T).clamp_min(0.0).min(dim=1).values
            if float(distance.sum()) <= 0.0:  # every row already on a centre: any row will do
                pick = torch.randint(len(v), (1,), generator=generator)
            else:
                pick = torch.multinomial(distance, 1, generator=generator)
            centres = torch.cat([centres, v[pick]])
        labels = (v @ centres.T).argmax(dim=1)
        for _ in range(max_iter):
            for c in range(k):
                members = v[labels == c]
                if len(members):  # an emptied group keeps its old centre
                    centres[c] = torch.nn.functional.normalize(members.sum(0), dim=0)
            new = (v @ centres.T).argmax(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
        score = float((v * centres[labels]).sum())
        if score > best_score + 1e-12:
            best_labels, best_score = labels, score
    return best_labels


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
        logit: float = 3.0,
        local_steps: int = 20,
        restarts: int = 10,
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
        router = _router(pl_module, "ClusteredRouterInit")
        if trainer.ckpt_path is not None:  # resumed: the logits come from the checkpoint
            return
        # The logits are private (never part of the global state), so they may be set after the round loop
        # has taken its copy of the global weights.
        clients = list(range(router.num_clients))
        lr = getattr(getattr(pl_module, "optimizer_options", None), "lr", None)
        grads = client_gradients(pl_module, trainer.datamodule, clients, self.local_steps, lr)
        generator = seeded_generator(self.seed, Stream.ROUTER_INIT, 0)
        self.assignment = spherical_kmeans(grads, min(router.num_adaptors, len(clients)), generator, self.restarts)
        self._set_logits(router, self.assignment)

    def _set_logits(self, router, groups: torch.Tensor) -> None:
        with torch.no_grad():
            router.logits.zero_()
            router.logits.scatter_(1, groups.to(router.logits.device)[:, None], self.logit)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        round_idx = trainer.current_epoch
        if self.reassign_every <= 0 or round_idx == 0 or round_idx % self.reassign_every:
            return
        router = pl_module.model.router
        self._set_logits(router, lowest_loss_adaptor(pl_module, trainer.datamodule))


@torch.no_grad()
def lowest_loss_adaptor(pl_module: L.LightningModule, datamodule) -> torch.Tensor:
    """For every client, the adaptor whose one-adaptor mixture (logits 0 there, -100 elsewhere: weight 1, the
    floor ``min_prob`` on the others, as the oracle's) gives its lowest mean train loss [K]."""
    router = pl_module.model.router
    saved = router.logits.detach().clone()
    was_training = pl_module.training
    pl_module.eval()
    losses = torch.zeros(router.num_clients, router.num_adaptors, dtype=torch.float64)
    try:
        for c in range(router.num_adaptors):
            router.logits.fill_(-100.0)
            router.logits[:, c] = 0.0
            for k in range(router.num_clients):
                total, count = 0.0, 0
                for x, y in _client_batches(datamodule, k):
                    x, y = x.to(pl_module.device), y.to(pl_module.device)
                    total += float(pl_module.compute_loss(pl_module(x, k), y)) * len(y)
                    count += len(y)
                losses[k, c] = total / max(count, 1)
    finally:
        router.logits.copy_(saved)
        pl_module.train(was_training)
    return losses.argmin(dim=1)


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
