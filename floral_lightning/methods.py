"""The baselines of spec §4 as ``FloralModule`` subclasses, each selectable by ``model.class_path``.

=======================  ==========================================================================
``FedAvgModule``          one global model (``FloralModule`` with ``num_adaptors=0``)
``LocalAdaptorModule``    FLoRAL with C = 1 whose adaptor stays with its client (never averaged)
``EnsembleModule``        C full copies of the base mixed on the logits by the router (FedEM-like)
``FedProxModule``         FedAvg (or FLoRAL) with the proximal term ``mu/2 ||w - w_global||^2``
``DittoModule``           FedAvg plus a personal model per client, regularised towards the global one
``FineTuneModule``        FedAvg whose evaluation fine-tunes the global weights on each client first
=======================  ==========================================================================

Private per-client state (local adaptors, Ditto's personal models) lives in a :class:`ClientStates`
inside the module, so it is saved in checkpoints and restored on resume, and it is never part of
``federated_state()``: the round loop and the aggregator never see it. Evaluation batches mix clients;
these methods score every sample with its own client's weights (``evaluation_outputs``), running each
client's samples with ``torch.func.functional_call`` on its stored tensors, so the live model is never
modified during evaluation. Every method takes the ``task`` option (``task=regression`` for the synthetic tasks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from . import foreach
from .ensemble import EnsembleModel
from .module import ClientOptimizer, FloralModule, RouterOptions
from .seeding import Stream, seed_global_rng, seeded_generator

__all__ = [
    "ClientStates",
    "DittoModule",
    "EnsembleModule",
    "FedAvgModule",
    "FedProxModule",
    "FineTuneModule",
    "LocalAdaptorModule",
    "per_client_outputs",
]


class ClientStates(nn.Module):
    """Per-client copies of named private tensors: one buffer ``[K, *shape]`` per tensor.

    Being buffers, the copies are in the owning module's ``state_dict`` (checkpointed, restored on resume)
    and follow it across devices. Every client starts from the ``initial`` values. Tensors are matched by
    their exact names (``load``/``store`` reject a mapping with other names).

    Args:
        num_clients: K.
        initial: the tensors by name (their current values initialise every client).
    """

    def __init__(self, num_clients: int, initial: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        if num_clients < 1:
            raise ValueError(f"num_clients={num_clients}: must be >= 1")
        self.names: list[str] = list(initial)
        self._keys: dict[str, str] = {}
        for name, tensor in initial.items():
            key = name.replace(".", "__")  # buffer names cannot contain dots
            if key in self._buffers:
                raise ValueError(f"private tensors {name!r} and another one map to the same buffer name {key!r}")
            t = tensor.detach()
            self.register_buffer(key, t.unsqueeze(0).repeat(num_clients, *([1] * t.dim())).clone())
            self._keys[name] = key

    @property
    def num_clients(self) -> int:
        return next(iter(self._buffers.values())).shape[0] if self._buffers else 0

    def _stored(self, name: str) -> torch.Tensor:
        return self._buffers[self._keys[name]]

    def client(self, k: int) -> dict[str, torch.Tensor]:
        """Client ``k``'s tensors by name (views into the stored copies)."""
        self._check_client(k)
        return {n: self._stored(n)[k] for n in self.names}

    def _check_client(self, k: int) -> None:
        if not 0 <= k < self.num_clients:
            raise IndexError(f"client {k} out of range; valid ids are 0..{self.num_clients - 1}")

    def _check_names(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.names):
            missing, unexpected = set(self.names) - set(tensors), set(tensors) - set(self.names)
            raise KeyError(f"private tensors do not match: missing {sorted(missing)}, unexpected {sorted(unexpected)}")

    @torch.no_grad()
    def load(self, k: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy client ``k``'s stored values into ``tensors`` (the live tensors, in place)."""
        self._check_client(k)
        self._check_names(tensors)
        if self.names:
            foreach.copy_([tensors[n] for n in self.names], [self._stored(n)[k] for n in self.names])

    @torch.no_grad()
    def store(self, k: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (client ``k``'s trained values) into its stored copies."""
        self._check_client(k)
        self._check_names(tensors)
        if self.names:
            foreach.copy_([self._stored(n)[k] for n in self.names], [tensors[n] for n in self.names])

    def extra_repr(self) -> str:
        return f"num_clients={self.num_clients}, tensors={len(self.names)}"


def per_client_outputs(
    x: torch.Tensor, client_ids: torch.Tensor, forward: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``forward(k, x_k)`` on each client's samples of a mixed batch, put back in batch order."""
    clients = torch.unique(client_ids)
    if len(clients) <= 1:
        # an empty batch (a process without evaluation samples, see floral_lightning.distributed) still needs
        # outputs of the right shape: any client's forward of no samples gives them
        return forward(int(clients[0]) if len(clients) else 0, x)
    out: torch.Tensor | None = None
    for k in clients.tolist():
        idx = (client_ids == k).nonzero().squeeze(1)
        part = forward(k, x.index_select(0, idx))
        if out is None:
            out = part.new_empty((len(x), *part.shape[1:]))
        out.index_copy_(0, idx, part)
    return out


def squared_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``sum_n ||a[n] - b[n]||^2`` over the names of ``b``."""
    return sum((a[n] - t).pow(2).sum() for n, t in b.items())


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``module`` by name."""
    return dict(module.named_parameters()) | dict(module.named_buffers())


def _no_fixed_arg(kwargs: dict, name: str, value: Any, cls: str) -> None:
    """Reject an argument a method fixes (e.g. ``num_adaptors``) unless it has the fixed value."""
    if name in kwargs and kwargs.pop(name) != value:
        raise ValueError(f"{cls} fixes {name}={value}")


class FedAvgModule(FloralModule):
    """FedAvg: one global model, no adaptors (``FloralModule`` with ``num_adaptors=0``).

    Args:
        base: the network.
        num_clients: K.
        **kwargs: further ``FloralModule`` options (``optimizer``, ...).
    """

    hparams_not_saved = ("num_adaptors",)  # fixed to 0

    def __init__(self, base: nn.Module, num_clients: int = 1, **kwargs: Any) -> None:
        _no_fixed_arg(kwargs, "num_adaptors", 0, type(self).__name__)
        super().__init__(base, num_clients, num_adaptors=0, **kwargs)


class LocalAdaptorModule(FloralModule):
    """FLoRAL with one adaptor per layer that is private to each client: the base is federated, each client's
    adaptor (all role-``adaptor`` tensors of the ``FloralModel``, matched by exact name) is stored in
    ``client_states`` and never averaged.

    A client loads its adaptor in ``on_client_start`` and stores it back in ``on_client_end``; clients not
    sampled keep theirs unchanged. The one-adaptor router is frozen (its mixture is always 1).

    Args:
        base: the network.
        num_clients: K.
        **kwargs: further ``FloralModule`` options (``rank``, ``targets``, ``optimizer``, ...).
    """

    hparams_not_saved = ("num_adaptors",)  # fixed to 1

    def __init__(self, base: nn.Module, num_clients: int = 1, **kwargs: Any) -> None:
        _no_fixed_arg(kwargs, "num_adaptors", 1, type(self).__name__)
        super().__init__(base, num_clients, num_adaptors=1, **kwargs)
        self.model.router.logits.requires_grad_(False)
        self.private_names: tuple[str, ...] = tuple(n for n, r in self.model.roles.items() if r == "adaptor")
        self.client_states = ClientStates(num_clients, self.private_tensors())

    def private_tensors(self) -> dict[str, torch.Tensor]:
        """The live adaptor tensors (names inside ``model``)."""
        tensors = _tensors(self.model)
        return {n: tensors[n] for n in self.private_names}

    def federated_state(self) -> dict[str, torch.Tensor]:
        private = set(self.private_names)
        return {n: t for n, t in super().federated_state().items() if n not in private}

    def federated_roles(self) -> dict[str, str]:
        private = set(self.private_names)
        return {n: r for n, r in super().federated_roles().items() if n not in private}

    has_private_networks = True

    def client_mixtures(self) -> None:
        """No mixtures to report (one adaptor)."""
        return None

    @torch.no_grad()
    def client_model(self, client_id: int) -> nn.Module:
        """The current base with client ``client_id``'s own adaptor folded in (a plain copy of the base)."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.client_states.client(client_id), strict=False)
        return model.client_network(client_id).eval()

    def client_tables(self) -> list[torch.Tensor]:
        """The router's logits and every client's stored private tensors (``client_states``)."""
        return [*super().client_tables(), *self.client_states.buffers()]

    def on_client_start(self, client_id: int) -> None:
        super().on_client_start(client_id)
        self.client_states.load(client_id, self.private_tensors())

    def on_client_end(self, client_id: int) -> None:
        self.client_states.store(client_id, self.private_tensors())
        super().on_client_end(client_id)

    def client_outputs(self, x: torch.Tensor, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s predictions: the current base with its own stored adaptor."""
        # one id per sample: the factorised path, which for a client's few samples beats merging the weights
        ids = torch.full((len(x),), client_id, dtype=torch.long, device=x.device)
        return functional_call(self.model, self.client_states.client(client_id), (x, ids))

    def evaluation_outputs(self, x: torch.Tensor, client_ids: torch.Tensor) -> torch.Tensor:
        return per_client_outputs(x, client_ids, lambda k, xk: self.client_outputs(xk, k))


class EnsembleModule(FloralModule):
    """C full copies of ``base`` mixed per client on the logits, member c averaged with p(k|c) (FedEM-like).

    The router is FLoRAL's (``router``: learned, or ``oracle: true`` for the true clusters). See
    :class:`~floral_lightning.ensemble.EnsembleModel`. The members train with ``optimizer.adaptor_lr``
    (default ``optimizer.lr``), the router with ``optimizer.router_lr``.

    Args:
        base: the network (copied C times).
        num_clients: K.
        num_members: C.
        router: the mixture rule and its options.
        optimizer: the client optimizer.
        task: what outputs are scored by (see ``FloralModule``).
        lr_scheduler: the learning-rate schedule over rounds (see ``FloralModule``).
    """

    # the FloralModule options that mean nothing to the Ensemble
    hparams_not_saved = (
        "num_adaptors",
        "rank",
        "conv_split",
        "init",
        "alpha",
        "bias",
        "min_rank",
        "targets",
        "precondition",
    )

    def __init__(
        self,
        base: nn.Module,
        num_clients: int = 1,
        num_members: int = 4,
        router: RouterOptions | None = None,
        optimizer: ClientOptimizer | None = None,
        task: str | None = None,
        lr_scheduler: dict | None = None,
    ) -> None:
        super().__init__(
            base, num_clients, num_adaptors=0, router=router, optimizer=optimizer, task=task, lr_scheduler=lr_scheduler
        )
        router_kwargs = self.router_options.mixture_options()
        # the built base network (``base`` may be its spec), which FloralModule wrapped as a SharedModel
        self.model = EnsembleModel(self.model.base, num_clients, num_members, router_kwargs)

    has_private_networks = True  # its client_model is the C members mixed by the client's mixture


class FedProxModule(FloralModule):
    """FedAvg (or FLoRAL with ``num_adaptors > 0``) with the proximal term ``mu/2 ||w - w_global||^2`` over the
    federated parameters added to each client's local loss (its ``local_penalty``; ``w_global``: the weights the
    client started from). Logged per round as ``train/local_penalty``. Its clients train at once under
    ``federated.vectorise`` like FedAvg's.

    Args:
        base: the network.
        num_clients: K.
        mu: the proximal coefficient (0 is FedAvg / FLoRAL).
        num_adaptors: C (0: FedAvg).
        **kwargs: further ``FloralModule`` options.
    """

    def __init__(
        self, base: nn.Module, num_clients: int = 1, mu: float = 0.01, num_adaptors: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(base, num_clients, num_adaptors=num_adaptors, **kwargs)
        if mu < 0:
            raise ValueError(f"mu={mu}: must be >= 0")
        self.mu = mu

    def local_penalty(
        self, params: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """``mu/2 ||w - w_global||^2`` over the trained federated parameters (``None`` for ``mu = 0``)."""
        if self.mu == 0:
            return None
        return 0.5 * self.mu * squared_distance(params, start)

    def proximal_term(self) -> torch.Tensor | None:
        """``||w - w_global||^2`` over the federated parameters, or ``None`` outside a client's training."""
        if self._client_start is None:
            return None
        return squared_distance(self.trained_federated_parameters(), self._client_start)


class DittoModule(FloralModule):
    """Ditto: the global model trains as in FedAvg; each client also trains a personal model ``v_k`` on the
    same batches with ``loss(v_k) + lam/2 ||v_k - w_global||^2`` (``w_global``: the global weights when the
    client starts, detached). Evaluation uses each client's personal model.

    ``personal`` is the live personal model (a copy of the base architecture); every client's copy lives in
    ``client_states`` (names inside ``personal``), initialised to the initial global weights. One optimizer
    holds both models (the personal one in its own group with ``personal_lr``); the personal model is not
    part of ``federated_state()``.

    Args:
        base: the network.
        num_clients: K.
        lam: the coefficient pulling personal models towards the global one.
        personal_lr: learning rate of the personal models (``None``: ``optimizer.lr``).
        **kwargs: further ``FloralModule`` options (``optimizer``, ...).
    """

    hparams_not_saved = ("num_adaptors",)  # fixed to 0

    def __init__(
        self, base: nn.Module, num_clients: int = 1, lam: float = 0.1, personal_lr: float | None = None, **kwargs: Any
    ) -> None:
        _no_fixed_arg(kwargs, "num_adaptors", 0, type(self).__name__)
        super().__init__(base, num_clients, num_adaptors=0, **kwargs)
        if lam < 0:
            raise ValueError(f"lam={lam}: must be >= 0")
        self.lam = lam
        self.personal_lr = personal_lr
        self.personal = copy.deepcopy(self.model)
        self.client_states = ClientStates(num_clients, self.private_tensors())
        self._anchor: list[tuple[torch.Tensor, torch.Tensor]] = []

    has_private_networks = True

    def private_tensors(self) -> dict[str, torch.Tensor]:
        """The live personal model's tensors (names inside ``personal``)."""
        return _tensors(self.personal)

    @torch.no_grad()
    def client_model(self, client_id: int) -> nn.Module:
        """Client ``client_id``'s personal model (what Ditto evaluates)."""
        personal = copy.deepcopy(self.personal)
        personal.load_state_dict(self.client_states.client(client_id), strict=False)
        return personal.client_network(client_id).eval()

    def client_tables(self) -> list[torch.Tensor]:
        """The router's logits and every client's stored private tensors (``client_states``)."""
        return [*super().client_tables(), *self.client_states.buffers()]

    def on_client_start(self, client_id: int) -> None:
        super().on_client_start(client_id)
        self.client_states.load(client_id, self.private_tensors())
        global_params = dict(self.model.named_parameters())
        self._anchor = [(v, global_params[n].detach().clone()) for n, v in self.personal.named_parameters()]

    def on_client_end(self, client_id: int) -> None:
        self.client_states.store(client_id, self.private_tensors())
        self._anchor = []
        super().on_client_end(client_id)

    def configure_client_optimizer(self) -> torch.optim.Optimizer:
        optimizer = super().configure_client_optimizer()
        lr = self.personal_lr if self.personal_lr is not None else self.optimizer_options.lr
        optimizer.add_param_group({"params": list(self.personal.parameters()), "lr": lr})
        return optimizer

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        x, y, _ = batch
        personal_loss = self.compute_loss(self.personal(x), y)
        # the round's mean: one point per round, the round as its step (RunReport)
        self.log("train/personal_loss", personal_loss, batch_size=len(x), on_epoch=True, on_step=False)
        if self.lam > 0 and self._anchor:
            personal_loss = personal_loss + 0.5 * self.lam * sum((v - w).pow(2).sum() for v, w in self._anchor)
        return loss + personal_loss

    def client_outputs(self, x: torch.Tensor, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s predictions by its stored personal model."""
        return functional_call(self.personal, self.client_states.client(client_id), (x,))

    def evaluation_outputs(self, x: torch.Tensor, client_ids: torch.Tensor) -> torch.Tensor:
        return per_client_outputs(x, client_ids, lambda k, xk: self.client_outputs(xk, k))


class FineTuneModule(FloralModule):
    """FedAvg (or FLoRAL with ``num_adaptors > 0``) evaluated after local fine-tuning.

    At evaluation, each client fine-tunes a copy of the current global weights for ``finetune_epochs``
    passes over its own train split (batches of the data module's ``batch_size``, prepared like training
    batches, shuffled by a generator seeded with (data seed, round, client, epoch); dropout seeded the same
    way, the global RNG untouched), with the client optimizer's kind, momentum and weight decay at
    ``finetune_lr`` (default ``optimizer.lr``), and is scored with those weights. The global model is never
    modified, so training is unaffected. Fine-tuning is deterministic, so a client is fine-tuned once per
    evaluation when the loader serves clients in order (``ClientEvalLoader`` does); the cost is about one
    round with every client per evaluation.

    Args:
        base: the network.
        num_clients: K.
        finetune_epochs: passes over the client's train split (0: evaluate the global weights, as FedAvg).
        finetune_lr: fine-tuning learning rate (``None``: ``optimizer.lr``).
        num_adaptors: C (0: FedAvg).
        **kwargs: further ``FloralModule`` options.
    """

    def __init__(
        self,
        base: nn.Module,
        num_clients: int = 1,
        finetune_epochs: int = 1,
        finetune_lr: float | None = None,
        num_adaptors: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(base, num_clients, num_adaptors=num_adaptors, **kwargs)
        if finetune_epochs < 0:
            raise ValueError(f"finetune_epochs={finetune_epochs}: must be >= 0")
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self._finetuned: dict[int, dict[str, torch.Tensor]] = {}
        self._tuner: list[nn.Module] = []  # a plain list: the working copy is not part of the module

    def finetuned_state(self, client_id: int) -> dict[str, torch.Tensor]:
        """Client ``client_id``'s fine-tuned copy of the current global weights (names inside ``model``)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "client_split"):
            raise RuntimeError("FineTuneModule evaluates with a federated data module (client_split) attached")
        x_all, y_all = datamodule.client_split(client_id, "train")
        prep = datamodule.train_dataloader().prep
        batch_size = int(datamodule.batch_size)
        round_idx = int(self.current_epoch)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=devices):
            if not self._tuner:
                self._tuner.append(copy.deepcopy(self.model))
            tuner = self._tuner[0]
            tuner.load_state_dict(self.model.state_dict())
            tuner.train()
            params = [p for p in tuner.parameters() if p.requires_grad]
            optimizer = self._finetune_optimizer(params)
            n = len(y_all)
            for epoch in range(self.finetune_epochs if n else 0):
                g = seeded_generator(getattr(datamodule, "seed", 0), Stream.FINETUNE, round_idx, client_id, epoch)
                seed_global_rng(g.initial_seed())  # dropout
                perm = torch.randperm(n, generator=g)
                for start in range(0, n, batch_size):
                    idx = perm[start : start + batch_size]
                    x = prep(x_all.index_select(0, idx), g).to(self.device)
                    y = y_all.index_select(0, idx).to(self.device)
                    optimizer.zero_grad(set_to_none=True)
                    self.compute_loss(tuner(x, client_id), y).backward()
                    optimizer.step()
            return {name: t.detach().clone() for name, t in _tensors(tuner).items()}

    @torch.no_grad()
    def client_model(self, client_id: int) -> nn.Module:
        """Client ``client_id``'s model as evaluated: the global weights fine-tuned on its train split now
        (needs the Trainer and its federated data module attached)."""
        if self.finetune_epochs == 0:
            return super().client_model(client_id)
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.finetuned_state(client_id), strict=False)
        return model.client_network(client_id).eval()

    def _finetune_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        opt = self.optimizer_options
        lr = self.finetune_lr if self.finetune_lr is not None else opt.lr
        if opt.name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        return torch.optim.Adam(params, lr=lr, weight_decay=opt.weight_decay)

    def client_outputs(self, x: torch.Tensor, client_id: int) -> torch.Tensor:
        """Client ``client_id``'s predictions by its fine-tuned weights (fine-tuned now unless cached)."""
        state = self._finetuned.get(client_id)
        if state is None:
            state = self.finetuned_state(client_id)
            self._finetuned[client_id] = state
        return functional_call(self.model, state, (x, client_id))

    def evaluation_outputs(self, x: torch.Tensor, client_ids: torch.Tensor) -> torch.Tensor:
        if self.finetune_epochs == 0:
            return super().evaluation_outputs(x, client_ids)
        clients = torch.unique(client_ids).tolist()
        # keep only this batch's clients: a client whose samples span two batches is fine-tuned once
        self._finetuned = {k: s for k, s in self._finetuned.items() if k in clients}
        return per_client_outputs(x, client_ids, lambda k, xk: self.client_outputs(xk, k))

    def _reset_finetuning(self) -> None:
        self._finetuned = {}
        self._tuner = []

    def on_validation_epoch_start(self) -> None:
        self._reset_finetuning()

    def on_validation_epoch_end(self) -> None:
        self._reset_finetuning()
        super().on_validation_epoch_end()

    def on_test_epoch_start(self) -> None:
        self._reset_finetuning()

    def on_test_epoch_end(self) -> None:
        self._reset_finetuning()
        super().on_test_epoch_end()
