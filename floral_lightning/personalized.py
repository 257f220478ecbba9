"""The contract of a personalised federated model, and the plain shared model (FedAvg) that fulfils it.

``FloralModule``, the round loop and the aggregation rule ask a model only what this class declares:

- ``forward(x, client_ids)``: predictions personalised to an ``int`` client id or one id per sample;
- ``roles``: every parameter and buffer is ``shared`` (averaged with weights p(k)), ``adaptor`` (stacked with a
  leading dim C, slice c averaged with p(k|c)) or ``private`` (a client's own, never averaged);
- ``router``: the ``ClientMixtures`` table of the clients' mixtures, or ``None`` for a model without one.

Everything else (parameter groups, the federated state, each client's logits and mixtures) follows from
these. A new personalised method subclasses ``PersonalizedModel``, sets ``roles`` and ``router``, and needs
no change in the trainer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from .router import ClientMixtures

Role = Literal["shared", "adaptor", "private"]


@dataclass(frozen=True)
class ParameterOverhead:
    """Parameter counts of a personalised model: the base, the C adaptors, and the router (K x C)."""

    base: int
    adaptors: int
    router: int
    num_clients: int
    num_adaptors: int

    @property
    def adaptor_percent(self) -> float:
        """Adaptor parameters as a percentage of the base model's."""
        return 100.0 * self.adaptors / max(self.base, 1)

    @property
    def per_client(self) -> int:
        """Private parameters per client: its C mixture logits."""
        return self.num_adaptors

    def as_markdown(self) -> str:
        return (
            "| part | parameters | % of base |\n|---|---:|---:|\n"
            f"| base (shared) | {self.base:,} | 100.00 |\n"
            f"| adaptors (C={self.num_adaptors}, federated) | {self.adaptors:,} | {self.adaptor_percent:.2f} |\n"
            f"| router (K={self.num_clients} x C, private) | {self.router:,} | "
            f"{100.0 * self.router / max(self.base, 1):.2f} |\n"
            f"| per client (private) | {self.per_client} | - |"
        )

    def __str__(self) -> str:
        return self.as_markdown()


class PersonalizedModel(nn.Module):
    """Base class of the models ``FloralModule`` trains: see the module docstring for the contract.

    Subclasses call ``super().__init__()``, build their tensors, set ``self.router`` (or leave it ``None``) and
    finally ``self._roles = self.assign_roles()`` (or a dict of their own).
    """

    #: C, the number of adaptors (or members) a mixture weights; 0 for a model without a router
    num_adaptors: int = 0

    def __init__(self) -> None:
        super().__init__()
        # an instance attribute, not a class one: nn.Module keeps submodules in _modules, which a class
        # attribute of the same name would shadow
        self.router: ClientMixtures | None = None
        self._roles: dict[str, Role] = {}

    def forward(self, x: torch.Tensor, client_ids: int | torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x, client_ids)")

    # --- roles ---------------------------------------------------------------------------------------------
    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter, then every buffer, by name."""
        yield from self.named_parameters()
        yield from self.named_buffers()

    @property
    def roles(self) -> dict[str, Role]:
        """Every parameter's and buffer's role: ``shared``, ``adaptor`` (leading dim C) or ``private``."""
        return dict(self._roles)

    def _by_role(self, role: Role, buffers: bool) -> list[tuple[str, torch.Tensor]]:
        source = self.named_buffers() if buffers else self.named_parameters()
        return [(n, t) for n, t in source if self._roles[n] == role]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters federated with weights p(k)."""
        return [p for _, p in self._by_role("shared", buffers=False)]

    def adaptor_parameters(self, index: int | None = None) -> list[torch.Tensor]:
        """The stacked adaptor parameters (leading dim C), or views of adaptor ``index`` alone."""
        params = [p for _, p in self._by_role("adaptor", buffers=False)]
        return params if index is None else [p[index] for p in params]

    def private_parameters(self) -> list[nn.Parameter]:
        """Per-client parameters that are never averaged (the router logits)."""
        return [p for _, p in self._by_role("private", buffers=False)]

    def shared_buffers(self) -> list[torch.Tensor]:
        return [b for _, b in self._by_role("shared", buffers=True)]

    def adaptor_buffers(self) -> list[torch.Tensor]:
        return [b for _, b in self._by_role("adaptor", buffers=True)]

    def federated_state(self) -> dict[str, torch.Tensor]:
        """Shared and adaptor tensors (parameters and buffers) by name: what the server averages."""
        return {n: t for n, t in self.named_tensors() if self._roles[n] != "private"}

    def federated_roles(self) -> dict[str, Role]:
        """``shared`` or ``adaptor`` for every tensor of ``federated_state``."""
        return {n: r for n, r in self._roles.items() if r != "private"}

    # --- clients -------------------------------------------------------------------------------------------
    def client_logits(self, client_id: int) -> torch.Tensor:
        """A client's router logits (what weights its adaptor updates); a single zero logit without a router."""
        if self.router is None:
            return torch.zeros(1)
        return self.router.logits[client_id].detach()

    def client_mixtures(self) -> torch.Tensor | None:
        """All clients' mixtures ``softmax(theta / T)`` [K, C] (rows sum to 1), or ``None`` without a router."""
        if self.router is None:
            return None
        return torch.softmax(self.router.logits.detach() / self.router.temperature, dim=-1)

    def client_network(self, client_id: int) -> nn.Module:
        """Client ``client_id``'s personalised network as a plain module (no router, no client ids)."""
        raise TypeError(f"{type(self).__name__} does not define client_network(client_id)")

    # --- training extras -------------------------------------------------------------------------------------
    def precondition_gradients_(self, eps: float = 1e-5) -> None:
        """Precondition factor gradients before an optimizer step; models without factors do nothing."""

    def overhead(self) -> ParameterOverhead:
        """Parameter counts by role (shared = base, adaptor, private = router)."""
        count = {"shared": 0, "adaptor": 0, "private": 0}
        for name, p in self.named_parameters():
            count[self._roles[name]] += p.numel()
        return ParameterOverhead(
            base=count["shared"],
            adaptors=count["adaptor"],
            router=count["private"],
            num_clients=0 if self.router is None else self.router.num_clients,
            num_adaptors=self.num_adaptors,
        )


class SharedModel(PersonalizedModel):
    """One model for every client (FedAvg): ``base`` with every tensor ``shared`` and no router.

    ``forward`` accepts client ids and ignores them, so the trainer treats it like any personalised model.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self._roles = dict.fromkeys((n for n, _ in self.named_tensors()), "shared")

    def forward(self, x: torch.Tensor, client_ids: int | torch.Tensor | None = None) -> torch.Tensor:
        return self.base(x)

    def client_network(self, client_id: int) -> nn.Module:
        """A copy of the one network every client shares."""
        return copy.deepcopy(self.base)
