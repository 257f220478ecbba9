"""The aggregation rule (spec §2), as pure functions with no Lightning in them.

Given the clients of a round with train sizes n_k and router logits theta_k:

    p(k)   = n_k / sum_j n_j
    p(c|k) = softmax(theta_k)
    p(k|c) = p(k) p(c|k) / sum_j p(j) p(c|j)

shared tensors average with p(k); slice c of every adaptor tensor (leading dim C) averages with p(k|c);
integer buffers (e.g. ``num_batches_tracked``) take the maximum, never a sum. ``StreamingAggregator``
accumulates the unnormalised sums as each client finishes, so a round's memory is one extra copy of the
model whatever the number of clients; ``aggregate`` is the same rule applied to a list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import foreach

SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")


def client_weights(num_samples: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p(k)`` [S] and ``p(k|c)`` [S, C] for S clients with sizes ``num_samples`` and logits [S, C]."""
    n = torch.as_tensor(num_samples, dtype=torch.float64)
    p_k = n / n.sum()
    joint = p_k[:, None] * torch.softmax(logits.detach().to(torch.float64), dim=-1)
    return p_k, joint / joint.sum(0, keepdim=True)


@dataclass
class ClientUpdate:
    """What a client reports after local training."""

    client_id: int
    state: Mapping[str, torch.Tensor]
    num_samples: int
    logits: torch.Tensor


class StreamingAggregator:
    """Running weighted sums of the federated tensors, one client at a time.

    Args:
        template: the federated tensors by name (their shapes and dtypes; values are not used).
        roles: ``"shared"`` or ``"adaptor"`` for every name in ``template``.
    """

    def __init__(self, template: Mapping[str, torch.Tensor], roles: Mapping[str, str]) -> None:
        self.names = list(template)
        self._integer = [n for n in self.names if not template[n].is_floating_point()]
        self._shared = [n for n in self.names if roles[n] == "shared" and n not in self._integer]
        self._adaptor = [n for n in self.names if roles[n] == "adaptor" and n not in self._integer]
        unknown = set(self.names) - set(self._integer) - set(self._shared) - set(self._adaptor)
        if unknown:
            raise ValueError(f"tensors {sorted(unknown)} have no federated role (expected 'shared' or 'adaptor')")
        self._sums = {n: torch.zeros_like(template[n]) for n in self._shared + self._adaptor}
        self._no_max = {n: torch.zeros_like(template[n]) for n in self._integer}  # partial_state before any client
        self._max: dict[str, torch.Tensor] = {}
        self._shared_total = 0.0
        self._adaptor_total: torch.Tensor | None = None
        self.num_clients = 0

    @torch.no_grad()
    def add(self, state: Mapping[str, torch.Tensor], num_samples: int, logits: torch.Tensor) -> None:
        """Add one client's trained tensors with weight ``n_k`` (shared) and ``n_k p(c|k)`` (adaptor c)."""
        n = float(num_samples)
        if n <= 0:
            raise ValueError(f"num_samples={num_samples}: a client must report a positive train size")
        if self._shared:
            foreach.add_([self._sums[k] for k in self._shared], [state[k] for k in self._shared], alpha=n)
        if self._adaptor:
            self._add_adaptors([state[k] for k in self._adaptor], n, logits)
        for k in self._integer:
            self._max[k] = state[k].clone() if k not in self._max else torch.maximum(self._max[k], state[k])
        self._shared_total += n
        self.num_clients += 1

    def partial_state(self) -> dict[str, torch.Tensor]:
        """The running sums, normalisers, integer maxima and client count as tensors whose names and shapes depend
        only on the template (zeros before any client), so that aggregators over disjoint shares of a round's
        clients, in several processes, can be combined with :meth:`merge`."""
        some = next(iter(self._sums.values()), None)
        device = some.device if some is not None else None
        out = {f"sum.{n}": s for n, s in self._sums.items()}
        out["shared_total"] = torch.tensor([self._shared_total], dtype=torch.float64, device=device)
        if self._adaptor:
            num_adaptors = self._sums[self._adaptor[0]].shape[0]
            zeros = torch.zeros(num_adaptors, dtype=torch.float32, device=device)
            out["adaptor_total"] = zeros if self._adaptor_total is None else self._adaptor_total.to(zeros)
        out.update({f"max.{n}": self._max.get(n, self._no_max[n]) for n in self._integer})
        out["num_clients"] = torch.tensor([self.num_clients], dtype=torch.int64, device=device)
        return out

    @torch.no_grad()
    def merge(self, partials: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Become the aggregator of all clients of ``partials`` (each a :meth:`partial_state` of an aggregator over
        the same template): the sums and normalisers added in the given order, the integer maxima taken over the
        partials that saw a client. This aggregator's own state is replaced (include it in ``partials``)."""
        if not partials:
            raise ValueError("merge needs at least one partial state (this aggregator's own included)")
        seen = [p for p in partials if int(p["num_clients"]) > 0]
        for name, own in self._sums.items():
            total = partials[0][f"sum.{name}"].to(own, copy=True)
            for p in partials[1:]:
                total += p[f"sum.{name}"].to(own)
            self._sums[name] = total
        self._shared_total = float(sum(float(p["shared_total"]) for p in partials))
        if self._adaptor and seen:
            total = partials[0]["adaptor_total"].clone()
            for p in partials[1:]:
                total = total + p["adaptor_total"].to(total)
            self._adaptor_total = total
        self._max = {}
        for name in self._integer:
            for p in seen:
                value = p[f"max.{name}"]
                known = self._max.get(name)
                self._max[name] = value.clone() if known is None else torch.maximum(known, value.to(known))
        self.num_clients = sum(int(p["num_clients"]) for p in partials)

    def _add_adaptors(self, tensors: list[torch.Tensor], n: float, logits: torch.Tensor) -> None:
        """Slice c of every adaptor tensor with weight ``n p(c|k)``, and the running total of those weights."""
        joint = n * torch.softmax(logits.detach().float(), dim=-1)
        sums = [self._sums[k] for k in self._adaptor]
        weights = [joint.to(s).view(-1, *([1] * (s.dim() - 1))) for s in sums]
        foreach.addcmul_(sums, tensors, weights)
        self._adaptor_total = joint if self._adaptor_total is None else self._adaptor_total + joint

    @torch.no_grad()
    def add_stacked(self, states: Mapping[str, torch.Tensor], num_samples: torch.Tensor, logits: torch.Tensor) -> None:
        """:meth:`add` for S clients at once: ``states[name]`` is ``[S, ...]`` (a client's tensor is row s; an
        expanded view does for a tensor no client changed), ``num_samples`` ``[S]``, ``logits`` ``[S, C]``.

        The vectorised round loop's updates are already stacked: the shared tensors' sums are one contraction
        over the clients each (their weights n_k are all positive, so only the rounding order differs from S
        calls of :meth:`add`); the adaptor tensors are added client by client exactly as :meth:`add` does,
        because an adaptor that the mixtures weight almost nowhere (oracle mixtures: p(c|k) ~ 1e-44) averages
        with so few significant bits that another summation order would give another value.
        """
        n = torch.as_tensor(num_samples, dtype=torch.float64)
        if len(n) == 0:
            return
        if bool((n <= 0).any()):
            raise ValueError(f"num_samples={n.tolist()}: a client must report a positive train size")
        if self._shared:
            for k in self._shared:
                self._sums[k] += _weighted_sum(n.to(states[k]), states[k])
        if self._adaptor:
            for i, n_i in enumerate(n.tolist()):
                self._add_adaptors([states[k][i] for k in self._adaptor], n_i, logits[i])
        for k in self._integer:
            top = states[k].amax(0)
            self._max[k] = top.clone() if k not in self._max else torch.maximum(self._max[k], top)
        self._shared_total += float(n.sum())
        self.num_clients += len(n)

    @torch.no_grad()
    def result(self, fallback: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The averages. An adaptor that no client weighted at all (possible only with underflowing
        mixtures) keeps its ``fallback`` value, as does everything when no client was added."""
        if self.num_clients == 0:
            return {k: fallback[k].clone() for k in self.names}
        out = {k: self._sums[k] / self._shared_total for k in self._shared}
        for k in self._adaptor:
            total = self._adaptor_total.to(self._sums[k]).view(-1, *([1] * (self._sums[k].dim() - 1)))
            avg = self._sums[k] / total.clamp_min(torch.finfo(total.dtype).tiny)
            out[k] = torch.where(total > 0, avg, fallback[k])
        out.update(self._max)
        return out


def _weighted_sum(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    """``sum_s weights[s] * stacked[s]`` as one contraction, on a permuted view where the stack is laid out in
    another order than contiguous (a transposed stack would otherwise be copied first)."""
    order = [0, *sorted(range(1, stacked.dim()), key=lambda d: -stacked.stride(d))]
    view = stacked.permute(order)
    if not view.is_contiguous():
        return torch.tensordot(weights, stacked, dims=1)
    inverse = [order.index(d) - 1 for d in range(1, stacked.dim())]
    return torch.tensordot(weights, view, dims=1).permute(inverse)


def aggregate(
    global_state: Mapping[str, torch.Tensor], roles: Mapping[str, str], updates: Iterable[ClientUpdate]
) -> dict[str, torch.Tensor]:
    """The new global tensors from a round's client updates (the rule in the module docstring)."""
    aggregator = StreamingAggregator(global_state, roles)
    for update in updates:
        aggregator.add(update.state, update.num_samples, update.logits)
    return aggregator.result(global_state)


class Yogi(torch.optim.Optimizer):
    """Yogi as the server optimizer of FedYogi (Reddi et al., "Adaptive Federated Optimization", Algorithm 2).

    With ``g`` the gradient (on the server: the pseudo-gradient ``x_prev - x_avg``), per tensor::

        m <- beta1 * m + (1 - beta1) * g
        v <- v - (1 - beta2) * g^2 * sign(v - g^2)
        x <- x - lr * m / (sqrt(v) + eps)

    ``m`` and ``v`` start at zero, as in Flower's ``FedYogi``; there is no bias correction (the paper has none).
    ``eps`` is the paper's tau, the degree of adaptivity.
    """

    def __init__(self, params, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-3) -> None:
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Yogi: betas={betas} must both lie in [0, 1)")
        if eps <= 0:
            raise ValueError(f"Yogi: eps={eps} must be > 0")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: D102 - the update is in the class docstring
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                g, m, v = p.grad, state["exp_avg"], state["exp_avg_sq"]
                g2 = g * g
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.sub_((1 - beta2) * g2 * torch.sign(v - g2))
                p.sub_(group["lr"] * m / (v.sqrt() + group["eps"]))
                state["step"] += 1


# The defaults of every server optimizer, used where the user leaves an option unset (None).
#  sgd:  lr 1, no momentum: exactly plain averaging (FedAvg), the spec's default.
#  avgm: FedAvgM (Hsu et al. 2019), server momentum 0.9 at lr 1, the pair Reddi et al. compare against.
#  adam, yogi: Reddi et al.'s settings: betas (0.9, 0.99) and tau = 1e-3 (their default degree of adaptivity;
#        Flower's FedYogi uses the same); server lr 1e-2, the order of their tuned server rates and Flower's
#        FedYogi default. With tau = 1e-8 (torch's Adam default) a coordinate whose clients moved it by 1e-4
#        would move by about lr in one round; tau = 1e-3 scales such small updates down instead.
SERVER_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 1.0, "momentum": 0.0},
    "avgm": {"lr": 1.0, "momentum": 0.9},
    "adam": {"lr": 1e-2, "eps": 1e-3},
    "yogi": {"lr": 1e-2, "eps": 1e-3},
}


class ServerOptimizer:
    """Moves the global model towards the clients' average, treating ``x_prev - x_avg`` as a gradient.

    ``sgd`` with ``lr=1`` and no momentum is plain averaging (FedAvg), applied as an exact copy; ``avgm`` (or
    ``sgd`` with momentum) is FedAvgM; ``adam`` is FedAdam (``torch.optim.Adam``, bias-corrected, ``eps``
    added to the root of the second moment); ``yogi`` is FedYogi (:class:`Yogi`, Reddi et al.'s Algorithm 2).
    Shared and adaptor tensors have separate learning rates (``adaptor_lr`` defaults to ``lr``). Buffers (norm
    statistics) are not optimised: they take the average.

    Options left at ``None`` take the optimizer's defaults in ``SERVER_DEFAULTS`` (and why they are those):
    ``sgd`` lr 1 (plain averaging); ``avgm`` lr 1, momentum 0.9; ``adam``/``yogi`` lr 1e-2, eps (tau) 1e-3,
    betas (0.9, 0.99), as recommended by Reddi et al.

    Args:
        name: ``"sgd"``, ``"avgm"``, ``"adam"`` or ``"yogi"``.
        lr: server learning rate of the shared (base) tensors.
        adaptor_lr: server learning rate of the adaptor tensors (``None``: same as ``lr``).
        momentum: SGD momentum (``sgd``/``avgm`` only).
        betas: the adaptive optimizers' betas.
        eps: the adaptive optimizers' epsilon (Reddi et al.'s tau; ``adam``/``yogi`` only).
    """

    def __init__(
        self,
        name: str = "sgd",
        lr: float | None = None,
        adaptor_lr: float | None = None,
        momentum: float | None = None,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float | None = None,
    ) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer {name!r}: expected one of {SERVER_OPTIMIZERS}")
        defaults = SERVER_DEFAULTS[name]
        for option, value in (("momentum", momentum), ("eps", eps)):
            if value is not None and option not in defaults:
                users = [n for n, d in SERVER_DEFAULTS.items() if option in d]
                raise ValueError(f"server {option}={value} does not apply to {name!r}; it applies to {users}")
        lr = defaults["lr"] if lr is None else lr
        if lr <= 0 or (adaptor_lr is not None and adaptor_lr <= 0):
            raise ValueError(f"server learning rates must be > 0 (lr={lr}, adaptor_lr={adaptor_lr})")
        self.name, self.lr, self.betas = name, lr, tuple(betas)
        self.momentum = defaults.get("momentum", 0.0) if momentum is None else momentum
        self.eps = defaults.get("eps") if eps is None else eps
        self.adaptor_lr = lr if adaptor_lr is None else adaptor_lr
        self._optimizer: torch.optim.Optimizer | None = None
        self._names: list[str] = []

    @property
    def is_plain_average(self) -> bool:
        """Whether a step is an exact copy of the average (SGD at lr 1 without momentum)."""
        return self.name in ("sgd", "avgm") and self.lr == 1.0 and self.adaptor_lr == 1.0 and self.momentum == 0.0

    def bind(self, global_state: Mapping[str, torch.Tensor], roles: Mapping[str, str], trainable: set[str]) -> None:
        """Attach to the global tensors that ``step`` updates in place; ``trainable`` names the parameters
        (optimised), everything else (buffers) takes the average."""
        self._names = [n for n in global_state if n in trainable and global_state[n].is_floating_point()]
        groups = []
        for role, lr in (("shared", self.lr), ("adaptor", self.adaptor_lr)):
            params = [global_state[n] for n in self._names if roles[n] == role]
            if params:
                groups.append({"params": params, "lr": lr})
        if not groups:
            self._optimizer = None
        elif self.name in ("sgd", "avgm"):
            self._optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        elif self.name == "adam":
            self._optimizer = torch.optim.Adam(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        else:
            self._optimizer = Yogi(groups, lr=self.lr, betas=self.betas, eps=self.eps)

    @torch.no_grad()
    def step(self, global_state: Mapping[str, torch.Tensor], averages: Mapping[str, torch.Tensor]) -> None:
        """Update ``global_state`` in place from the round's ``averages``."""
        optimised = set() if self.is_plain_average or self._optimizer is None else set(self._names)
        for name, avg in averages.items():
            if name not in optimised:
                global_state[name].copy_(avg)
        if not optimised:
            return
        for name in self._names:
            global_state[name].grad = global_state[name] - averages[name]
        self._optimizer.step()
        for name in self._names:
            global_state[name].grad = None

    def state_dict(self) -> dict:
        return {} if self._optimizer is None else self._optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if state and self._optimizer is not None:
            self._optimizer.load_state_dict(state)
