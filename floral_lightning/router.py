"""The router: every client's private mixture logits in one K x C table (spec §1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NOISE_KINDS = ("uniform", "gaussian", "none")


class ClientMixtures(nn.Module):
    """Mixture logits ``theta`` for all K clients, and the rule that turns them into mixtures.

    ``pi_k = softmax((theta_k + noise) / temperature)`` (noise only in training), then
    ``w_k = max(pi_k, min_prob)`` (not renormalised, as in the reference), then optionally only the
    ``top_k`` largest entries kept. Looking up one client (an ``int``) gives a ``[C]`` mixture, which the
    layers run on the merged path; a batch of ids (a ``LongTensor [B]``) gives ``[B, C]``, the
    factorised path. Only rows that are looked up receive gradients, so a client's row changes only when
    that client trains (the router's optimizer group must not use weight decay; ``FloralModule`` sees to
    that).

    Args:
        num_clients: K, the number of registered clients.
        num_adaptors: C, the number of adaptors per layer.
        temperature: softmax temperature T.
        noise: ``"uniform"`` (``noise_std * U[0, 1)``, the reference), ``"gaussian"`` (``noise_std * N(0, 1)``)
            or ``"none"``.
        noise_std: scale of the training noise.
        min_prob: floor on each mixture weight.
        top_k: keep only the k largest weights per mixture (``None``: keep all).
        entropy_penalty: coefficient of the mixture entropy added to the loss; positive values make
            mixtures sharper, negative values smoother.
    """

    def __init__(
        self,
        num_clients: int,
        num_adaptors: int,
        *,
        temperature: float = 1.0,
        noise: str = "uniform",
        noise_std: float = 1.0,
        min_prob: float = 0.01,
        top_k: int | None = None,
        entropy_penalty: float = 0.0,
    ) -> None:
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"num_clients={num_clients}: must be >= 1")
        if num_adaptors < 1:
            raise ValueError(f"num_adaptors={num_adaptors}: must be >= 1")
        if noise not in NOISE_KINDS:
            raise ValueError(f"noise={noise!r}: expected one of {NOISE_KINDS}")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: must be > 0")
        if top_k is not None and not 1 <= top_k <= num_adaptors:
            raise ValueError(f"top_k={top_k}: must be None or in [1, num_adaptors={num_adaptors}]")
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"min_prob={min_prob}: must lie in [0, 1)")
        self.temperature = temperature
        self.noise = noise
        self.noise_std = noise_std
        self.min_prob = min_prob
        self.top_k = top_k
        self.entropy_penalty = entropy_penalty
        self.logits = nn.Parameter(torch.zeros(num_clients, num_adaptors))

    @property
    def num_clients(self) -> int:
        return self.logits.shape[0]

    @property
    def num_adaptors(self) -> int:
        return self.logits.shape[1]

    def forward(self, client_ids: int | torch.Tensor) -> torch.Tensor:
        """The mixture weights ``w`` for one client (``[C]``) or a batch of clients (``[B, C]``)."""
        theta = self.logits[client_ids]
        noise = None
        if self.draws_noise:
            noise = (torch.rand_like if self.noise == "uniform" else torch.randn_like)(theta)
        return self.mix(theta, noise)

    @property
    def draws_noise(self) -> bool:
        """Whether a forward now draws training noise (train mode, a noise kind, a positive scale)."""
        return self.training and self.noise != "none" and self.noise_std > 0

    def draw_noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Unit noise of ``shape`` from ``generator``: the draw ``forward`` makes from the global RNG, where
        ``generator`` is seeded as the global RNG was (the vectorised round loop replays a client's draws)."""
        draw = torch.rand if self.noise == "uniform" else torch.randn
        return draw(shape, generator=generator, device=generator.device, dtype=self.logits.dtype)

    def mix(self, theta: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The rule of the class docstring applied to logits ``theta`` (``[C]`` or ``[B, C]``) and unit training
        ``noise`` of the same shape (``None``: no noise). A pure function of its inputs (``torch.func.vmap``
        runs it once per client)."""
        # Called once per training step: scaling by 1 is skipped (the result is the same bit for bit), since
        # each op is a fixed cost next to a small model's step.
        if noise is not None:
            theta = theta + (noise if self.noise_std == 1.0 else self.noise_std * noise)
        if self.temperature != 1.0:
            theta = theta / self.temperature
        w = F.softmax(theta, dim=-1)
        if self.min_prob > 0:
            w = w.clamp_min(self.min_prob)
        if self.top_k is not None and self.top_k < self.num_adaptors:
            keep = torch.zeros_like(w).scatter_(-1, w.topk(self.top_k, dim=-1).indices, 1.0)
            w = w * keep
        return w

    def probabilities(self, client_ids: int | torch.Tensor | None = None) -> torch.Tensor:
        """``p(c|k) = softmax(theta_k)``: no noise, temperature or floor (what the aggregation rule uses)."""
        theta = self.logits if client_ids is None else self.logits[client_ids]
        return F.softmax(theta.detach(), dim=-1)

    def entropy(self, client_ids: int | torch.Tensor) -> torch.Tensor:
        """Mean entropy of ``softmax(theta_k / T)`` over the given clients (differentiable)."""
        return self.entropy_of(self.logits[client_ids])

    def entropy_of(self, theta: torch.Tensor) -> torch.Tensor:
        """Mean entropy of ``softmax(theta / T)`` over the rows of logits ``theta`` (``[C]`` or ``[B, C]``)."""
        log_p = F.log_softmax(theta / self.temperature, dim=-1)
        return -(log_p.exp() * log_p).sum(-1).mean()

    def entropy_loss(self, client_ids: int | torch.Tensor) -> torch.Tensor | None:
        """``entropy_penalty * entropy``, or ``None`` when the penalty is zero."""
        if self.entropy_penalty == 0:
            return None
        return self.entropy_penalty * self.entropy(client_ids)

    @torch.no_grad()
    def set_oracle(self, clusters: torch.Tensor) -> None:
        """Fix every client's logits to its true cluster (0 there, -100 elsewhere) and freeze them."""
        clusters = torch.as_tensor(clusters, dtype=torch.long, device=self.logits.device)
        if clusters.shape != (self.num_clients,):
            raise ValueError(f"oracle clusters of shape {tuple(clusters.shape)}: expected ({self.num_clients},)")
        if clusters.min() < 0 or clusters.max() >= self.num_adaptors:
            raise ValueError(
                f"oracle clusters must lie in [0, {self.num_adaptors}); got [{clusters.min()}, {clusters.max()}]"
            )
        self.logits.fill_(-100.0)
        self.logits.scatter_(1, clusters[:, None], 0.0)
        self.logits.requires_grad_(False)

    @property
    def frozen(self) -> bool:
        return not self.logits.requires_grad

    def extra_repr(self) -> str:
        return (
            f"num_clients={self.num_clients}, num_adaptors={self.num_adaptors}, temperature={self.temperature}, "
            f"noise={self.noise!r}, noise_std={self.noise_std}, min_prob={self.min_prob}, top_k={self.top_k}"
        )
