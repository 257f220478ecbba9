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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

SERVER_OPTIMIZERS = ("sgd", "adam")


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
            torch._foreach_add_([self._sums[k] for k in self._shared], [state[k] for k in self._shared], alpha=n)
        if self._adaptor:
            joint = n * torch.softmax(logits.detach().float(), dim=-1)
            sums = [self._sums[k] for k in self._adaptor]
            weights = [joint.to(s).view(-1, *([1] * (s.dim() - 1))) for s in sums]
            torch._foreach_addcmul_(sums, [state[k] for k in self._adaptor], weights)
            self._adaptor_total = joint if self._adaptor_total is None else self._adaptor_total + joint
        for k in self._integer:
            self._max[k] = state[k].clone() if k not in self._max else torch.maximum(self._max[k], state[k])
        self._shared_total += n
        self.num_clients += 1

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


def aggregate(
    global_state: Mapping[str, torch.Tensor], roles: Mapping[str, str], updates: Iterable[ClientUpdate]
) -> dict[str, torch.Tensor]:
    """The new global tensors from a round's client updates (the rule in the module docstring)."""
    aggregator = StreamingAggregator(global_state, roles)
    for update in updates:
        aggregator.add(update.state, update.num_samples, update.logits)
    return aggregator.result(global_state)


class ServerOptimizer:
    """Moves the global model towards the clients' average, treating ``x_prev - x_avg`` as a gradient.

    ``sgd`` with ``lr=1`` and no momentum is plain averaging (FedAvg), applied as an exact copy; momentum
    gives FedAvgM, ``adam`` gives FedAdam. Shared and adaptor tensors have separate learning rates
    (``adaptor_lr`` defaults to ``lr``). Buffers (norm statistics) are not optimised: they take the average.

    Args:
        name: ``"sgd"`` or ``"adam"``.
        lr: server learning rate of the shared (base) tensors.
        adaptor_lr: server learning rate of the adaptor tensors (``None``: same as ``lr``).
        momentum: SGD momentum (FedAvgM).
        betas: Adam's betas.
        eps: Adam's epsilon (adaptivity; FedAdam papers use 1e-3 or smaller).
    """

    def __init__(
        self,
        name: str = "sgd",
        lr: float = 1.0,
        adaptor_lr: float | None = None,
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
    ) -> None:
        if name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server optimizer {name!r}: expected one of {SERVER_OPTIMIZERS}")
        if lr <= 0 or (adaptor_lr is not None and adaptor_lr <= 0):
            raise ValueError(f"server learning rates must be > 0 (lr={lr}, adaptor_lr={adaptor_lr})")
        self.name, self.lr, self.momentum, self.betas, self.eps = name, lr, momentum, betas, eps
        self.adaptor_lr = lr if adaptor_lr is None else adaptor_lr
        self._optimizer: torch.optim.Optimizer | None = None
        self._names: list[str] = []

    @property
    def is_plain_average(self) -> bool:
        return self.name == "sgd" and self.lr == 1.0 and self.adaptor_lr == 1.0 and self.momentum == 0.0

    def bind(self, global_state: Mapping[str, torch.Tensor], roles: Mapping[str, str], trainable: set[str]) -> None:
        """Attach to the global tensors that ``step`` updates in place; ``trainable`` names the parameters
        (optimised), everything else (buffers) takes the average."""
        self._names = [n for n in global_state if n in trainable and global_state[n].is_floating_point()]
        groups = []
        for role, lr in (("shared", self.lr), ("adaptor", self.adaptor_lr)):
            params = [global_state[n] for n in self._names if roles[n] == role]
            if params:
                groups.append({"params": params, "lr": lr})
        self._optimizer = None
        if groups and self.name == "sgd":
            self._optimizer = torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)
        elif groups:
            self._optimizer = torch.optim.Adam(groups, lr=self.lr, betas=self.betas, eps=self.eps)

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
