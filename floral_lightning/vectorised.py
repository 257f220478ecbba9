"""A round's sampled clients trained at once: one vectorised computation over stacked client copies.

The sequential round loop (``callbacks.FederatedCallback``) trains the sampled clients one after another, each
from the global weights with a fresh optimizer. Those trainings are independent, so they can run as one
computation over a leading client dimension:

    stacked[name]  = the global tensor repeated S times  (S sampled clients, trainable federated tensors)
    theta          = the S clients' router rows            [S, C]
    local step s:  for each group of clients whose batch s has the same shape (usually all of them):
        losses     = vmap(client loss)(stacked, theta, noise[:, s], x[G, B, ...], y[G, B, ...])   [G]
        grads      = d sum(losses) / d (stacked, theta)     (client g's loss depends on its own copy only)
        preconditioning and the client optimizer step (SGD with momentum / weight decay, or Adam), written out
        as ``torch.optim`` computes them, on the stacked tensors and the stacked optimizer state

A client with fewer batches than the others is simply absent from the groups of the steps it does not have,
so its copy stops changing. Each client's router noise is drawn from a generator seeded as the sequential
loop seeds the global RNG for it (``seeding.seed_local_training``), one draw per local step as the router's
forward makes it, so both loops see the same noise. The client loss is the module's own ``compute_loss`` and
the router's own rule (``ClientMixtures.mix``) run through ``torch.func.functional_call`` on the module's
model, so the vectorised and sequential rounds compute the same function; they differ only in floating-point
summation order (a batched matrix product adds in another order than a plain one).

:func:`vectorise_reason` says, by name, why a trainer and module cannot be vectorised (the round loop then
trains clients one after another), and :func:`probe` runs one vectorised step on the first batch of a round
to catch a model op that ``vmap`` cannot batch before any state is touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.func import functional_call, vmap

from .ensemble import EnsembleModel
from .layers import FloralLayer, FloralLinear
from .model import FloralModel
from .personalized import PersonalizedModel, SharedModel
from .seeding import Stream, stream_seed

__all__ = ["RoundBatch", "RoundResult", "StepGroup", "VectorisedClients", "probe", "vectorise_reason"]

#: FloralModule methods that define a client's local training; a subclass that overrides one of them trains
#: differently from what the vectorised step computes, so its rounds stay sequential
TRAINING_HOOKS = (
    "training_step",
    "forward",
    "on_client_start",
    "on_client_end",
    "configure_optimizers",
    "configure_client_optimizer",
    "on_before_optimizer_step",
    "on_before_backward",
    "on_after_backward",
    "on_before_zero_grad",
    "optimizer_step",
    "optimizer_zero_grad",
    "backward",
    "on_train_batch_start",
    "on_train_batch_end",
    "federated_state",
    "federated_roles",
    "client_logits",
)
#: the models whose client loss the vectorised step computes: FLoRAL, FedAvg, and the Ensemble (its members are
#: stacked tensors, run as stacked products or under an inner ``vmap``, mixed by the same router)
VECTORISED_MODELS = (FloralModel, SharedModel, EnsembleModel)
#: Lightning callback hooks that run once per local step in the sequential loop (once per round vectorised)
STEP_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)
#: norm layers whose running statistics a training forward updates in place (when ``track_running_stats``)
_RUNNING_STATS = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
#: layers that draw from the global RNG in training
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
#: the preconditioner's eps: FloralModel.precondition_gradients_'s default, which FloralModule uses
PRECONDITION_EPS: float = inspect.signature(FloralModel.precondition_gradients_).parameters["eps"].default


@dataclass
class StepGroup:
    """Clients that take a local step on batches of one shape: their slots in the stacks (``positions`` [G];
    ``start``: the first, when they are the consecutive slots ``start .. start + G - 1``, else ``None``) and
    their batches stacked (``x`` [G, B, ...], ``y`` [G, B, ...])."""

    positions: torch.Tensor
    start: int | None
    x: torch.Tensor
    y: torch.Tensor


class RoundBatch:
    """A whole round's training batches, stacked for :class:`VectorisedClients` (what the round loader serves
    as its one item in vectorised mode; Lightning moves it to the device like any batch, through :meth:`to`).

    Client ``clients[i]`` has slot i in the stacks and ``num_steps[i]`` local steps; ``order`` lists the slots
    in the round's training order. ``steps[s]`` holds the groups of local step s.

    A plain class, not a dataclass, so Lightning's collection helpers treat it as one object (moved by ``to``)
    rather than walking and copying its fields.
    """

    __slots__ = ("clients", "num_steps", "order", "steps")

    def __init__(self, clients: list[int], num_steps: list[int], order: list[int], steps: list[list[StepGroup]]):
        self.clients = clients
        self.num_steps = num_steps
        self.order = order
        self.steps = steps

    def to(self, *args: Any, **kwargs: Any) -> RoundBatch:
        """The batch with every tensor moved by ``Tensor.to(*args, **kwargs)``. Lightning's ``batch_to_device``
        calls this for an object with a ``to`` method instead of walking the dataclass field by field."""
        steps = [
            [StepGroup(g.positions, g.start, g.x.to(*args, **kwargs), g.y.to(*args, **kwargs)) for g in s]
            for s in self.steps
        ]
        return RoundBatch(self.clients, self.num_steps, self.order, steps)

    @classmethod
    def collect(cls, batches: Iterator[tuple[Any, Any, int]]) -> RoundBatch:
        """Stack a round's ``(x, y, k)`` batches (each client's batches contiguous) step by step.

        Slots are sorted by (number of steps, size of the last batch): with one local epoch, the clients of
        every group are then consecutive slots (those still at full batches, and each block that takes its last,
        smaller batch), so a group's stacks are views, not gathered copies.
        """
        per_client: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for x, y, k in batches:
            per_client.setdefault(int(k), []).append((x, y))
        round_order = list(per_client)
        clients = sorted(round_order, key=lambda k: (len(per_client[k]), len(per_client[k][-1][0])))
        slot = {k: i for i, k in enumerate(clients)}
        num_steps = [len(per_client[k]) for k in clients]
        steps = []
        for s in range(max(num_steps, default=0)):
            shapes: dict[tuple, list[int]] = {}
            for i, k in enumerate(clients):
                if s < num_steps[i]:
                    x, y = per_client[k][s]
                    shapes.setdefault((x.shape, x.dtype, y.shape, y.dtype), []).append(i)
            groups = []
            for positions in shapes.values():
                consecutive = positions == list(range(positions[0], positions[0] + len(positions)))
                groups.append(
                    StepGroup(
                        torch.tensor(positions, dtype=torch.long),
                        positions[0] if consecutive else None,
                        torch.stack([per_client[clients[i]][s][0] for i in positions]),
                        torch.stack([per_client[clients[i]][s][1] for i in positions]),
                    )
                )
            steps.append(groups)
        return cls(clients, num_steps, [slot[k] for k in round_order], steps)


@dataclass
class RoundResult:
    """What a vectorised round produced: every client's trained tensors and router row, its losses.

    ``state[name]`` is ``[S, ...]`` for the trained federated tensors (the others are the global tensors,
    unchanged); ``logits`` is ``[S, C]``, the router rows after training (``None`` without a router).
    ``loss_sum`` / ``loss_count`` give the sample-weighted mean local loss (before the entropy penalty), as
    ``FloralModule`` logs ``train/loss``; ``penalty_sum`` / ``loss_count`` that of the module's ``local_penalty``.
    ``nonfinite[i]`` is ``(step, loss)`` of client i's first non-finite training loss, or ``None``;
    ``finite_update[i]`` whether client i's trained tensors and router row are all finite.
    """

    clients: list[int]
    state: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    loss_sum: torch.Tensor
    penalty_sum: torch.Tensor
    loss_count: int
    nonfinite: list[tuple[int, float] | None]
    finite_update: list[bool]

    def client_state(self, i: int, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Client ``clients[i]``'s federated tensors by name (views into the stacked tensors)."""
        return {n: self.state[n][i] if n in self.state else t for n, t in global_state.items()}

    def stacked_updates(
        self, slots: list[int], global_state: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The federated tensors ``[len(slots), ...]`` of the clients in ``slots`` (untrained ones: the global
        tensor, expanded) and their router logits ``[len(slots), C]`` (a zero logit each without a router), as
        ``StreamingAggregator.add_stacked`` takes them."""
        every = slots == list(range(len(self.clients)))
        index = torch.tensor(slots, dtype=torch.long, device=self.loss_sum.device)
        states = {}
        for n, t in global_state.items():
            if n in self.state:
                states[n] = self.state[n] if every else self.state[n].index_select(0, index)
            else:
                states[n] = t.unsqueeze(0).expand(len(slots), *t.shape)
        if self.logits is None:
            return states, torch.zeros(len(slots), 1)
        return states, self.logits if every else self.logits.index_select(0, index)


def vectorise_reason(trainer: L.Trainer, pl_module: L.LightningModule, loader: Any) -> str | None:
    """Why the round's clients of this trainer and module cannot be trained as one vectorised computation,
    or ``None`` when they can. Each reason names the setting, class or module that rules it out."""
    from .module import FloralModule

    if not isinstance(pl_module, FloralModule):
        return f"the module is a {type(pl_module).__name__}, not a FloralModule"
    for hook in TRAINING_HOOKS:
        if getattr(type(pl_module), hook) is not getattr(FloralModule, hook):
            return f"{type(pl_module).__name__} overrides {hook} (its local training differs from FloralModule's)"
    model = pl_module.model
    if type(model) not in VECTORISED_MODELS:
        names = ", ".join(m.__name__ for m in VECTORISED_MODELS)
        return f"the model is a {type(model).__name__}; only {names} vectorise"
    for name, module in model.named_modules():
        if isinstance(module, _RUNNING_STATS) and module.track_running_stats:
            return f"{name} ({type(module).__name__}) updates running statistics in training"
        if isinstance(module, _DROPOUT) and module.p > 0:
            return f"{name} ({type(module).__name__}) draws from the global RNG in training"
    if pl_module.precondition and isinstance(model, FloralModel):
        for name, layer in model.floral_layers().items():
            overrides = type(layer).precondition_gradients_ is not FloralLayer.precondition_gradients_
            if overrides and not isinstance(layer, FloralLinear):
                return f"preconditioning of {name or 'base'} ({type(layer).__name__}): only FloralLinear vectorises"
    optimizers = trainer.optimizers
    if len(optimizers) != 1 or type(optimizers[0]) not in (torch.optim.SGD, torch.optim.Adam):
        names = [type(o).__name__ for o in optimizers]
        return f"client optimizer(s) {names}: only one torch.optim.SGD or torch.optim.Adam vectorises"
    for group in optimizers[0].param_groups:
        unsupported = {
            key: group[key]
            for key, plain in (
                ("dampening", 0),
                ("nesterov", False),
                ("maximize", False),
                ("amsgrad", False),
                ("decoupled_weight_decay", False),
            )
            if group.get(key, plain) != plain
        }
        if unsupported:
            return f"client optimizer option(s) {unsupported}"
    if trainer.gradient_clip_val:
        return f"gradient_clip_val={trainer.gradient_clip_val} (clipping is per local step in Lightning's loop)"
    if trainer.precision not in ("32-true", "32", 32, "64-true", "64", 64):
        return f"precision={trainer.precision!r} (mixed precision steps go through Lightning's scaler)"
    for callback in trainer.callbacks:
        hooks = [h for h in STEP_HOOKS if not _hook_is_trusted(type(callback), h)]
        if hooks:
            return f"callback {type(callback).__name__} runs {hooks} per local step"
    if not hasattr(loader, "whole_round"):
        return f"the train loader is a {type(loader).__name__}, which cannot serve a whole round"
    return None


def _hook_is_trusted(cls: type, hook: str) -> bool:
    """Whether ``cls.hook`` comes from Lightning or this project's callbacks (the round loop itself, the progress
    bar, checkpoints, timers: none acts on a single local step), not from a user's class."""
    owner = next(c for c in cls.__mro__ if hook in c.__dict__)
    return owner.__module__.split(".")[0] in ("lightning", "callbacks")


class VectorisedClients:
    """Trains a round's sampled clients of ``pl_module`` at once (see the module docstring).

    Args:
        pl_module: a ``FloralModule`` for which :func:`vectorise_reason` gives ``None``.
        optimizer: the client optimizer Lightning built (its parameter groups give the learning rates, so a
            learning-rate schedule over rounds applies as in the sequential loop).
        seed: the round loop's seed (router noise streams).
    """

    def __init__(self, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer, seed: int) -> None:
        self.module = pl_module
        self.model: PersonalizedModel = pl_module.model
        self.router = self.model.router
        self.seed = seed
        self.optimizer = optimizer
        federated = pl_module.federated_state()
        self.names = [n for n, t in federated.items() if isinstance(t, nn.Parameter) and t.requires_grad]
        self.train_router = self.router is not None and not self.router.frozen
        # the parameter group of every trained tensor, by identity (the router logits by their own name)
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        tensors = dict(self.model.named_parameters())
        self._groups = {n: group_of[id(tensors[n])] for n in self.names}
        if self.train_router:
            self._groups["router"] = group_of[id(self.router.logits)]
        # factor pairs to precondition: (A name, B name, rank) of every FloralLinear layer
        #: the memory order of a stack's dimensions (outermost first) where its gradient comes in another one
        #: than the contiguous order (``probe`` learns them): stacking in the gradient's layout keeps the
        #: optimizer's elementwise update reading memory in order (a batched linear layer's weight gradient comes
        #: transposed, and adding it to a contiguous stack costs about three times as much)
        self.layouts: dict[str, tuple[int, ...]] = {}
        self._factor_pairs: list[tuple[str, str, int]] = []
        if pl_module.precondition and isinstance(self.model, FloralModel):
            for name, layer in self.model.floral_layers().items():
                if isinstance(layer, FloralLinear):
                    prefix = f"base.{name}." if name else "base."
                    self._factor_pairs.append((prefix + "adaptor_A", prefix + "adaptor_B", layer.rank))

    # --- the per-client function that vmap batches -------------------------------------------------------
    def losses(
        self,
        params: dict[str, torch.Tensor],
        theta: torch.Tensor | None,
        noise: torch.Tensor | None,
        x: torch.Tensor,
        y: torch.Tensor,
        start: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_client_loss` of every client at once: tensors with a leading client dimension in (``start``, the
        global tensors, shared by all), ``[G]`` out."""
        in_dims = (0, None if theta is None else 0, None if noise is None else 0, 0, 0, None)
        return vmap(self._client_loss, in_dims=in_dims, randomness="error")(params, theta, noise, x, y, start)

    def _client_loss(
        self,
        params: dict[str, torch.Tensor],
        theta: torch.Tensor | None,
        noise: torch.Tensor | None,
        x: torch.Tensor,
        y: torch.Tensor,
        start: dict[str, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One client's training loss on one batch, its ``local_penalty`` (0 without one), and the loss with the
        router's entropy penalty and the local penalty (what it descends)."""
        if self.router is None:
            outputs = functional_call(self.model, params, (x,))
            loss = total = self.module.compute_loss(outputs, y)
        else:
            mixture = self.router.mix(theta, noise)
            outputs = functional_call(self.model, params, (x,), {"mixture": mixture})
            loss = total = self.module.compute_loss(outputs, y)
            if self.router.entropy_penalty != 0:
                total = total + self.router.entropy_penalty * self.router.entropy_of(theta)
        local = None if start is None else self.module.local_penalty(params, start)
        if local is None:
            return loss, torch.zeros_like(loss), total
        return loss, local, total + local

    def _noise(self, round_idx: int, clients: list[int], num_steps: list[int], device: torch.device) -> torch.Tensor:
        """Every client's router noise per local step [S, max steps, C], drawn as its sequential training draws
        it: from a generator seeded like ``seed_local_training(seed, round, client)``, one draw per step."""
        c = self.router.num_adaptors
        noise = torch.zeros(len(clients), max(num_steps), c, device=device, dtype=self.router.logits.dtype)
        for i, (k, steps) in enumerate(zip(clients, num_steps)):
            generator = torch.Generator(device=device)
            generator.manual_seed(stream_seed(self.seed, Stream.LOCAL_TRAINING, round_idx, k) % 2**63)
            for s in range(steps):
                noise[i, s] = self.router.draw_noise((c,), generator)
        return noise

    def penalty_start(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The start of every client's ``local_penalty``: the global tensors it trains from (``None`` for a module
        without a local penalty)."""
        if not self.module.has_local_penalty:
            return None
        return {n: global_state[n].detach() for n in self.names}

    # --- a round -----------------------------------------------------------------------------------------
    def train_round(self, round_idx: int, global_state: Mapping[str, torch.Tensor], batch: RoundBatch) -> RoundResult:
        """Train ``batch.clients`` from ``global_state``, each with its own router row and a fresh optimizer."""
        clients, size = batch.clients, len(batch.clients)
        stacked = {n: self._stack(n, global_state[n].detach(), size) for n in self.names}
        theta = None
        if self.router is not None:
            theta = self.router.logits.detach()[torch.tensor(clients, device=self.router.logits.device)].clone()
        noise = None
        if self.router is not None and self.router.draws_noise:
            noise = self._noise(round_idx, clients, batch.num_steps, self.router.logits.device)
        trained = dict(stacked)
        if self.train_router:
            trained["router"] = theta
        state = self._fresh_optimizer_state(trained)
        loss_sum = torch.zeros((), device=next(iter(stacked.values()), theta).device)
        penalty_sum = torch.zeros_like(loss_sum)
        loss_count = 0
        client_start = self.penalty_start(global_state)
        records: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, positions, penalised losses)
        for s, groups in enumerate(batch.steps):
            for group in groups:
                # consecutive slots: the group's stacks are views, updated in place; otherwise gathered copies,
                # written back after the step
                start, count = group.start, len(group.positions)
                idx = None if start is not None else group.positions.to(loss_sum.device)
                leaves = {n: _take(t, start, count, idx).detach().requires_grad_(True) for n, t in trained.items()}
                params = {n: leaves[n] for n in self.names}
                th = None  # the group's router rows: trained (a leaf), frozen (oracle), or none (FedAvg)
                if self.train_router:
                    th = leaves["router"]
                elif theta is not None:
                    th = _take(theta, start, count, idx)
                nz = None if noise is None else _take(noise[:, s], start, count, idx)
                losses, local, penalised = self.losses(params, th, nz, group.x, group.y, client_start)
                grads = dict(zip(leaves, torch.autograd.grad(penalised.sum(), list(leaves.values()))))
                with torch.no_grad():
                    self._precondition(leaves, grads)
                    group_state = {
                        n: {k: _take(v, start, count, idx) for k, v in st.items()} for n, st in state.items()
                    }
                    self._step(leaves, grads, group_state, s + 1)
                    if idx is not None:
                        for n, t in trained.items():
                            t.index_copy_(0, idx, leaves[n])
                        for n, st in state.items():
                            for k, v in st.items():
                                v.index_copy_(0, idx, group_state[n][k])
                    rows = group.x.shape[1]
                    loss_sum += losses.detach().sum() * rows
                    penalty_sum += local.detach().sum() * rows
                    loss_count += rows * len(group.positions)
                    records.append((s, group.positions, penalised.detach()))
        nonfinite = self._nonfinite(records, size)
        # One check over the stacks, not one per client and tensor: a sum is finite when every term is (a sum of
        # finite terms that overflows is caught too, and settled by the exact check of the round loop)
        finite = torch.ones(size, dtype=torch.bool, device=loss_sum.device)
        for t in trained.values():
            finite &= torch.isfinite(t.sum(tuple(range(1, t.dim()))) if t.dim() > 1 else t)
        logits = trained.get("router", theta)  # a frozen router (oracle): its rows still weight the adaptors
        state = {n: trained[n] for n in self.names}
        return RoundResult(clients, state, logits, loss_sum, penalty_sum, loss_count, nonfinite, finite.tolist())

    def _stack(self, name: str, tensor: torch.Tensor, size: int) -> torch.Tensor:
        """``size`` copies of ``tensor`` stacked on a new leading dimension, in the layout of ``layouts[name]``."""
        order = self.layouts.get(name, tuple(range(tensor.dim() + 1)))
        shape = (size, *tensor.shape)
        out = torch.empty([shape[d] for d in order], dtype=tensor.dtype, device=tensor.device)
        out = out.permute([order.index(d) for d in range(len(order))])  # back to (client, *tensor dims)
        return out.copy_(tensor.unsqueeze(0).expand(shape))

    @staticmethod
    def _nonfinite(records: list[tuple[int, torch.Tensor, torch.Tensor]], size: int) -> list[tuple[int, float] | None]:
        """Each client's first non-finite loss (step, value): one device sync for the round when all are finite."""
        first: list[tuple[int, float] | None] = [None] * size
        if not records or bool(torch.stack([torch.isfinite(r[2]).all() for r in records]).all()):
            return first
        for step, positions, losses in records:
            for position, value in zip(positions.tolist(), losses.tolist()):
                if first[position] is None and not torch.isfinite(torch.tensor(value)):
                    first[position] = (step, value)
        return first

    # --- the client optimizer, as torch.optim computes it ---------------------------------------------------
    def _fresh_optimizer_state(self, trained: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Zero momentum (SGD) or moments (Adam) per trained tensor: a fresh optimizer for every client."""
        state = {}
        for n, t in trained.items():
            group = self._groups[n]
            if isinstance(self.optimizer, torch.optim.Adam):
                state[n] = {"exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
            elif group["momentum"] != 0:
                # torch starts the buffer at the first gradient; with dampening 0, momentum * 0 + g is that exactly
                state[n] = {"momentum_buffer": torch.zeros_like(t)}
            else:
                state[n] = {}
        return state

    def _step(
        self,
        params: dict[str, torch.Tensor],
        grads: dict[str, torch.Tensor],
        state: dict[str, dict[str, torch.Tensor]],
        step: int,
    ) -> None:
        """One optimizer step on every client's copy: ``torch.optim.SGD`` / ``Adam``'s update, element for element
        (the same for every client, since each client's state is its own slice)."""
        adam = isinstance(self.optimizer, torch.optim.Adam)
        for n, p in params.items():
            group, g = self._groups[n], grads[n]
            if group["weight_decay"] != 0:
                g = g.add(p, alpha=group["weight_decay"])
            if adam:
                beta1, beta2 = group["betas"]
                exp_avg, exp_avg_sq = state[n]["exp_avg"], state[n]["exp_avg_sq"]
                exp_avg.lerp_(g, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = group["lr"] / (1 - beta1**step)
                denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
                p.addcdiv_(exp_avg, denom, value=-step_size)
                continue
            if group["momentum"] != 0:
                g = state[n]["momentum_buffer"].mul_(group["momentum"]).add_(g)
            p.add_(g, alpha=-group["lr"])

    def _precondition(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        """``FloralLinear.precondition_gradients_`` on every client's factor gradients (leading dims [G, C])."""
        eps = PRECONDITION_EPS
        for name_a, name_b, rank in self._factor_pairs:
            if name_a not in grads and name_b not in grads:
                continue
            a, b = params[name_a], params[name_b]
            if rank == 1:
                if name_a in grads:
                    grads[name_a].div_((b * b).sum((-2, -1), keepdim=True).add_(eps))
                if name_b in grads:
                    grads[name_b].div_((a * a).sum((-2, -1), keepdim=True).add_(eps))
                continue
            eye = eps * torch.eye(rank, device=a.device, dtype=a.dtype)
            if name_a in grads:
                grads[name_a] = torch.linalg.solve(b.transpose(-2, -1) @ b + eye, grads[name_a])
            if name_b in grads:
                gram = a @ a.transpose(-2, -1) + eye
                grads[name_b] = torch.linalg.solve(gram, grads[name_b].transpose(-2, -1)).transpose(-2, -1)


def _take(t: torch.Tensor, start: int | None, count: int, idx: torch.Tensor | None) -> torch.Tensor:
    """A group's rows of a stack: the view ``t[start : start + count]``, or the copy ``t[idx]``."""
    return t.narrow(0, start, count) if idx is None else t.index_select(0, idx)


def probe(clients: VectorisedClients, global_state: Mapping[str, torch.Tensor], batch: tuple[Any, Any, int]) -> None:
    """One vectorised forward and backward for two copies of the global weights on ``batch`` (raises what
    ``vmap`` raises for an op it cannot batch), and the layouts the gradients come in (``clients.layouts``).
    Touches no weights: the copies are thrown away."""
    x, y, k = batch
    device = next(iter(global_state.values())).device
    x, y = torch.stack([x, x]).to(device), torch.stack([y, y]).to(device)
    params = {
        n: global_state[n].detach().unsqueeze(0).repeat(2, *([1] * global_state[n].dim())).requires_grad_(True)
        for n in clients.names
    }
    theta = noise = None
    leaves = list(params.values())
    if clients.router is not None:
        theta = clients.router.logits.detach()[[k, k]].clone().requires_grad_(clients.train_router)
        if clients.train_router:
            leaves.append(theta)
        if clients.router.draws_noise:
            noise = torch.zeros_like(theta)
    _, _, penalised = clients.losses(params, theta, noise, x, y, clients.penalty_start(global_state))
    if not leaves:
        return
    grads = torch.autograd.grad(penalised.sum(), leaves)
    for name, grad in zip(params, grads):  # learn the gradients' layouts (see VectorisedClients.layouts)
        order = tuple(sorted(range(grad.dim()), key=lambda d: (-grad.stride(d), d)))
        if order[0] == 0 and order != tuple(range(grad.dim())) and grad.permute(order).is_contiguous():
            clients.layouts[name] = order
