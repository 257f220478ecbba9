"""``FloralModule``: the LightningModule that trains a FLoRAL model on batches tagged with client ids.

The round loop (sampling clients, resetting weights, averaging) lives in ``callbacks.FederatedCallback``;
this module only knows how one client trains on one batch and how every client is evaluated. Subclass it
for a new task by overriding ``compute_loss`` and ``compute_metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
from torch import nn

from .metrics import PerClientMean, adjusted_rand_index, mixture_heatmap, summarize_clients
from .model import FloralModel
from .personalized import PersonalizedModel, SharedModel
from .tasks import Task, get_task

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


@dataclass
class RouterOptions:
    """How a client's logits become its mixture (see ``ClientMixtures``); ``oracle`` fixes every client's
    mixture to its true cluster (the data module's ``clusters``) and freezes it."""

    temperature: float = 1.0
    noise: str = "uniform"
    noise_std: float = 1.0
    min_prob: float = 0.01
    top_k: int | None = None
    entropy_penalty: float = 0.0
    oracle: bool = False


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


# The option dataclasses are saved in checkpoints' hyperparameters; they are plain data, so let
# ``torch.load(weights_only=True)`` (Lightning's default for resuming) read them.
torch.serialization.add_safe_globals([Targets, RouterOptions, ClientOptimizer])


class FloralModule(L.LightningModule):
    """Personalised federated training of ``base`` with FLoRAL (or plain FedAvg with ``num_adaptors=0``).

    Batches are ``(x, y, client_id)``: an ``int`` client id during local training (one mixture per batch,
    the merged path) and a ``LongTensor [B]`` during evaluation (many clients per batch, a mixture per sample).

    Args:
        base: the network to personalise (any ``nn.Module``; instantiated from the config's class_path).
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
    """

    #: the task when ``task`` is not given (``RegressionModule`` changes it)
    default_task: str = "classification"
    #: constructor arguments a subclass fixes or ignores: left out of the saved hyperparameters, so a
    #: checkpoint's hyperparameters rebuild the subclass (``load_from_checkpoint``) and the logged ones are its own
    hparams_not_saved: tuple[str, ...] = ()

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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["base", *self.hparams_not_saved])
        if num_adaptors < 0:
            raise ValueError(f"num_adaptors={num_adaptors}: must be >= 1 (FLoRAL) or 0 (FedAvg)")
        self.targets = targets or Targets()
        self.router_options = router or RouterOptions()
        self.optimizer_options = optimizer or ClientOptimizer()
        if self.optimizer_options.name not in CLIENT_OPTIMIZERS:
            raise ValueError(f"optimizer.name={self.optimizer_options.name!r}: expected one of {CLIENT_OPTIMIZERS}")
        self.num_clients = num_clients
        self.precondition = precondition
        self.task: Task = get_task(task or self.default_task)
        # the round's local losses so far (see ``_record_train_loss``)
        self._loss_client: int | None = None
        self._loss_sum, self._loss_count = torch.zeros(()), 0
        if num_adaptors == 0:
            self.model: PersonalizedModel = SharedModel(base)
        else:
            router_kwargs = {k: v for k, v in vars(self.router_options).items() if k != "oracle"}
            self.model = FloralModel(
                base,
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

    def on_client_start(self, client_id: int) -> None:
        """Called by the round loop when ``client_id`` starts local training, after the global weights are
        loaded: methods with private per-client state load it here."""

    def on_client_end(self, client_id: int) -> None:
        """Called by the round loop when ``client_id`` finishes local training, before its weights are
        aggregated: methods with private per-client state store it here."""

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
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

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y, client_id = batch
        loss = self.compute_loss(self(x, client_id), y)
        self._record_train_loss(
            int(client_id), loss.detach(), len(x), last=batch_idx + 1 == self.trainer.num_training_batches
        )
        penalty = None if self.model.router is None else self.model.router.entropy_loss(client_id)
        if penalty is not None:
            loss = loss + penalty
        return loss

    def _record_train_loss(self, client_id: int, loss: torch.Tensor, batch_size: int, last: bool) -> None:
        """Sum the round's local losses and log ``train/loss`` once, at the round's last batch: the
        sample-weighted mean of the local losses of the round's clients.

        Why not ``self.log`` every step: each call walks Lightning's result tree (about 0.5 ms), as long as a
        whole step of a small model. For the same reason the client on the progress bar is logged only when
        there is a progress bar, once per client.
        """
        if client_id != self._loss_client and self.trainer.progress_bar_callback is not None:
            self.log("client", float(client_id), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self._loss_client = client_id
        self._loss_sum = self._loss_sum.to(loss.device) + loss * batch_size
        self._loss_count += batch_size
        if last:
            mean = self._loss_sum / self._loss_count
            self.log("train/loss", mean, prog_bar=True, on_step=False, on_epoch=True, batch_size=self._loss_count)
            self._loss_client, self._loss_sum, self._loss_count = None, torch.zeros(()), 0

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
        metrics = self._metrics.pop(split, None)
        if metrics is None or self.trainer.sanity_checking:  # Lightning drops sanity-check logs; so do we
            return
        clusters = getattr(getattr(self.trainer, "datamodule", None), "clusters", None)
        for name, metric in metrics.items():
            means, counts = metric.compute()
            summary = summarize_clients(
                means, counts, higher_is_better=name in self.higher_is_better, clusters=clusters
            )
            for key, value in summary.items():
                label = f"{split}/{name}" if key == "mean" else f"{split}/{name}_{key}"
                self.log(label, value, prog_bar=key == "mean", sync_dist=False)
        mixtures = self.client_mixtures()
        if mixtures is None:
            return
        entropy = -(mixtures * mixtures.clamp_min(1e-12).log()).sum(-1).mean()
        self.log(f"{split}/router_entropy", entropy)
        if clusters is not None:
            self.log(f"{split}/routing_ari", adjusted_rand_index(clusters.cpu(), mixtures.argmax(-1).cpu()))
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image(f"{split}/mixtures", mixture_heatmap(mixtures), global_step=self.current_epoch)

    def on_fit_start(self) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if self.model.router is not None and hasattr(experiment, "add_text"):
            experiment.add_text("model/overhead", self.model.overhead().as_markdown(), global_step=0)


class RegressionModule(FloralModule):
    """``FloralModule`` with ``task="regression"`` by default (mean squared error; the synthetic tasks)."""

    default_task = "regression"
