"""The federated round loop, inside one ``Trainer.fit``: one Lightning epoch is one round.

    round t (epoch t):
        the loader yields each sampled client's batches in turn, tagged with its id
        first batch of client k:  load the global weights into the model, reset the optimizer state
        ... local SGD on k's batches (FloralModule.training_step, with k's own mixture) ...
        k's last batch done:      add k's trained weights to the streaming aggregator
        round's last batch done:  apply the aggregation rule and the server optimizer to the global
                                  weights, load them into the model (so validation sees them), and
                                  sample the clients of round t + 1

Clients for round t+1 are chosen when round t ends (and for the first round in ``on_fit_start``) because
Lightning asks the loader for its length before ``on_train_epoch_start``; the callback therefore has the
trainer reload the train loader every epoch. A client's mixture lives in the model's router table and
changes only when that client trains.

With several processes (``strategy="client_parallel"``, see ``floral_lightning.distributed``) every rank runs this
loop: it samples the same clients, trains its share of them (``split_clients``), and at the round's end one
collective (``sync_round``) gives every rank the whole round's aggregation sums and the trained clients' private
rows, so every rank takes the same server step.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer
from lightning.pytorch.utilities import rank_zero_info

from floral_lightning import foreach
from floral_lightning.aggregation import ClientUpdate, ServerOptimizer, StreamingAggregator
from floral_lightning.batch_runs import LIGHTNING_STEPS, batch_runs_reason, train_local_step
from floral_lightning.data.federated import BatchRun, is_padding
from floral_lightning.distributed import ClientParallelStrategy, RoundSync, split_clients, sync_round
from floral_lightning.seeding import Stream, run_seed, seed_local_training, seeded_generator
from floral_lightning.vectorised import RoundBatch, VectorisedClients, probe, vectorise_reason


def sample_clients(num_clients: int, clients_per_round: int | float, seed: int, round_idx: int) -> list[int]:
    """The sorted ids of the clients sampled in ``round_idx``: a pure function of its arguments.

    ``clients_per_round`` is a count (int >= 1) or a fraction in (0, 1] (at least one client).
    """
    if isinstance(clients_per_round, float):
        if not 0.0 < clients_per_round <= 1.0:
            raise ValueError(f"clients_per_round={clients_per_round}: a fraction must lie in (0, 1]")
        count = max(1, round(clients_per_round * num_clients))
    else:
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(
                f"clients_per_round={clients_per_round}: a count must lie in [1, num_clients={num_clients}]"
            )
        count = clients_per_round
    if count == num_clients:
        return list(range(num_clients))
    # One generator per (seed, round): resuming or re-running any round reproduces its sample exactly.
    generator = seeded_generator(seed, Stream.SETUP, round_idx)
    return sorted(torch.randperm(num_clients, generator=generator)[:count].tolist())


class FederatedCallback(Callback):
    """Runs FLoRAL/FedAvg rounds: client sampling, per-client weight reset, aggregation, server step.

    Works with a ``FloralModule`` (or any module with ``federated_state``, ``federated_roles``,
    ``client_logits``, ``on_client_start`` and ``on_client_end``; with several processes also ``client_tables``)
    and a data module that has ``num_clients``, ``train_sizes`` and a train loader with
    ``set_round(round_idx, clients, padding_batches)`` and ``num_batches(client_id)`` (``FederatedDataModule``).
    The number of rounds is ``trainer.max_epochs``. Several processes need ``strategy="client_parallel"``
    (the CLI selects it); other multi-process strategies are refused by name.

    Args:
        clients_per_round: clients sampled each round: a count, or a fraction of all clients.
        local_epochs: passes over its train data each sampled client makes per round.
        seed: seed of the client sampling (``None``: the run's ``seed_everything``).
        server_optimizer: ``"sgd"`` (lr 1, no momentum = plain averaging; momentum = FedAvgM), ``"avgm"``
            (FedAvgM), ``"adam"`` (FedAdam) or ``"yogi"`` (FedYogi); see ``ServerOptimizer``.
        server_lr: server learning rate of the base (shared) weights (``None``: the optimizer's default, 1 for
            sgd/avgm and 1e-2 for adam/yogi, see ``SERVER_DEFAULTS``).
        server_adaptor_lr: server learning rate of the adaptors (``None``: ``server_lr``).
        server_momentum: SGD momentum of the server (``None``: 0 for sgd, 0.9 for avgm).
        server_betas: betas of the adaptive server optimizers.
        server_eps: epsilon (tau) of the adaptive server optimizers (``None``: 1e-3).
        skip_nonfinite_clients: what a non-finite training loss or client update does. ``False`` (default):
            training stops with a ``FloatingPointError`` naming the client, round and step, and the last
            round-end checkpoint stays the newest (with several processes, every process stops at the end of that
            round, after the round's collective, so none is left waiting for the others). ``True``: the client's
            update is dropped from the round (its mixture and private state stay as they were before the round), a
            warning names it, and
            ``round/skipped_clients`` logs how many were dropped.
        vectorise: train each round's sampled clients at once, as one vectorised computation over stacked copies
            of the federated tensors (``floral_lightning.vectorised``), instead of one after another through
            Lightning's training loop: the same rounds to floating-point tolerance. Where the module, model,
            optimizer, trainer or a callback cannot be vectorised, an info message names why and the clients
            train one after another (README, "Clients in parallel").
        lightning_step: what one Lightning training step trains: ``"batch"`` (default: one local batch, Lightning's
            own loop), ``"client"`` (a sampled client's local batches) or ``"round"`` (the whole round's batches);
            ``floral_lightning.batch_runs``. The same rounds, bit for bit, with Lightning's per-step costs paid once
            per client or per round; callbacks' batch hooks, ``trainer.global_step`` and ``log_every_n_steps``
            then count clients or rounds. Where Lightning's step does more than a plain optimizer step (gradient
            clipping, mixed precision, backward or optimizer-step hooks), an info message names why and the loop
            stays batch by batch (README, "Several local batches in one Lightning step"). With ``vectorise`` too,
            a round that vectorises is trained vectorised.

    A non-finite aggregated weight after the server step always stops training (naming the round and the
    tensors): no client is left to blame.
    """

    def __init__(
        self,
        clients_per_round: int | float = 1.0,
        local_epochs: int = 1,
        seed: int | None = None,
        server_optimizer: str = "sgd",
        server_lr: float | None = None,
        server_adaptor_lr: float | None = None,
        server_momentum: float | None = None,
        server_betas: tuple[float, float] = (0.9, 0.99),
        server_eps: float | None = None,
        skip_nonfinite_clients: bool = False,
        vectorise: bool = False,
        lightning_step: str = "batch",
    ) -> None:
        if lightning_step not in LIGHTNING_STEPS:
            raise ValueError(f"lightning_step={lightning_step!r}: expected one of {LIGHTNING_STEPS}")
        if local_epochs < 1:
            raise ValueError(f"local_epochs={local_epochs}: must be >= 1")
        self.clients_per_round = clients_per_round
        self.local_epochs = local_epochs
        self.seed = run_seed(seed)
        self.server = ServerOptimizer(
            server_optimizer, server_lr, server_adaptor_lr, server_momentum, tuple(server_betas), server_eps
        )
        self.skip_nonfinite_clients = skip_nonfinite_clients
        self.vectorise = vectorise
        self.lightning_step = lightning_step
        #: the vectorised trainer of the fit in progress (``None``: clients train one after another), and why
        #: a ``vectorise`` fit trains them one after another (``None`` when it does not)
        self.vectorised: VectorisedClients | None = None
        self.sequential_reason: str | None = None
        #: why a fit with ``lightning_step`` other than "batch" steps Lightning batch by batch (``None`` when not)
        self.batch_by_batch_reason: str | None = None
        self.round = 0
        self.clients: list[int] = []
        # bound to the trainer's module and data in ``on_fit_start``
        self._global: dict[str, torch.Tensor] = {}
        self._roles: dict[str, str] = {}
        self._train_sizes: torch.Tensor | None = None
        self._loader = None
        self._aggregator: StreamingAggregator | None = None
        self._active_client: int | None = None
        self._pending_server_state: dict | None = None
        # the active client's local step, its logits before training (restored if its update is dropped), and
        # whether a non-finite loss was seen
        self._local_step = 0
        self._logits_before: torch.Tensor | None = None
        self._nonfinite_loss: str | None = None
        # several processes: every rank's clients this round, the first failure of this rank's clients (client,
        # message), and what the last round-end collective did
        self._shares: list[list[int]] | None = None
        self._failure: tuple[int, str] | None = None
        self.last_sync: RoundSync | None = None

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The server's current global weights by name (the tensors themselves: clone what you keep)."""
        return self._global

    # --- hooks for subclasses: what happens to each client ------------------------------------------------
    def on_client_start(self, trainer: L.Trainer, pl_module: L.LightningModule, client_id: int) -> None:
        """Called when ``client_id`` starts local training, after it received the global weights and its
        private state (``pl_module.on_client_start``)."""

    def on_client_update(self, trainer: L.Trainer, pl_module: L.LightningModule, update: ClientUpdate) -> None:
        """Called with each client's report after its local training, before the server aggregates it.

        ``update.state`` holds the live model's tensors, which the next client overwrites: clone what you keep.
        """

    # --- set-up ------------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        refuse_round_changing_settings(trainer)
        if trainer.world_size != 1 and not isinstance(trainer.strategy, ClientParallelStrategy):
            # DDP-like strategies all-reduce gradients at every local step, averaging different clients' updates
            # (and hang on their unequal batch counts); evaluation would count every sample once per process
            raise ValueError(
                f"FederatedCallback with world_size={trainer.world_size} needs trainer.strategy=client_parallel (each "
                f"process trains its share of a round's clients), got {type(trainer.strategy).__name__}; the CLI "
                "selects it when trainer.strategy is left at auto"
            )
        if stage != "fit":
            return
        if trainer.world_size > 1 and not callable(getattr(pl_module, "client_tables", None)):
            raise ValueError(
                f"{type(pl_module).__name__} has no client_tables(): with world_size={trainer.world_size} the round "
                "loop sends each trained client's private rows to every process (see FloralModule.client_tables)"
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("FederatedCallback needs accumulate_grad_batches=1 (a client's steps are its own)")
        if trainer.val_check_interval != 1.0:
            raise ValueError(
                f"val_check_interval={trainer.val_check_interval}: FederatedCallback evaluates between rounds "
                "only; use check_val_every_n_epoch to evaluate every N rounds"
            )
        # Each round has its own clients, so the loader's length changes: Lightning must re-read it.
        trainer.reload_dataloaders_every_n_epochs = 1
        if self.vectorise:
            # a vectorised round is one Lightning batch whose training_step returns None on purpose
            warnings.filterwarnings("ignore", message="`training_step` returned `None`")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        missing = [a for a in ("num_clients", "train_sizes") if not hasattr(datamodule, a)]
        if datamodule is None or missing:
            raise ValueError(
                "FederatedCallback needs a federated data module (FederatedDataModule) with num_clients, "
                f"train_sizes and a round loader; got {type(datamodule).__name__} missing {missing}"
            )
        self._loader = datamodule.train_dataloader()
        self._loader.local_epochs = self.local_epochs
        self._train_sizes = datamodule.train_sizes
        state = pl_module.federated_state()
        self._global = {n: t.detach().clone() for n, t in state.items()}
        self._roles = pl_module.federated_roles()
        self.server.bind(self._global, self._roles, {n for n, t in state.items() if isinstance(t, torch.nn.Parameter)})
        if self._pending_server_state is not None:
            self.server.load_state_dict(self._pending_server_state)
            self._pending_server_state = None
        self._start_round(trainer)
        self._set_up_vectorised(trainer, pl_module)
        self._set_up_batch_runs(trainer, pl_module)

    def _set_up_vectorised(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``vectorise``, serve each round as one stacked ``RoundBatch`` and train it in
        ``_train_vectorised``; otherwise (or where it cannot be vectorised, said once) batch by batch."""
        self.vectorised = None
        self.sequential_reason = None
        if not self.vectorise:
            return
        reason = vectorise_reason(trainer, pl_module, self._loader)
        if reason is None and trainer.world_size > 1:
            # each process trains its share of the round through padded, lockstep batches (client_parallel)
            reason = f"world_size={trainer.world_size}: several processes train their shares client by client"
        if reason is None:
            clients = VectorisedClients(pl_module, trainer.optimizers[0], self.seed)
            try:
                probe(clients, self._global, next(iter(self._loader)))  # the round's first batch
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
                reason = f"vmap cannot batch the model: {type(err).__name__}: {str(err).splitlines()[0]}"
        if reason is not None:
            self.sequential_reason = reason
            rank_zero_info(f"federated.vectorise: clients train one after another: {reason}")
            return
        self.vectorised = clients
        self._loader.whole_round = RoundBatch.collect

    def _set_up_batch_runs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """With ``lightning_step`` "client" or "round" (and no vectorised rounds), serve each client's or round's
        batches as one ``BatchRun``; where Lightning's step does more than a plain optimizer step, say why once
        and stay batch by batch."""
        self.batch_by_batch_reason = None
        if self.lightning_step == "batch" or self.vectorised is not None:
            return
        reason = batch_runs_reason(trainer, pl_module, self._loader)
        if reason is not None:
            self.batch_by_batch_reason = reason
            rank_zero_info(f"federated.lightning_step={self.lightning_step}: one Lightning step per batch: {reason}")
            return
        self._loader.batch_runs = self.lightning_step

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the loader serves batches again outside this fit
        if self._loader is not None and hasattr(self._loader, "whole_round"):
            self._loader.whole_round = None
        if self._loader is not None and hasattr(self._loader, "batch_runs"):
            self._loader.batch_runs = None

    def _start_round(self, trainer: L.Trainer) -> None:
        num_clients = int(trainer.datamodule.num_clients)
        self.clients = sample_clients(num_clients, self.clients_per_round, self.seed, self.round)
        if trainer.world_size > 1:
            # every rank computes the same split; the ranks with fewer batches pad up to the busiest one's count
            costs = {k: self._loader.num_batches(k) for k in self.clients}
            self._shares = split_clients(self.clients, costs, trainer.world_size)
            loads = [sum(costs[k] for k in share) for share in self._shares]
            rank = trainer.global_rank
            self._loader.set_round(self.round, self._shares[rank], padding_batches=max(loads) - loads[rank])
        else:
            self._loader.set_round(self.round, self.clients)
        self._aggregator = StreamingAggregator(self._global, self._roles)
        self._active_client = None
        self._failure = None

    # --- one client at a time ----------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, RoundBatch):
            self._train_vectorised(trainer, pl_module, batch)
            return
        if is_padding(batch):
            return
        if isinstance(batch, BatchRun):
            # the run's batches before its last, which Lightning's step trains next
            for earlier in batch.earlier:
                self._switch_client(trainer, pl_module, int(earlier[-1]))
                self._after_local_step(trainer, train_local_step(trainer, earlier, batch_idx))
        self._switch_client(trainer, pl_module, int(batch[-1]))

    def _switch_client(self, trainer: L.Trainer, pl_module: L.LightningModule, client_id: int) -> None:
        """Before a batch of ``client_id``: if another client was training, finish it and start this one."""
        if client_id == self._active_client:
            return
        if self._active_client is not None:
            self._finish_client(trainer, pl_module)
        self._start_client(trainer, pl_module, client_id)

    def _start_client(self, trainer: L.Trainer, pl_module: L.LightningModule, client_id: int) -> None:
        """Give the client the current global weights and a fresh optimizer (its mixture is already its own)."""
        state = pl_module.federated_state()
        with torch.no_grad():
            foreach.copy_([state[n] for n in self._global], list(self._global.values()))
        for optimizer in trainer.optimizers:
            optimizer.state.clear()
        # router noise and dropout: drawn from a stream of (seed, round, client), so a client's update does not
        # depend on who trained before it, in which process, or whether the run was resumed
        seed_local_training(self.seed, self.round, client_id)
        self._active_client = client_id
        self._local_step = 0
        self._nonfinite_loss = None
        self._logits_before = pl_module.client_logits(client_id).clone()
        pl_module.on_client_start(client_id)
        self.on_client_start(trainer, pl_module, client_id)

    def _finish_client(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        k = self._active_client
        problem = self._nonfinite_loss
        if problem is None:
            problem = _nonfinite_update(pl_module.federated_state(), pl_module.client_logits(k))
            if problem is not None:
                problem += f" after its last local step {self._local_step - 1}"
        if problem is not None:
            self._nonfinite(trainer, problem)
            # the logits row is a view of the router table: copying into it restores the client's mixture;
            # on_client_end is not called, so its stored private state (personal model, adaptor) is untouched
            pl_module.client_logits(k).copy_(self._logits_before)
        else:
            pl_module.on_client_end(k)
            update = ClientUpdate(k, pl_module.federated_state(), int(self._train_sizes[k]), pl_module.client_logits(k))
            self.on_client_update(trainer, pl_module, update)
            self._aggregator.add(update.state, update.num_samples, update.logits)
        self._active_client = None

    def _train_vectorised(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: RoundBatch) -> None:
        """The round's clients trained at once; then each client's update, in order, as ``_finish_client`` does."""
        state = pl_module.federated_state()
        with torch.no_grad():
            foreach.copy_([state[n] for n in self._global], list(self._global.values()))
        for k in batch.clients:
            self.on_client_start(trainer, pl_module, k)
        result = self.vectorised.train_round(self.round, self._global, batch)
        kept: list[int] = []  # the slots whose updates count (all, unless a non-finite one is skipped)
        for i in batch.order:  # slot i holds client result.clients[i]; updates go in the round's order
            k = result.clients[i]
            self._active_client = k
            client_state = result.client_state(i, self._global)
            logits = pl_module.client_logits(k) if result.logits is None else result.logits[i]
            problem = None
            if result.nonfinite[i] is not None:
                step, value = result.nonfinite[i]
                problem = f"non-finite training loss ({value}) at local step {step}"
            if problem is None and not result.finite_update[i]:
                problem = _nonfinite_update(client_state, logits)  # None: finite after all (its sum overflowed)
                if problem is not None:
                    problem += f" after its last local step {batch.num_steps[i] - 1}"
            if problem is not None:
                self._nonfinite(trainer, problem)
                continue
            if result.logits is not None:
                with torch.no_grad():
                    pl_module.client_logits(k).copy_(logits)  # a view of the router table row
            kept.append(i)
            update = ClientUpdate(k, client_state, int(self._train_sizes[k]), pl_module.client_logits(k))
            self.on_client_update(trainer, pl_module, update)
        self._active_client = None
        # the kept clients' updates, as they are stacked: the same sums as adding them one by one
        kept.sort()  # slot order: with every client kept, the stacks themselves (no gathered copy)
        states, logits = result.stacked_updates(kept, self._global)
        sizes = self._train_sizes[[result.clients[i] for i in kept]]
        self._aggregator.add_stacked(states, sizes, logits)
        pl_module.log_round_losses(result.loss_sum, result.penalty_sum, max(result.loss_count, 1))

    def _nonfinite(self, trainer: L.Trainer, problem: str) -> None:
        """Stop the run on a non-finite loss or update of the active client, or (skipping) warn about it."""
        where = f"client {self._active_client} in round {self.round} (global step {trainer.global_step})"
        if not self.skip_nonfinite_clients:
            if self._shares is not None:
                # several processes: raising here would leave the other ranks waiting in the round's collective;
                # the failure travels with it and every rank stops there (_finish_round)
                if self._failure is None:
                    self._failure = (self._active_client, f"{problem} of {where}")
                return
            raise FloatingPointError(_client_failure_message(f"{problem} of {where}", trainer))
        warnings.warn(f"{problem} of {where}: its update is dropped from the round", stacklevel=2)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if isinstance(batch, RoundBatch):
            self._finish_round(trainer, pl_module)
            return
        if is_padding(batch):
            if batch_idx + 1 == trainer.num_training_batches:  # a rank that trains no client this round
                self._finish_round(trainer, pl_module)
            return
        self._after_local_step(trainer, outputs["loss"] if isinstance(outputs, dict) else outputs)
        if batch_idx + 1 < trainer.num_training_batches:
            return
        self._finish_client(trainer, pl_module)
        self._finish_round(trainer, pl_module)

    def _after_local_step(self, trainer: L.Trainer, loss: torch.Tensor | None) -> None:
        """Check the local step's loss (a non-finite one stops the run there, or marks the client to be dropped)."""
        if self._nonfinite_loss is None and loss is not None and not bool(torch.isfinite(loss.detach()).all()):
            self._nonfinite_loss = f"non-finite training loss ({loss.item()}) at local step {self._local_step}"
            if not self.skip_nonfinite_clients:
                self._nonfinite(trainer, self._nonfinite_loss)  # stop at the step it happened
        self._local_step += 1

    def _finish_round(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Aggregate, take the server step, load the new global weights, and sample the next round."""
        on_round_end = getattr(pl_module, "on_round_end", None)
        if callable(on_round_end):
            on_round_end(self.round)
        if self._shares is not None:
            failed = None if self._failure is None else self._failure[0]
            self.last_sync = sync_round(
                trainer.strategy, self._aggregator, pl_module.client_tables(), self._shares, failed
            )
            if self.last_sync.failure is not None:
                rank, client = self.last_sync.failure
                elsewhere = f"a non-finite loss or update of client {client} in round {self.round} (on rank {rank})"
                problem = self._failure[1] if self._failure is not None else elsewhere
                raise FloatingPointError(_client_failure_message(problem, trainer))
        averages = self._aggregator.result(fallback=self._global)
        self.server.step(self._global, averages)
        bad = [name for name, tensor in self._global.items() if not bool(torch.isfinite(tensor).all())]
        if bad:
            raise FloatingPointError(
                f"the aggregated weights after round {self.round} (global step {trainer.global_step}) are not "
                f"finite: {bad[:5]}{' ...' if len(bad) > 5 else ''}. Training stopped; "
                f"{_last_good_checkpoint(trainer)}. Lower federated.server_lr or the client learning rate"
            )
        state = pl_module.federated_state()
        with torch.no_grad():
            foreach.copy_([state[n] for n in self._global], list(self._global.values()))
        pl_module.log("round/clients", float(self._aggregator.num_clients), on_step=False, on_epoch=True, batch_size=1)
        if self.skip_nonfinite_clients:
            skipped = float(len(self.clients) - self._aggregator.num_clients)  # on every rank, all ranks' skips
            pl_module.log("round/skipped_clients", skipped, on_step=False, on_epoch=True, batch_size=1)
        self.round += 1
        self._start_round(trainer)

    # --- checkpointing -----------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self._active_client is not None:
            warnings.warn(
                "checkpoint saved in the middle of a federated round: it holds a client's local weights; "
                "save at round ends (ModelCheckpoint's default) to resume exactly",
                stacklevel=2,
            )

    def settings(self) -> dict[str, Any]:
        """The options that shape the run's future (its client samples and server steps), by config key."""
        server = self.server
        return {
            "seed": self.seed,
            "clients_per_round": self.clients_per_round,
            "local_epochs": self.local_epochs,
            "server_optimizer": server.name,
            "server_lr": server.lr,
            "server_adaptor_lr": server.adaptor_lr,
            "server_momentum": server.momentum,
            "server_betas": list(server.betas),
            "server_eps": server.eps,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "settings": self.settings(), "server_optimizer": self.server.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the round and the server optimizer; settings that differ from the checkpoint's are refused by
        name (resuming under other settings would silently give another run than the one checkpointed)."""
        saved = state_dict.get("settings", {})
        ours = self.settings()
        differ = [
            f"federated.{key}={ours[key]!r} (checkpoint: {value!r})"
            for key, value in saved.items()
            if repr(ours.get(key)) != repr(value)  # repr: a fraction 1.0 (all clients) is not a count 1
        ]
        if differ:
            raise ValueError(
                f"resuming with round-loop settings that differ from the checkpoint's: {', '.join(differ)}. Give the "
                "checkpoint's values (or drop the overrides), or start a new run without --ckpt_path"
            )
        self.round = state_dict["round"]
        self._pending_server_state = state_dict["server_optimizer"]


def refuse_round_changing_settings(trainer: L.Trainer) -> None:
    """Refuse, by name, Trainer settings that would cut a federated round or an evaluation short.

    A round is one epoch whose batches are each sampled client's batches in turn, and an evaluation runs
    every client's data in client order; limiting batches or steps would silently drop whole clients (e.g.
    ``limit_train_batches=0.5`` trains half the clients of an "all clients" round) or stop in the middle of
    a round, leaving one client's local weights in the model.
    """
    problems = []
    if trainer.overfit_batches:
        problems.append(f"overfit_batches={trainer.overfit_batches} (would train the first batches only)")
    elif trainer.limit_train_batches != 1.0:
        problems.append(
            f"limit_train_batches={trainer.limit_train_batches} (would train only the first clients of each "
            "round; sample fewer clients with federated.clients_per_round)"
        )
    for name in ("limit_val_batches", "limit_test_batches"):
        value = getattr(trainer, name)
        if value not in (0, 1.0):
            problems.append(f"{name}={value} (would evaluate only the first clients; 0 turns evaluation off)")
    if trainer.max_steps != -1:
        problems.append(f"max_steps={trainer.max_steps} (steps differ per round; set the rounds with max_epochs)")
    if trainer.min_steps is not None:
        problems.append(f"min_steps={trainer.min_steps} (set a minimum of rounds with min_epochs)")
    for timer in (c for c in trainer.callbacks if isinstance(c, Timer)):
        if timer._interval != "epoch":  # a step-interval timer (Trainer(max_time=...)) stops mid-round
            problems.append(
                "max_time (or a Timer with interval='step') stops in the middle of a round; use "
                "callbacks: [Timer(duration=..., interval='epoch')], which stops at the end of a round"
            )
    if problems:
        raise ValueError("the federated round loop cannot honour: " + "; ".join(problems))


def _nonfinite_update(state: dict[str, torch.Tensor], logits: torch.Tensor) -> str | None:
    """What is non-finite in a client's trained weights and logits, or ``None`` when all are finite."""
    tensors = {**state, "router logits": logits}
    # One check over every float tensor first (one sync, not one per tensor): an L1 norm is finite when every entry
    # is. A norm of finite entries that overflows fails it too, and is settled by the exact check below.
    floats = [t for t in tensors.values() if t.is_floating_point()]
    with torch.no_grad():
        if not floats or bool(torch.isfinite(torch.stack(foreach.norms(floats, 1.0))).all()):
            return None
    bad = [name for name, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if not bad:
        return None
    return f"non-finite weights {bad[:5]}{' ...' if len(bad) > 5 else ''} in the update"


def _client_failure_message(problem: str, trainer: L.Trainer) -> str:
    """The message of a run stopped by a client's non-finite loss or update."""
    return (
        f"{problem}. Training stopped; {_last_good_checkpoint(trainer)}. Lower the learning rate "
        "(model.init_args.optimizer.lr), or set federated.skip_nonfinite_clients=true to drop such clients' "
        "updates instead"
    )


def _last_good_checkpoint(trainer: L.Trainer) -> str:
    """Where the newest round-end checkpoint is, for the message of a stopped run."""
    paths = [
        cb.last_model_path or cb.best_model_path
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint)
    ]
    paths = [p for p in paths if p]
    if not paths:
        return "this run wrote no checkpoint before it"
    return f"the last good checkpoint is {paths[0]} (resume with --ckpt_path=last)"
