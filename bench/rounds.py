"""One federated round through the real Trainer against a hand-written PyTorch loop (the practical floor).

Work per round, shaped like ``conf/cifar.yaml``: 20 clients all sampled, ``CifarCNN``, FLoRAL with C = 4 and
rho = 1 % (or FedAvg, ``num_adaptors=0``), ``RandomImages`` 3x32x32 rotated per cluster, flip + crop
augmentation, batch 64, one local epoch.

- **Trainer**: ``Trainer.fit`` with ``FederatedCallback`` and ``FederatedDataModule``; a ``RoundTimer``
  callback stamps ``time.perf_counter`` at every ``on_train_epoch_start``, so one round is the time between
  consecutive stamps and includes everything Lightning does between epochs (dataloader reload, epoch-end
  hooks). Validation, logger, checkpointing, progress bar and model summary are off.
- **Floor** (:class:`FloorLoop`): the same model object type, the same optimizer groups, the same batches
  (it iterates the data module's own ``RoundLoader``), the same streaming p(k) / p(k|c) average, in plain
  PyTorch. After the runs the two final states are compared, to show the floor did the same work.

Runs alternate in blocks (trainer and floor, FLoRAL and FedAvg; order rotated per block); each run has one
untimed warm-up round.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bench.common import Figure, Section, median, rotated, spread
from callbacks import FederatedCallback, sample_clients
from floral_lightning.data import FederatedDataModule, RandomImages
from floral_lightning.models import CifarCNN
from floral_lightning.module import ClientOptimizer, FloralModule
from floral_lightning.seeding import seed_local_training

ROUND_TARGET = 1.15  # trainer round / floor round
FLORAL_VS_FEDAVG_TARGET = 1.2  # FLoRAL trainer round / FedAvg trainer round
SEED = 0


class RoundTimer(Callback):
    """Stamps wall time (``time.perf_counter``) and process CPU time at the start of every epoch (= round).

    A round is the time between consecutive stamps, so it includes everything Lightning does between epochs
    (dataloader reload, epoch-end hooks). The ``stop_at``-th stamp only closes the last timed round: the
    trainer is told to stop there, so that epoch trains no batch.
    """

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.starts: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append((time.perf_counter(), time.process_time()))
        if self.stop_at is not None and len(self.starts) >= self.stop_at:
            trainer.should_stop = True

    def round_times(self) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of every round that has a successor (start to next start)."""
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.starts, self.starts[1:])]


def quiet_trainer(epochs: int, callbacks: list[Callback]) -> L.Trainer:
    """A CPU Trainer with everything that is not training switched off."""
    return L.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def timed_fit(
    module: L.LightningModule, data: L.LightningDataModule, callback: FederatedCallback, warmup: int, rounds: int
) -> list[tuple[float, float]]:
    """Fit ``warmup + rounds`` rounds and return the (wall, CPU) seconds of the ``rounds`` after the warm-up."""
    timer = RoundTimer(stop_at=warmup + rounds + 1)
    trainer = quiet_trainer(warmup + rounds + 1, [callback, timer])
    torch.manual_seed(SEED + 1)  # the router's training noise: the same draws as the floor loop's
    trainer.fit(module, datamodule=data)
    return timer.round_times()[warmup : warmup + rounds]


class FloorLoop:
    """The rounds of ``FederatedCallback`` + ``FloralModule.training_step`` written out in plain PyTorch.

    Per sampled client: copy the global tensors into the model, fresh optimizer state, SGD over the client's
    batches from the ``RoundLoader`` with the module's loss (``compute_loss``, a plain function of outputs
    and targets) and, when the module preconditions, the preconditioned factor gradients; then the streaming
    average (p(k) for shared tensors, p(k|c) for slice c of adaptor tensors) and plain averaging as the server
    step. Only float tensors (no integer buffers), as in the models benchmarked here.
    """

    def __init__(
        self,
        module: FloralModule,
        data: FederatedDataModule,
        clients_per_round: int | float,
        seed: int = SEED,
        local_epochs: int = 1,
    ) -> None:
        self.model = module.model  # a FloralModel (or a SharedModel for FedAvg); no Lightning below this line
        self.floral = module.model.router is not None
        self.loss = module.compute_loss
        self.precondition = module.precondition and self.floral
        self.seed = seed
        self.loader = data.train_dataloader()
        self.loader.local_epochs = local_epochs
        self.train_sizes = data.train_sizes
        self.num_clients = data.num_clients
        self.clients_per_round = clients_per_round
        state = module.federated_state()
        self.names = list(state)
        self.live = [state[n] for n in self.names]
        self.global_ = [t.detach().clone() for t in self.live]
        roles = module.federated_roles()
        self.adaptor = [roles[n] == "adaptor" for n in self.names]
        opt = module.optimizer_options
        if self.floral:
            groups = [
                {"params": self.model.shared_parameters(), "lr": opt.lr},
                {"params": self.model.adaptor_parameters(), "lr": opt.adaptor_lr or opt.lr},
                {"params": self.model.private_parameters(), "lr": opt.router_lr},
            ]
        else:
            groups = [{"params": list(self.model.parameters()), "lr": opt.lr}]
        self.optimizer = torch.optim.SGD(groups, lr=opt.lr)

    def run_round(self, round_idx: int) -> None:
        """One round: every sampled client trains from the global weights, then the weighted average."""
        clients = sample_clients(self.num_clients, self.clients_per_round, self.seed, round_idx)
        self.loader.set_round(round_idx, clients)
        sums = [torch.zeros_like(t) for t in self.global_]
        shared_total, adaptor_total = 0.0, None
        active = None
        for x, y, k in self.loader:
            if k != active:
                if active is not None:
                    shared_total, adaptor_total = self._accumulate(sums, active, shared_total, adaptor_total)
                with torch.no_grad():
                    torch._foreach_copy_(self.live, self.global_)
                self.optimizer.state.clear()
                seed_local_training(self.seed, round_idx, k)  # router noise: the round loop's stream
                active = k
            self.optimizer.zero_grad(set_to_none=True)
            if self.floral:
                loss = self.loss(self.model(x, k), y)
                penalty = self.model.router.entropy_loss(k)
                (loss if penalty is None else loss + penalty).backward()
                if self.precondition:
                    self.model.precondition_gradients_()
            else:
                self.loss(self.model(x), y).backward()
            self.optimizer.step()
        shared_total, adaptor_total = self._accumulate(sums, active, shared_total, adaptor_total)
        with torch.no_grad():
            for g, s, is_adaptor in zip(self.global_, sums, self.adaptor):
                if is_adaptor:
                    g.copy_(s / adaptor_total.view(-1, *([1] * (s.dim() - 1))))
                else:
                    g.copy_(s / shared_total)
            torch._foreach_copy_(self.live, self.global_)

    @torch.no_grad()
    def _accumulate(
        self, sums: list[torch.Tensor], k: int, shared_total: float, adaptor_total: torch.Tensor | None
    ) -> tuple[float, torch.Tensor | None]:
        """Add client k's trained tensors to the running sums: weight n_k (shared), n_k p(c|k) (adaptor c)."""
        n = float(self.train_sizes[k])
        joint = n * torch.softmax(self.model.router.logits[k].float(), -1) if self.floral else None
        for s, t, is_adaptor in zip(sums, self.live, self.adaptor):
            if is_adaptor:
                s.addcmul_(t, joint.view(-1, *([1] * (t.dim() - 1))))
            else:
                s.add_(t, alpha=n)
        if joint is not None:
            adaptor_total = joint if adaptor_total is None else adaptor_total + joint
        return shared_total + n, adaptor_total

    def timed_rounds(self, warmup: int, rounds: int) -> list[tuple[float, float]]:
        """Run ``warmup + rounds`` rounds (as the trainer) and return (wall, CPU) seconds of the timed ones."""
        torch.manual_seed(SEED + 1)
        times = []
        for r in range(warmup + rounds):
            wall, cpu = time.perf_counter(), time.process_time()
            self.run_round(r)
            times.append((time.perf_counter() - wall, time.process_time() - cpu))
        return times[warmup:]


@dataclass(frozen=True)
class RoundSizes:
    """Sizes of the round benchmark: data per client, and how many runs and rounds are timed."""

    num_clients: int = 20
    train_per_client: int = 64
    test_per_client: int = 16
    batch_size: int = 64
    warmup: int = 1
    rounds: int = 2
    blocks: int = 6


FULL = RoundSizes()
QUICK = RoundSizes(train_per_client=16, batch_size=16, rounds=2, blocks=1)


def cifar_like_data(sizes: RoundSizes) -> FederatedDataModule:
    """cifar.yaml's data module on generated images: rotate clusters, flip + crop, batch size as given."""
    source = RandomImages(
        sizes.num_clients * sizes.train_per_client, sizes.num_clients * sizes.test_per_client, (3, 32, 32), 10, SEED
    )
    data = FederatedDataModule(
        source,
        num_clients=sizes.num_clients,
        num_clusters=4,
        cluster_transform="rotate",
        batch_size=sizes.batch_size,
        augment="flip_crop",
        seed=SEED,
    )
    data.setup("fit")
    return data


def cifar_module(num_clients: int, num_adaptors: int) -> FloralModule:
    """cifar.yaml's model (FedAvg with ``num_adaptors=0``), the same initial weights on every call."""
    torch.manual_seed(SEED)
    return FloralModule(
        CifarCNN(10),
        num_clients=num_clients,
        num_adaptors=num_adaptors,
        rank=0.01,
        optimizer=ClientOptimizer(lr=0.03, router_lr=0.1),
    )


def _max_state_difference(a: FloralModule, b: FloralModule) -> float:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return max(float((sa[n] - sb[n]).abs().max()) for n in sa)


def measure(sizes: RoundSizes) -> dict[str, dict]:
    """Round times of the four runs (method x runner), interleaved in blocks, and the floor's fidelity."""
    data = cifar_like_data(sizes)
    methods = {"FLoRAL": 4, "FedAvg": 0}
    runners: dict[str, Callable[[FloralModule], list[tuple[float, float]]]] = {
        "trainer": lambda m: timed_fit(m, data, FederatedCallback(1.0, seed=SEED), sizes.warmup, sizes.rounds),
        "floor": lambda m: FloorLoop(m, data, 1.0).timed_rounds(sizes.warmup, sizes.rounds),
    }
    runs = [(method, runner) for method in methods for runner in runners]
    times: dict[tuple[str, str], list[tuple[float, float]]] = {run: [] for run in runs}
    finals: dict[tuple[str, str], FloralModule] = {}
    for block in range(sizes.blocks):
        for method, runner in rotated(runs, block):
            module = cifar_module(sizes.num_clients, methods[method])
            times[(method, runner)] += runners[runner](module)
            finals[(method, runner)] = module
    loader = data.train_dataloader()
    loader.set_round(0, list(range(sizes.num_clients)))
    return {
        "times": times,
        "max_abs_difference": {m: _max_state_difference(finals[(m, "trainer")], finals[(m, "floor")]) for m in methods},
        "steps_per_round": len(loader),
    }


def _wall(samples: list[tuple[float, float]]) -> list[float]:
    return [w for w, _ in samples]


def _cpu(samples: list[tuple[float, float]]) -> list[float]:
    return [c for _, c in samples]


def run(quick: bool = False) -> list[Section]:
    """The ``round`` and ``fedavg_vs_floral`` sections."""
    sizes = QUICK if quick else FULL
    result = measure(sizes)
    times, steps = result["times"], result["steps_per_round"]
    wall = {key: median(_wall(samples)) for key, samples in times.items()}
    cpu = {key: median(_cpu(samples)) for key, samples in times.items()}
    round_figures = []
    for method in ("FLoRAL", "FedAvg"):
        trainer, floor = (method, "trainer"), (method, "floor")
        round_figures += [
            Figure(
                f"{method} round, hand-written floor",
                round(wall[floor] * 1e3, 2),
                "ms/round",
                ratio=1.0,
                detail={
                    "round_ms": spread(_wall(times[floor]), 1e3),
                    "cpu_ms": spread(_cpu(times[floor]), 1e3),
                    "max_abs_difference_to_trainer": result["max_abs_difference"][method],
                },
            ),
            Figure(
                f"{method} round, Trainer + FederatedCallback",
                round(wall[trainer] * 1e3, 2),
                "ms/round",
                ratio=round(wall[trainer] / wall[floor], 3),
                target=ROUND_TARGET,
                detail={
                    "round_ms": spread(_wall(times[trainer]), 1e3),
                    "cpu_ms": spread(_cpu(times[trainer]), 1e3),
                    "cpu_ratio": round(cpu[trainer] / cpu[floor], 3),
                    "overhead_ms_per_step": round((wall[trainer] - wall[floor]) / steps * 1e3, 3),
                    "cpu_overhead_ms_per_step": round((cpu[trainer] - cpu[floor]) / steps * 1e3, 3),
                },
            ),
        ]
    params = {**vars(sizes), "steps_per_round": steps, "clients_per_round": sizes.num_clients}
    method_text = (
        f"{sizes.num_clients} clients x {sizes.train_per_client} RandomImages 3x32x32 (rotate clusters, flip_crop), "
        f"batch {sizes.batch_size}, 1 local epoch, CifarCNN, FLoRAL C=4 rho=1% or FedAvg. Trainer rounds are timed "
        "start-to-start of on_train_epoch_start (validation/logger/checkpoints/progress bar off); the floor is a "
        "plain PyTorch loop over the same RoundLoader batches with the same SGD groups and the same p(k)/p(k|c) "
        f"averaging. {sizes.blocks} block(s), each running every (method, runner) pair once in rotated order; "
        f"each run: {sizes.warmup} warm-up round, {sizes.rounds} timed rounds. value = median wall time "
        "(perf_counter) of a round, ratio = trainer / floor; the detail also has process CPU time (process_time), "
        "which is less disturbed by other processes' load when torch uses one thread. "
        "max_abs_difference_to_trainer: largest difference between the final weights of the floor and of the "
        "trainer (same seeds): 0 means the floor did exactly the same work."
    )
    fl, fa = ("FLoRAL", "trainer"), ("FedAvg", "trainer")
    fl_floor, fa_floor = ("FLoRAL", "floor"), ("FedAvg", "floor")
    versus = [
        Figure(
            "FLoRAL / FedAvg round time, Trainer",
            round(wall[fl] * 1e3, 2),
            "ms/round",
            ratio=round(wall[fl] / wall[fa], 3),
            target=FLORAL_VS_FEDAVG_TARGET,
            detail={"fedavg_ms": round(wall[fa] * 1e3, 2), "cpu_ratio": round(cpu[fl] / cpu[fa], 3)},
        ),
        Figure(
            "FLoRAL / FedAvg round time, floor",
            round(wall[fl_floor] * 1e3, 2),
            "ms/round",
            ratio=round(wall[fl_floor] / wall[fa_floor], 3),
            detail={
                "fedavg_ms": round(wall[fa_floor] * 1e3, 2),
                "cpu_ratio": round(cpu[fl_floor] / cpu[fa_floor], 3),
            },
        ),
    ]
    versus_text = (
        "The trainer round times of the round section: FLoRAL (C=4, rho=1%) over FedAvg on the same model, data "
        "and batches; the floor ratio is the same comparison without Lightning (the compute cost of the adaptors)."
    )
    return [
        Section("round", round_figures, method_text, params),
        Section("fedavg_vs_floral", versus, versus_text, params),
    ]
