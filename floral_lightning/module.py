"""``FloralModule``: the LightningModule that trains a FLoRAL model on batches tagged with client ids.

The round loop (sampling clients, resetting weights, averaging) lives in ``callbacks.FederatedCallback``;
this module only knows how one client trains on one batch and how every client is evaluated. Subclass it
for a new task by overriding ``compute_loss`` and ``compute_metrics``.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn

from .metrics import PerClientMean, adjusted_rand_index, summarize_clients
from .model import FloralModel
from .personalized import PersonalizedModel, SharedModel
from .pretrained import build_module, save_pretrained
from .router import ClientMixtures
from .router_init import clustered_start
from .seeding import run_seed
from .tasks import Task, get_task
from .vectorised import RoundBatch

CLIENT_OPTIMIZERS = ("sgd", "adam")


@dataclass
class Targets:
    """Which layers get adaptors: type switches, narrowed by PEFT-style name patterns.

    ``target_modules`` (a regex string matched against whole names, or a list of names/suffixes) selects
    layers by name instead of by the type switches; ``exclude_modules`` removes layers.
    """

    linear: bool = True
    conv: bool = True
    norm: bool = False
    embedding: bool = False
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None


#: how the router's logits start: ``zeros`` (the paper: every mixture uniform) or ``clustered``
#: (``floral_lightning.router_init.clustered_start``)
ROUTER_INITS = ("zeros", "clustered")


@dataclass
class RouterOptions:
    """How a client's logits become its mixture (see ``ClientMixtures``); ``oracle`` fixes every client's
    mixture to its true cluster (the data module's ``clusters``) and freezes it.

    ``init`` is how the logits start: ``"zeros"`` (the paper) or ``"clustered"``: when a fit starts from scratch
    with the logits still all zero, every client's logits come from a clustering of the clients' first updates
    (``floral_lightning.router_init``; beyond the paper, the shipped MNIST and synthetic configs' choice). It does
    nothing without a learned router of two or more adaptors (FedAvg, the oracle, one adaptor).
    """

    temperature: float = 1.0
    noise: str = "uniform"
    noise_std: float = 1.0
    min_prob: float = 0.01
    top_k: int | None = None
    entropy_penalty: float = 0.0
    oracle: bool = False
    init: str = "zeros"

    def mixture_options(self) -> dict:
        """The options of ``ClientMixtures``: all but ``oracle`` and ``init`` (how the logits start)."""
        return {k: v for k, v in vars(self).items() if k not in ("oracle", "init")}


@dataclass
class ClientOptimizer:
    """The optimizer every client trains with; its state starts fresh for each client in each round.

    ``adaptor_lr`` defaults to ``lr``. The router group never uses weight decay, so a client's logits change
    only when that client trains.
    """

    name: str = "sgd"
    lr: float = 0.1
    adaptor_lr: float | None = None
    router_lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass
class Evaluation:
    """One evaluation of every client: what ``FloralModule`` hands to ``callbacks.RunReport`` to log.

    ``scalars`` holds every summary value by its logged name (``val/acc``, ``val/acc_worst``,
    ``val/acc_cluster0``, ``val/routing_ari``, ...); ``per_client`` each metric's per-client means [K] (NaN for a
    client without samples). ``headline`` names the first metric of ``compute_metrics`` (``val/acc``, or
    ``val/mse`` for regression): the run's number for ``hp_metric``, the best round and the console line.
    """

    split: str
    scalars: dict[str, float]
    per_client: dict[str, torch.Tensor]
    counts: torch.Tensor
    headline: str
    higher_is_better: bool
    mixtures: torch.Tensor | None
    clusters: torch.Tensor | None


# The option dataclasses are saved in checkpoints' hyperparameters; they are plain data, so let
# ``torch.load(weights_only=True)`` (Lightning's default for resuming) read them.
torch.serialization.add_safe_globals([Targets, RouterOptions, ClientOptimizer])


#: the checkpoint key that records the module's class
CLASS_PATH_KEY = "floral_class_path"


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def lr_scheduler_spec(spec: dict | None) -> dict | None:
    """Validate a learning-rate schedule option: ``{"class_path": str, "init_args": dict}`` (or ``None``)."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(
            f"lr_scheduler={spec!r}: expected {{'class_path': 'torch.optim.lr_scheduler.StepLR', "
            "'init_args': {'step_size': 1, 'gamma': 0.5}}"
        )
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"lr_scheduler has unknown key(s) {sorted(unknown)}; valid keys are class_path, init_args")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"lr_scheduler.init_args={init_args!r}: expected a mapping of the scheduler's arguments")
    return {"class_path": spec["class_path"], "init_args": dict(init_args)}


def build_lr_scheduler(spec: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Lightning's scheduler configuration for ``spec`` on ``optimizer``: stepped once per epoch (= round)."""
    path = spec["class_path"]
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name or "torch.optim.lr_scheduler"), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"lr_scheduler.class_path={path!r} cannot be imported; give a torch.optim.lr_scheduler name "
            "(e.g. 'StepLR') or a full class path"
        ) from err
    init_args = dict(spec["init_args"])
    # torch's ReduceLROnPlateau takes no ``monitor``; Lightning's subclass (lightning.pytorch.cli) does
    monitor = None if "monitor" in inspect.signature(cls).parameters else init_args.pop("monitor", None)
    try:
        scheduler = cls(optimizer, **init_args)
    except TypeError as err:
        raise ValueError(f"lr_scheduler {path} rejected init_args={init_args}: {err}") from err
    config = {"scheduler": scheduler, "interval": "epoch", "frequency": 1}
    monitor = getattr(scheduler, "monitor", monitor)
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        if monitor is None:
            raise ValueError(f"lr_scheduler {path} needs init_args.monitor, the metric it watches (e.g. 'val/loss')")
        config["monitor"] = monitor
    return config


def _expected_input(model: nn.Module) -> str:
    """What the model's first weighted layer takes, in words (for the error of a dry forward)."""
    for name, module in model.named_modules():
        for attribute, unit in (("in_features", "features"), ("in_channels", "channels"), ("num_embeddings", "ids")):
            size = getattr(module, attribute, None)
            if isinstance(size, int):
                return f"the model's first layer {name or 'model'} ({type(module).__name__}) expects {size} {unit}"
    return f"the model ({type(model).__name__}) does not accept them"


class FloralModule(L.LightningModule):
    """Personalised federated training of ``base`` with FLoRAL (or plain FedAvg with ``num_adaptors=0``).

    Batches are ``(x, y, client_id)``: an ``int`` client id during local training (one mixture per batch,
    the merged path) and a ``LongTensor [B]`` during evaluation (many clients per batch, a mixture per sample).

    Args:
        base: the network to personalise: any ``nn.Module``, or its spec ``{"class_path": ..., "init_args":
            {...}}`` (what the CLI configs hold). A spec is saved with the hyperparameters, so
            ``FloralModule.load_from_checkpoint(path)`` rebuilds the module with no arguments; the CLI saves
            the config's spec itself. A network built in Python has no spec: pass ``base=`` when loading.
        num_clients: K; linked from ``data.num_clients`` by the CLI.
        num_adaptors: C adaptors per layer; 0 trains the base model alone (FedAvg).
        rank: adaptor rank: an int, a fraction of each layer's budget, or "sqrt", "log", "full".
        conv_split: conv kernel split between the factors ("balanced_2d", "balanced", "in", "out").
        init: factor initialisation ("uniform_in", "normal_in", "uniform_out", "normal_out").
        alpha: scale of the adaptor sum.
        bias: give adaptors of biased layers their own bias.
        min_rank: lower bound of rule-based ranks.
        targets: which layers to adapt.
        router: the mixture rule and its options.
        optimizer: the client optimizer and per-group learning rates.
        precondition: precondition the factor gradients (spec §2) before every optimizer step.
        task: what outputs are scored by: ``"classification"`` or ``"regression"`` (``floral_lightning.tasks``;
            ``None``: the class's ``default_task``).
        lr_scheduler: a learning-rate schedule over rounds, ``{"class_path": ..., "init_args": {...}}`` of any
            ``torch.optim.lr_scheduler`` class (a bare name such as ``"StepLR"`` is looked up there); it steps
            once per round and scales every parameter group's own rate (base, adaptors, router). The top-level
            ``--lr_scheduler`` of the CLI lands here. ``init_args.monitor`` names the metric of
            ``ReduceLROnPlateau``.
    """

    #: the task when ``task`` is not given (``RegressionModule`` changes it)
    default_task: str = "classification"
    #: constructor arguments a subclass fixes or ignores: left out of the saved hyperparameters, so a
    #: checkpoint's hyperparameters rebuild the subclass (``load_from_checkpoint``) and the logged ones are its own
    hparams_not_saved: tuple[str, ...] = ()
    #: whether clients keep whole private networks (local adaptors, personal models, ensemble members
    #: mixed on the outputs) that the ``save_pretrained`` folder does not hold
    has_private_networks: bool = False

    def __init__(
        self,
        base: nn.Module,
        num_clients: int = 1,
        num_adaptors: int = 4,
        rank: int | float | str = 0.01,
        conv_split: str = "balanced_2d",
        init: str = "uniform_in",
        alpha: float = 1.0,
        bias: bool = True,
        min_rank: int = 1,
        targets: Targets | None = None,
        router: RouterOptions | None = None,
        optimizer: ClientOptimizer | None = None,
        precondition: bool = False,
        task: str | None = None,
        lr_scheduler: dict | None = None,
    ) -> None:
        super().__init__()
        network = build_module(base) if isinstance(base, Mapping) else base
        if not isinstance(network, nn.Module):
            raise ValueError(
                f"base={base!r}: expected an nn.Module or a spec {{'class_path': ..., 'init_args': {{...}}}}. "
                "Loading a checkpoint whose base was built in Python needs it again: "
                "FloralModule.load_from_checkpoint(path, base=MyNet(...))"
            )
        self._save_hyperparameters_with_base_spec()
        if num_adaptors < 0:
            raise ValueError(f"num_adaptors={num_adaptors}: must be >= 1 (FLoRAL) or 0 (FedAvg)")
        self.targets = targets or Targets()
        self.router_options = router or RouterOptions()
        self.optimizer_options = optimizer or ClientOptimizer()
        # save the resolved options, not None: a resume compares every option with the checkpoint's
        resolved = {"targets": self.targets, "router": self.router_options, "optimizer": self.optimizer_options}
        self.hparams.update({k: v for k, v in resolved.items() if k not in self.hparams_not_saved})
        if getattr(self.router_options, "init", "zeros") not in ROUTER_INITS:
            raise ValueError(f"router.init={self.router_options.init!r}: expected one of {ROUTER_INITS}")
        if self.optimizer_options.name not in CLIENT_OPTIMIZERS:
            raise ValueError(f"optimizer.name={self.optimizer_options.name!r}: expected one of {CLIENT_OPTIMIZERS}")
        self.num_clients = num_clients
        self.precondition = precondition
        self.task: Task = get_task(task or self.default_task)
        self.lr_scheduler_spec = lr_scheduler_spec(lr_scheduler)
        # the round's local losses so far (see ``_record_train_loss``)
        self._loss_client: int | None = None
        self._loss_sum, self._loss_count = torch.zeros(()), 0
        self._penalty_sum = torch.zeros(())
        #: the trained federated parameters at the start of the active client's training (``local_penalty``)
        self._client_start: dict[str, torch.Tensor] | None = None
        if num_adaptors == 0:
            self.model: PersonalizedModel = SharedModel(network)
        else:
            router_kwargs = self.router_options.mixture_options()
            self.model = FloralModel(
                network,
                num_clients,
                num_adaptors,
                rank,
                conv_split=conv_split,
                init=init,
                alpha=alpha,
                bias=bias,
                min_rank=min_rank,
                router=router_kwargs,
                **vars(self.targets),
            )
        self._metrics: dict[str, nn.ModuleDict] = {}
        #: the latest evaluation, for ``callbacks.RunReport`` (``None`` until one has run)
        self.last_evaluation: Evaluation | None = None

    def _save_hyperparameters_with_base_spec(self) -> None:
        """Save every ``__init__`` argument as a hyperparameter, ``base`` as its spec.

        Under the CLI, Lightning hands ``save_hyperparameters`` the config, where ``base`` is already its
        spec; in Python ``base`` is whatever was passed: a spec is kept, a built network is replaced by
        ``None`` (a pickled module would not load with ``weights_only=True`` and would copy the weights).
        """
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Attribute 'base' is an instance of `nn.Module`")
            # logger=False: ``callbacks.RunReport`` logs them with the federated and data options and the
            # metrics (Lightning's own call would add a placeholder hp_metric of -1)
            self.save_hyperparameters(
                ignore=list(self.hparams_not_saved), frame=inspect.currentframe().f_back, logger=False
            )
        if isinstance(self.hparams.get("base"), nn.Module):
            self.save_hyperparameters({**self.hparams, "base": None}, logger=False)  # a dict replaces the set

    @property
    def base_spec(self) -> dict | None:
        """The spec that rebuilds the base network (``None`` when it was built in Python)."""
        base = self.hparams.get("base")
        return dict(base) if isinstance(base, Mapping) else None

    # --- models out --------------------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, *args, **kwargs) -> FloralModule:
        """Lightning's ``load_from_checkpoint``, building the class the checkpoint records.

        The CLI records the method's class (``_class_path``, e.g. ``floral_lightning.methods.DittoModule``);
        Lightning drops that key for a base class whose ``__init__`` takes no ``**kwargs``, and would build
        a ``FloralModule`` with the wrong tensors. Classes of this package are imported; any other recorded
        class must already be imported (Lightning's rule: a checkpoint never imports new code). The file is
        read with ``weights_only=True`` unless ``weights_only=False`` is passed (for a trusted checkpoint
        holding other Python objects).
        """
        # the checkpoint holds plain data (the option dataclasses are registered as safe): no code runs on load
        # unless the caller trusts the file and passes weights_only=False
        kwargs.setdefault("weights_only", True)
        header = cls._checkpoint_header(checkpoint_path, kwargs["weights_only"])
        hparams = dict(header.get("hyper_parameters") or {})
        class_path = hparams.get("_class_path", header.get(CLASS_PATH_KEY))
        target = cls._recorded_class(checkpoint_path, class_path)
        if target is not cls:
            return target.load_from_checkpoint(checkpoint_path, *args, **kwargs)
        module = super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        # Lightning's CLI instantiator builds ``base`` before ``__init__`` sees it: keep the recorded spec, so
        # the reloaded module's own checkpoints and folders rebuild it too
        spec = hparams.get("base")
        if module.base_spec is None and isinstance(spec, Mapping) and "base" not in kwargs:
            module.save_hyperparameters({**module.hparams, "base": dict(spec)}, logger=False)
        return module

    @staticmethod
    def _checkpoint_header(checkpoint_path: str | os.PathLike, weights_only: bool) -> dict:
        """The checkpoint (tensors memory-mapped, not read), or ``{}`` for a URL or a stream."""
        if not os.path.isfile(checkpoint_path):
            return {}
        return torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only, mmap=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the method's class, for ``FloralModule.load_from_checkpoint`` (the CLI also records it in the
        # hyperparameters; a module built in Python does not)
        checkpoint[CLASS_PATH_KEY] = _class_path(type(self))

    @classmethod
    def _recorded_class(cls, checkpoint_path: str | os.PathLike, class_path: str | None) -> type[FloralModule]:
        if not isinstance(class_path, str) or class_path == _class_path(cls):
            return cls
        module_name, _, name = class_path.rpartition(".")
        if module_name.split(".")[0] == __name__.split(".")[0]:
            importlib.import_module(module_name)
        target = getattr(sys.modules.get(module_name), name, None)
        if not (isinstance(target, type) and issubclass(target, cls)):
            raise ValueError(
                f"{checkpoint_path}: the checkpoint's class {class_path!r} is not an imported subclass of "
                f"{cls.__name__}; import the module that defines it first"
            )
        return target

    @torch.no_grad()
    def client_model(self, client_id: int) -> nn.Module:
        """Client ``client_id``'s personalised network as a plain copy of the base architecture, in eval mode:
        its mixture folded into the weights (FLoRAL), or the global network (FedAvg)."""
        if not 0 <= client_id < self.num_clients:
            raise ValueError(f"client_id={client_id} is out of range; valid ids are 0..{self.num_clients - 1}")
        return self.model.client_network(client_id).eval()

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """The whole federated model (base, adaptors, every client's mixture logits, the options that rebuild
        it) as a folder that :func:`floral_lightning.pretrained.load_pretrained` reads without Lightning."""
        if self.has_private_networks:
            raise TypeError(
                f"{type(self).__name__} keeps per-client networks that the save_pretrained folder does not hold; "
                "export the clients one by one: client_model(k), or python -m floral_lightning.export --client K"
            )
        network = self.model.base if isinstance(self.model, SharedModel) else self.model
        return save_pretrained(network, folder, self.base_spec)

    # --- the model ---------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, client_ids: int | torch.Tensor) -> torch.Tensor:
        """Predictions for ``x`` personalised to ``client_ids`` (an int, or a LongTensor with one id per sample)."""
        return self.model(x, client_ids)

    def federated_state(self) -> dict[str, torch.Tensor]:
        """The tensors the server averages, by name (the base, and the adaptors if any)."""
        return self.model.federated_state()

    def federated_roles(self) -> dict[str, str]:
        """``shared`` or ``adaptor`` for every tensor of ``federated_state``."""
        return self.model.federated_roles()

    def client_logits(self, client_id: int) -> torch.Tensor:
        """The router logits of one client (a single zero logit for FedAvg)."""
        return self.model.client_logits(client_id)

    def client_mixtures(self) -> torch.Tensor | None:
        """All clients' mixtures ``softmax(theta / T)`` [K, C] (rows sum to 1), or ``None`` for FedAvg."""
        return self.model.client_mixtures()

    def client_tables(self) -> list[torch.Tensor]:
        """Every private per-client tensor ``[K, ...]`` that local training changes, row k being client k's: the
        model's tensors of role ``private`` and the logits of every ``ClientMixtures`` in the module; methods with
        more private state (local adaptors, Ditto's personal models) add their tables. With several processes the
        round loop sends each trained client's rows from the process that trained it to all the others at the
        end of the round, so every process holds the same tables (for evaluation, checkpoints and the next round).
        """
        roles = self.model.roles
        tables = {id(t): t for n, t in self.model.named_tensors() if roles[n] == "private"}
        tables.update({id(m.logits): m.logits for m in self.modules() if isinstance(m, ClientMixtures)})
        for name, tensor in self.model.named_tensors():
            if id(tensor) in tables and (tensor.dim() == 0 or tensor.shape[0] != self.num_clients):
                raise ValueError(
                    f"private tensor {name} has shape {tuple(tensor.shape)}, not one row per client "
                    f"(num_clients={self.num_clients}); override client_tables() to say what each client owns"
                )
        return list(tables.values())

    def on_client_start(self, client_id: int) -> None:
        """Called by the round loop when ``client_id`` starts local training, after the global weights are
        loaded: methods with private per-client state load it here (and call this one, which keeps the start of
        ``local_penalty``)."""
        if self.has_local_penalty:
            self._client_start = {n: t.detach().clone() for n, t in self.trained_federated_parameters().items()}

    def on_client_end(self, client_id: int) -> None:
        """Called by the round loop when ``client_id`` finishes local training, before its weights are
        aggregated: methods with private per-client state store it here."""
        self._client_start = None

    def local_penalty(
        self, params: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        """A term added to a client's local loss: a function of its trained federated parameters ``params`` (by
        name, as ``trained_federated_parameters``) and their values ``start`` when its local training started.
        ``None``, no term, here; FedProx's proximal term ``mu/2 ||w - w_start||^2`` is one.

        Both round loops add it: the sequential one in ``training_step``, the vectorised one (``federated.vectorise``)
        inside ``vmap``, one client's tensors at a time. So a method whose local training differs from FLoRAL's
        only by such a term still trains its clients at once (write it with tensor ops ``vmap`` can batch: no
        ``.item()``, no data-dependent Python branches).
        """
        return None

    @property
    def has_local_penalty(self) -> bool:
        """Whether the class defines a ``local_penalty`` (the round loops then keep each client's start)."""
        return type(self).local_penalty is not FloralModule.local_penalty

    def trained_federated_parameters(self) -> dict[str, torch.Tensor]:
        """The tensors of ``federated_state`` that local training changes: the trainable parameters."""
        return {n: t for n, t in self.federated_state().items() if isinstance(t, nn.Parameter) and t.requires_grad}

    # --- what a subclass overrides for a new task --------------------------------------------------------
    @property
    def higher_is_better(self) -> frozenset[str]:
        """Metrics from ``compute_metrics`` where larger is better (decides the "worst client"); a subclass
        with metrics of its own may set this as a class attribute."""
        return self.task.higher_is_better

    def compute_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch (the task's; override for a one-off task)."""
        return self.task.loss(outputs, targets)

    def compute_metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample scores ``{name: Tensor[B]}``; each is averaged per client and summarised over clients."""
        return self.task.metrics(outputs, targets)

    # --- Lightning hooks ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_clients = getattr(datamodule, "num_clients", None)
        if data_clients is not None and data_clients != self.num_clients:
            raise ValueError(
                f"model.num_clients={self.num_clients} but the data module has num_clients={data_clients}; "
                "link them (train.py does) or set both to the same value"
            )
        router = self.model.router
        if self.router_options.oracle and router is not None and not router.frozen:
            clusters = getattr(datamodule, "clusters", None)
            if clusters is None:
                raise ValueError("router.oracle=true needs a data module with true client clusters (`clusters`)")
            router.set_oracle(clusters % router.num_adaptors)
        if datamodule is not None and hasattr(datamodule, "val_dataloader") and getattr(datamodule, "is_built", False):
            self.check_data_fits(datamodule)

    @torch.no_grad()
    def check_data_fits(self, datamodule: L.LightningDataModule) -> None:
        """One dry forward of two evaluation samples at setup, so data the model cannot take fail now, with the
        model's expected input and the data's shape named, not as a shape error deep inside training.

        Also checks that a classifier has one output per class of the data (``num_classes``) and that a
        regressor's outputs have the targets' shape. Runs in eval mode (no router noise, no dropout, norm
        statistics untouched), so it changes nothing the run computes afterwards.
        """
        batch = next(iter(datamodule.val_dataloader()), None)
        if batch is None:
            return
        x, y, client_ids = (t[:2] for t in batch)
        was_training = self.training
        self.eval()
        try:
            outputs = self(x.to(self.device), client_ids.to(self.device))
        except (RuntimeError, ValueError, IndexError) as err:
            values = f"{x[0].numel()} value{'s' if x[0].numel() != 1 else ''}"
            raise ValueError(
                f"the data's inputs do not fit the model: each sample has shape {tuple(x.shape[1:])} ({values}), "
                f"but {_expected_input(self.model)}. The forward pass said: {err}"
            ) from err
        finally:
            self.train(was_training)
        num_classes = getattr(datamodule, "num_classes", None)
        if not y.is_floating_point() and num_classes is not None and outputs.shape[-1] != num_classes:
            raise ValueError(
                f"the model outputs {outputs.shape[-1]} scores per sample but the data has num_classes={num_classes} "
                f"(labels 0..{num_classes - 1}); make the model's output size match the number of classes"
            )
        if y.is_floating_point() and outputs.shape[1:] != y.shape[1:]:
            raise ValueError(
                f"the model outputs shape {tuple(outputs.shape[1:])} per sample but the targets have shape "
                f"{tuple(y.shape[1:])}; make the model's output size match the targets"
            )

    def on_fit_start(self) -> None:
        """With ``router.init="clustered"``: a fit that starts from scratch, with the logits still all zero, starts
        every client's logits from a clustering of the clients' first updates (``router_init.clustered_start``,
        seeded by the run's seed). A resumed fit keeps the checkpoint's logits, and logits already set (by
        ``callbacks.ClusteredRouterInit``, which runs first, or by hand) are kept."""
        if getattr(self.router_options, "init", "zeros") != "clustered" or self.trainer.ckpt_path is not None:
            return
        router = self.model.router if isinstance(self.model, FloralModel) else None
        if router is None or router.frozen or router.num_adaptors < 2 or bool(router.logits.detach().any()):
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if not callable(getattr(datamodule, "client_split", None)):
            raise ValueError(
                "router.init='clustered' needs a data module with client_split(client_id, 'train') "
                f"(FederatedDataModule), got {type(datamodule).__name__}; use router.init='zeros' (the paper's start)"
            )
        clustered_start(self, datamodule, run_seed(None))

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        """The client optimizer (``configure_client_optimizer``) and, if set, its schedule over rounds.

        Lightning steps an ``interval="epoch"`` scheduler once per epoch, which is once per round. The
        round loop clears the optimizer's state (momentum, Adam moments) when each client starts; the
        learning rates in the parameter groups, which the scheduler sets, are kept.
        """
        optimizer = self.configure_client_optimizer()
        if self.lr_scheduler_spec is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": build_lr_scheduler(self.lr_scheduler_spec, optimizer)}

    def configure_client_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer every client trains with: one parameter group per role, each with its own rate."""
        opt = self.optimizer_options
        groups = [
            {"params": self.model.shared_parameters(), "lr": opt.lr},
            {"params": self.model.adaptor_parameters(), "lr": opt.adaptor_lr or opt.lr},
            {"params": [p for p in self.model.private_parameters() if p.requires_grad], "lr": opt.router_lr},
        ]
        groups[-1]["weight_decay"] = 0.0  # the router: a client's logits change only when that client trains
        groups = [g for g in groups if g["params"]]
        if opt.name == "sgd":
            return torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        return torch.optim.Adam(groups, lr=opt.lr, weight_decay=opt.weight_decay)

    def training_step(self, batch: tuple | RoundBatch, batch_idx: int) -> torch.Tensor | None:
        if isinstance(batch, RoundBatch):
            # the round loop trained the whole round at once (federated.vectorise) in on_train_batch_start;
            # None tells Lightning there is no loss to back-propagate and nothing for its optimizer to step
            return None
        x, y, client_id = batch
        loss = self.compute_loss(self(x, client_id), y)
        self._record_train_loss(int(client_id), loss.detach(), len(x))
        penalty = None if self.model.router is None else self.model.router.entropy_loss(client_id)
        if penalty is not None:
            loss = loss + penalty
        if self.has_local_penalty:
            local = self._step_local_penalty()
            if local is not None:
                self._penalty_sum = self._penalty_sum.to(local.device) + local.detach() * len(x)
                loss = loss + local
        return loss

    def _step_local_penalty(self) -> torch.Tensor | None:
        if self._client_start is None:
            raise RuntimeError(
                f"{type(self).__name__}.local_penalty needs the client's start, which FloralModule.on_client_start "
                "keeps: call super().on_client_start(client_id) in an override"
            )
        params = self.trained_federated_parameters()
        return self.local_penalty({n: params[n] for n in self._client_start}, self._client_start)

    def _record_train_loss(self, client_id: int, loss: torch.Tensor, batch_size: int) -> None:
        """Add a local loss to the round's sum; ``on_round_end`` logs their mean as ``train/loss``.

        Why not ``self.log`` every step: each call walks Lightning's result tree (about 0.5 ms), as long as a
        whole step of a small model. For the same reason the client on the progress bar is logged only when
        there is a progress bar, once per client.
        """
        if client_id != self._loss_client and self.trainer.progress_bar_callback is not None:
            # a float here (self.log stores floats); ``callbacks.FederatedProgressBar`` shows it as an int
            self.log("client", float(client_id), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self._loss_client = client_id
        self._loss_sum = self._loss_sum.to(loss.device) + loss * batch_size
        self._loss_count += batch_size

    def on_round_end(self, round_idx: int) -> None:
        """Called by the round loop when this process's clients of round ``round_idx`` have trained, before the
        server step: logs ``train/loss``, the sample-weighted mean of the round's local losses (this process's
        clients; nothing when no local step recorded one, e.g. a vectorised round, which logs its own), and
        ``train/local_penalty`` likewise for a method with a ``local_penalty``."""
        if self._loss_count:
            self.log_round_losses(self._loss_sum, self._penalty_sum, self._loss_count)
        self._loss_client, self._loss_sum, self._loss_count = None, torch.zeros(()), 0
        self._penalty_sum = torch.zeros(())

    def log_round_losses(self, loss_sum: torch.Tensor, penalty_sum: torch.Tensor, count: int) -> None:
        """Log the round's sample-weighted mean local loss (``train/loss``) and, for a method with a
        ``local_penalty``, mean penalty (``train/local_penalty``), from their sums over ``count`` samples."""
        self.log("train/loss", loss_sum / count, prog_bar=True, on_step=False, on_epoch=True, batch_size=count)
        if self.has_local_penalty:
            self.log("train/local_penalty", penalty_sum / count, on_step=False, on_epoch=True, batch_size=count)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.precondition:
            self.model.precondition_gradients_()

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self._evaluate_batch("val", batch)

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        self._evaluate_batch("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    # --- evaluation --------------------------------------------------------------------------------------
    def _evaluate_batch(self, split: str, batch: tuple) -> None:
        x, y, client_ids = batch
        if isinstance(client_ids, int):
            client_ids = torch.full((len(x),), client_ids, dtype=torch.long, device=x.device)
        scores = self.compute_metrics(self.evaluation_outputs(x, client_ids), y)
        metrics = self._split_metrics(split, scores)
        for name, values in scores.items():
            metrics[name].update(values, client_ids)

    def evaluation_outputs(self, x: torch.Tensor, client_ids: torch.Tensor) -> torch.Tensor:
        """What evaluation scores: each sample's prediction by its own client's model (``client_ids`` [B]).

        Methods whose clients keep private weights (``floral_lightning.methods``) override this."""
        return self(x, client_ids)

    def _split_metrics(self, split: str, names) -> nn.ModuleDict:
        # Created lazily: the metric names come from compute_metrics, which a subclass may change.
        if split not in self._metrics:
            metrics = nn.ModuleDict({name: PerClientMean(self.num_clients) for name in names}).to(self.device)
            self._metrics[split] = metrics
        return self._metrics[split]

    def _log_evaluation(self, split: str) -> None:
        """Summarise the clients' values, log the summary (loggers, progress bar, checkpoint monitors, what
        ``trainer.validate``/``test`` return) and keep the whole evaluation in ``last_evaluation`` for
        ``callbacks.RunReport`` (per-client values, mixtures figure)."""
        metrics = self._metrics.pop(split, None)
        if metrics is None or self.trainer.sanity_checking:  # Lightning drops sanity-check logs; so do we
            return
        clusters = getattr(getattr(self.trainer, "datamodule", None), "clusters", None)
        scalars: dict[str, float] = {}
        per_client: dict[str, torch.Tensor] = {}
        for name, metric in metrics.items():
            means, counts = metric.compute()
            per_client[name] = means.cpu()
            summary = summarize_clients(
                means, counts, higher_is_better=name in self.higher_is_better, clusters=clusters
            )
            for key, value in summary.items():
                scalars[f"{split}/{name}" if key == "mean" else f"{split}/{name}_{key}"] = value
        mixtures = self.client_mixtures()
        if mixtures is not None:
            scalars[f"{split}/router_entropy"] = float(-(mixtures * mixtures.clamp_min(1e-12).log()).sum(-1).mean())
            if clusters is not None:
                scalars[f"{split}/routing_ari"] = adjusted_rand_index(clusters.cpu(), mixtures.argmax(-1).cpu())
        headline = next(iter(metrics))
        for label, value in scalars.items():
            self.log(label, value, prog_bar=label == f"{split}/{headline}", sync_dist=False)
        self.last_evaluation = Evaluation(
            split=split,
            scalars=scalars,
            per_client=per_client,
            counts=counts.cpu(),
            headline=f"{split}/{headline}",
            higher_is_better=headline in self.higher_is_better,
            mixtures=None if mixtures is None else mixtures.cpu(),
            clusters=None if clusters is None else clusters.cpu(),
        )


class RegressionModule(FloralModule):
    """``FloralModule`` with ``task="regression"`` by default (mean squared error; the synthetic tasks)."""

    default_task = "regression"
