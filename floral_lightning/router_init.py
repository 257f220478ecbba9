"""The clustered start of the router (beyond the paper): every client's logits from a clustering of the clients'
first updates, so that adaptor c is averaged mostly over one group of clients from the first round.

With the paper's zero second factor all C adaptors of a layer are identical at round 0, the loss does not depend
on the mixture, and the router gradient is exactly zero; only the router's training noise separates the
adaptors, slowly (README, "The learned router"). :func:`clustered_start` groups the clients by the direction of
their update of the shared weights after a few full-batch gradient steps from the initial global model
(spherical k-means on cosine similarity, as IFCA/CFL group clients) and gives client k in group g the logit
``logit`` at adaptor g, 0 elsewhere. The model at step 0 is unchanged. ``FloralModule`` runs it when a fit starts
from scratch with ``router.init="clustered"`` (the shipped MNIST and synthetic configs);
``callbacks.ClusteredRouterInit`` runs it with other settings and can re-assign clients later.
"""

from __future__ import annotations

import lightning as L
import torch

from .data.federated import BatchPrep
from .seeding import Stream, seeded_generator

__all__ = ["client_gradients", "clustered_start", "lowest_loss_adaptor", "set_assigned_logits", "spherical_kmeans"]

#: ``clustered_start``'s defaults: the assigned adaptor's logit (softmax weight 0.87 with C = 4), the local
#: steps of a client's update, the k-means++ restarts
LOGIT, LOCAL_STEPS, RESTARTS = 3.0, 20, 10


def clustered_start(
    pl_module: L.LightningModule,
    datamodule,
    seed: int,
    logit: float = LOGIT,
    local_steps: int = LOCAL_STEPS,
    restarts: int = RESTARTS,
) -> torch.Tensor:
    """Set every client's router logits from a clustering of the clients' updates and return the groups [K].

    Each client's update of the shared weights from the module's current weights (``client_gradients``:
    ``local_steps`` full-batch gradient steps at the client optimizer's ``lr``) is grouped by cosine similarity
    into C groups (``spherical_kmeans``, seeded from ``(seed, Stream.ROUTER_INIT)``); client k in group g gets
    logit ``logit`` at adaptor g and 0 elsewhere. Costs ``local_steps`` passes over every client's train data,
    and asks every client once (not only the sampled ones), unlike the paper's protocol.
    """
    router = pl_module.model.router
    clients = list(range(router.num_clients))
    lr = getattr(getattr(pl_module, "optimizer_options", None), "lr", None)
    grads = client_gradients(pl_module, datamodule, clients, local_steps, lr)
    generator = seeded_generator(seed, Stream.ROUTER_INIT, 0)
    groups = spherical_kmeans(grads, min(router.num_adaptors, len(clients)), generator, restarts)
    set_assigned_logits(router, groups, logit)
    return groups


@torch.no_grad()
def set_assigned_logits(router, groups: torch.Tensor, logit: float) -> None:
    """Client k's logits: ``logit`` at adaptor ``groups[k]``, 0 elsewhere."""
    router.logits.zero_()
    router.logits.scatter_(1, groups.to(router.logits.device)[:, None], float(logit))


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
            batches = [(x.to(pl_module.device), y.to(pl_module.device)) for x, y in _client_batches(datamodule, k)]
            update = [torch.zeros_like(p) for p in params]
            for step in range(local_steps):
                grads = _full_batch_gradient(pl_module, batches, k, params)
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


def _full_batch_gradient(
    pl_module, batches: list[tuple[torch.Tensor, torch.Tensor]], client_id: int, params: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The gradient of client ``client_id``'s mean training loss over all its samples (``batches``, the chunks of
    ``_client_batches`` on the module's device) w.r.t. ``params``."""
    total = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in batches:
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
    # Every centre is a normalised sum of rows, so the algorithm runs on the cosines of the rows with each other
    # (the Gram matrix, [N, N]) with each centre held as its coefficients over the rows (``weights`` [N, k]:
    # centre c = v^T weights[:, c]): the same steps as on the vectors themselves, without ever touching D again
    # (D is the number of shared weights: 160 000 for the MNIST MLP, where k-means on the vectors took 20 s).
    gram = v @ v.T
    rows = torch.arange(len(v))
    best_labels, best_score = None, -float("inf")
    for _ in range(restarts):
        picks = [int(torch.randint(len(v), (1,), generator=generator))]
        while len(picks) < k:
            distance = (1.0 - gram[:, picks]).clamp_min(0.0).min(dim=1).values
            if float(distance.sum()) <= 0.0:  # every row already on a centre: any row will do
                pick = torch.randint(len(v), (1,), generator=generator)
            else:
                pick = torch.multinomial(distance, 1, generator=generator)
            picks.append(int(pick))
        weights = torch.zeros(len(v), k, dtype=gram.dtype)
        weights[picks, rows[:k]] = 1.0  # centre c is row picks[c]
        cosines = gram @ weights  # of every row with every centre
        labels = cosines.argmax(dim=1)
        for _ in range(max_iter):
            for c in range(k):
                members = labels == c
                if members.any():  # an emptied group keeps its old centre
                    norm = gram[members][:, members].sum().clamp_min(0.0).sqrt()  # ||sum of its rows||
                    weights[:, c] = members.to(gram.dtype) / norm.clamp_min(1e-12)
            cosines = gram @ weights
            new = cosines.argmax(dim=1)
            if torch.equal(new, labels):
                break
            labels = new
        score = float(cosines[rows, labels].sum())
        if score > best_score + 1e-12:
            best_labels, best_score = labels, score
    return best_labels


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
