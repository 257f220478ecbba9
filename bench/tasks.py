"""Seconds per round of every shipped task: FLoRAL and FedAvg through the Trainer, and the hand-written floor.

Each task is built by the command line from its shipped config (``floral_lightning.cli.main(args,
run=False)``: the same model, data module, round loop, optimizer and seed as ``train.py fit``), FedAvg by the
override ``--model.init_args.num_adaptors=0``. Data that cannot be downloaded here is replaced: MNIST by the
offline subset ``../shared/data/mnist_subset.npz``, CIFAR-10/100 by ``RandomImages`` of the same shape and
classes with ``TaskSpec.images_per_client`` training images per client (fewer than the real data sets, so a
round has fewer steps; the per-step costs are the same). CIFAR-100 runs as the spec's task, the 5 % variant
(``conf/reduced.yaml`` overlaid).

- **Trainer** rounds: ``Trainer.fit`` with stamps (``time.perf_counter``) at every ``on_train_epoch_start``
  and around validation; a round's training time is the time between consecutive epoch starts minus the
  validation inside it, so everything Lightning does per step and between rounds is included. Logger,
  checkpoints, progress bar, model summary and sanity check are off. Validation (all clients' test sets)
  runs once per run and is timed alone; **s/round** is the training round plus the validation divided by
  the config's ``check_val_every_n_epoch``, i.e. a round at the config's evaluation interval, as the
  issue's (t(R2) - t(R1)) / (R2 - R1) measures it without the start-up.
- **Floor** rounds: :class:`bench.rounds.FloorLoop` on the same model, batches, optimizer groups, loss,
  preconditioning and p(k) / p(k|c) averaging in plain PyTorch (training only). Not for CIFAR-100: its
  config's server optimizer is Adam, which the floor does not implement.
- **Per-client** and **per-round** rounds (the small tasks, ``TaskSpec.vectorise``): ``Trainer.fit`` as the
  Trainer rounds, with ``--federated.lightning_step=client`` or ``=round`` (one Lightning step per client or per
  round, ``floral_lightning.batch_runs``); the run fails if the round loop stayed batch by batch. Compared with
  the floor (target 1.3, issue 13 part 2) and FLoRAL with FedAvg (target 1.2, part 1); their final weights
  equal the Trainer rounds' exactly (``max_abs_difference_to_trainer``).
- **Vectorised** rounds (the small tasks, ``TaskSpec.vectorise``): ``Trainer.fit`` as the Trainer rounds, with
  ``--federated.vectorise=true`` (the round's sampled clients trained at once, ``floral_lightning.vectorised``);
  the run fails if the round loop fell back to one client after another. Compared with the Trainer rounds
  (``vectorised round / sequential round``, target 1/3 for FLoRAL: at least 3x faster; FedAvg's rows are
  context) and with the floor.

Runs alternate in blocks (every method x runner pair once per block, order rotated); each run has one
untimed warm-up round. Values are medians over the timed rounds of all blocks.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from bench.common import ROOT, Figure, Section, median, rotated, spread
from bench.rounds import FloorLoop
from callbacks import FederatedCallback

MNIST_NPZ = ROOT.parent / "shared" / "data" / "mnist_subset.npz"
FEDAVG = ["--model.init_args.num_adaptors=0"]
FLORAL_VS_FEDAVG_TARGET = 1.2  # FLoRAL s/round / FedAvg s/round (issue 13, part 1)
TRAINER_VS_FLOOR_TARGET = 1.3  # Trainer round / floor round on the small tasks (issue 13, part 2)
VECTORISED_TARGET = round(1 / 3, 4)  # vectorised round / sequential Trainer round: >= 3x (issue 13, part 3)
VECTORISE = ["--federated.vectorise=true"]
RUNS = ("client", "round")  # federated.lightning_step values other than "batch"

#: Reference FLoRAL (the paper's public implementation), s/round on this kind of machine, as given in issue 13
#: (MNIST rotate with its data cached; CIFAR: the reference's CIFAR subset).
REFERENCE_FLORAL = {"synthetic_linear": 1.69, "synthetic_mlp": 5.87, "mnist_rotate": 11.5, "cifar10_rotate": 34.0}
#: This project's own s/round before the per-step work of issue 13 (FLoRAL, FedAvg), as given in the issue
#: (one torch thread, the other core busy; CIFAR-10 with 254 images per client).
BEFORE = {
    "synthetic_linear": (0.100, 0.061),
    "synthetic_mlp": (1.40, 0.66),
    "mnist_rotate": (0.51, 0.33),
    "cifar10_rotate": (7.5, 6.9),
}


@dataclass(frozen=True)
class TaskSpec:
    """A shipped task: its config files, data replacement, how many rounds to time, and its targets."""

    configs: tuple[str, ...]
    rounds: int
    data: str = "config"  # "config", "mnist" (the offline subset) or "images" (RandomImages)
    images_per_client: int = 64
    num_classes: int = 10
    floor: bool = True
    trainer_vs_floor_target: float | None = None
    blocks: int = 2  # interleaving blocks in the full run (1 in --quick)
    vectorise: bool = False  # also time vectorised rounds (federated.vectorise)


TASKS: dict[str, TaskSpec] = {
    "synthetic_linear": TaskSpec(
        ("conf/synthetic_linear.yaml",), 20, trainer_vs_floor_target=TRAINER_VS_FLOOR_TARGET, vectorise=True
    ),
    "synthetic_mlp": TaskSpec(
        ("conf/synthetic_mlp.yaml",), 4, trainer_vs_floor_target=TRAINER_VS_FLOOR_TARGET, vectorise=True
    ),
    "mnist_rotate": TaskSpec(
        ("conf/mnist.yaml",), 6, "mnist", trainer_vs_floor_target=TRAINER_VS_FLOOR_TARGET, vectorise=True
    ),
    "mnist_label_shift": TaskSpec(
        ("conf/mnist_label_shift.yaml",), 6, "mnist", trainer_vs_floor_target=TRAINER_VS_FLOOR_TARGET, vectorise=True
    ),
    "cifar10_rotate": TaskSpec(("conf/cifar.yaml",), 2, "images", blocks=1),
    "cifar10_label_shift": TaskSpec(("conf/cifar_label_shift.yaml",), 2, "images", blocks=1),
    "cifar100_reduced": TaskSpec(
        ("conf/cifar100.yaml", "conf/reduced.yaml"),
        2,
        "images",
        images_per_client=500,
        num_classes=100,
        floor=False,
        blocks=1,
    ),
}
QUICK_TASKS = {"synthetic_linear": 3}  # task -> timed rounds in --quick (the suite's test runs it)


@dataclass
class RunTimes:
    """Per-round training seconds (wall, CPU) of one run, and its validation seconds."""

    rounds: list[tuple[float, float]] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)


class PhaseTimer(Callback):
    """Stamps every epoch (= round) start and every validation; stops the fit after ``stop_at`` epoch starts.

    The ``stop_at``-th stamp only closes the last timed round: that epoch trains no batch.
    """

    def __init__(self, stop_at: int) -> None:
        self.stop_at = stop_at
        self.starts: list[tuple[float, float]] = []
        self.validations: dict[int, float] = {}  # epoch -> seconds of its validation
        self._validation_start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append((time.perf_counter(), time.process_time()))
        if len(self.starts) >= self.stop_at:
            trainer.should_stop = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.validations[trainer.current_epoch] = time.perf_counter() - self._validation_start

    def times(self) -> RunTimes:
        """Training (wall, CPU) seconds of every closed round, validation excluded, and the validations."""
        out = RunTimes(validation=list(self.validations.values()))
        for epoch, (a, b) in enumerate(zip(self.starts, self.starts[1:])):
            val = self.validations.get(epoch, 0.0)
            out.rounds.append((b[0] - a[0] - val, b[1] - a[1] - val))
        return out


def cli_args(name: str, spec: TaskSpec, extra: list[str], epochs: int, val_every: int, log_dir: str) -> list[str]:
    """The command-line arguments that build the task (as ``train.py fit`` would, minus logging/checkpoints)."""
    args = [a for config in spec.configs for a in ("--config", config)]
    if spec.data == "mnist":
        args += [
            "--data.init_args.source=floral_lightning.data.NpzArrays",
            f"--data.init_args.source.init_args.path={MNIST_NPZ}",
        ]
    elif spec.data == "images":
        clients = {"cifar100_reduced": 100}.get(name, 20)
        args += [
            "--data.init_args.source=floral_lightning.data.RandomImages",
            f"--data.init_args.source.init_args.num_train={clients * spec.images_per_client}",
            f"--data.init_args.source.init_args.num_test={clients * 16}",
            f"--data.init_args.source.init_args.num_classes={spec.num_classes}",
        ]
    return [
        *args,
        # the floor starts the router from zero logits (it runs no fit start): so do the timed fits
        "--model.init_args.router.init=zeros",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.check_val_every_n_epoch={val_every}",
        f"--trainer.default_root_dir={log_dir}",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.num_sanity_val_steps=0",
        *extra,
    ]


def _build(name: str, spec: TaskSpec, extra: list[str], epochs: int, val_every: int, log_dir: str):
    from floral_lightning.cli import main

    return main(cli_args(name, spec, extra, epochs, val_every, log_dir), run=False)


def config_val_interval(spec: TaskSpec) -> int:
    """The config's own ``check_val_every_n_epoch`` (the last config that sets it wins)."""
    import yaml

    interval = 1
    for config in spec.configs:
        trainer = (yaml.safe_load((ROOT / config).read_text()) or {}).get("trainer") or {}
        interval = trainer.get("check_val_every_n_epoch", interval)
    return int(interval)


def trainer_run(name: str, spec: TaskSpec, extra: list[str], warmup: int, rounds: int, log_dir: str):
    """One timed ``Trainer.fit``: ``warmup`` untimed rounds, ``rounds`` timed ones, one validation at the end."""
    epochs = warmup + rounds + 1
    cli = _build(name, spec, extra, epochs, warmup + rounds, log_dir)
    timer = PhaseTimer(stop_at=epochs)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    times = timer.times()
    times.rounds = times.rounds[warmup : warmup + rounds]
    return times, cli.model


def vectorised_run(name: str, spec: TaskSpec, extra: list[str], warmup: int, rounds: int, log_dir: str):
    """``trainer_run`` with the round's clients trained at once (``--federated.vectorise=true``); fails if the
    round loop fell back to training them one after another (the row would then time the sequential loop)."""
    epochs = warmup + rounds + 1
    cli = _build(name, spec, [*extra, *VECTORISE], epochs, warmup + rounds, log_dir)
    timer = PhaseTimer(stop_at=epochs)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedCallback))
    if callback.vectorised is None:
        raise RuntimeError(f"{name}: federated.vectorise fell back to sequential rounds: {callback.sequential_reason}")
    times = timer.times()
    times.rounds = times.rounds[warmup : warmup + rounds]
    return times, cli.model


def batch_runs_run(
    per: str, name: str, spec: TaskSpec, extra: list[str], warmup: int, rounds: int, log_dir: str
) -> tuple[RunTimes, L.LightningModule]:
    """``trainer_run`` with one Lightning step per client or per round (``--federated.lightning_step=per``); fails
    if the round loop stayed batch by batch (the row would then time the per-batch loop)."""
    epochs = warmup + rounds + 1
    cli = _build(name, spec, [*extra, f"--federated.lightning_step={per}"], epochs, warmup + rounds, log_dir)
    timer = PhaseTimer(stop_at=epochs)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedCallback))
    if callback.batch_by_batch_reason is not None:
        raise RuntimeError(f"{name}: lightning_step={per} stayed batch by batch: {callback.batch_by_batch_reason}")
    times = timer.times()
    times.rounds = times.rounds[warmup : warmup + rounds]
    return times, cli.model


def floor_run(name: str, spec: TaskSpec, extra: list[str], warmup: int, rounds: int, log_dir: str):
    """The same rounds in the plain-PyTorch floor loop (training only)."""
    cli = _build(name, spec, extra, warmup + rounds + 1, warmup + rounds, log_dir)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, FederatedCallback))
    cli.datamodule.setup("fit")
    loop = FloorLoop(
        cli.model, cli.datamodule, callback.clients_per_round, seed=callback.seed, local_epochs=callback.local_epochs
    )
    times = RunTimes(rounds=loop.timed_rounds(warmup, rounds))
    return times, cli.model


def _max_difference(a: L.LightningModule, b: L.LightningModule) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((float((sa[n].double() - sb[n].double()).abs().max()) for n in sa if sa[n].numel()), default=0.0)


def measure(tasks: dict[str, int], blocks: int | None, warmup: int = 1) -> dict[str, dict]:
    """Round times of every task's runs (method x runner), interleaved in blocks per task (``blocks``, or each
    task's own ``TaskSpec.blocks`` when ``None``)."""
    methods = {"FLoRAL": [], "FedAvg": FEDAVG}
    runners: dict[str, Callable] = {
        "trainer": trainer_run,
        "floor": floor_run,
        "client": partial(batch_runs_run, "client"),
        "round": partial(batch_runs_run, "round"),
        "vectorised": vectorised_run,
    }
    results = {}
    with tempfile.TemporaryDirectory() as log_dir:
        for name, rounds in tasks.items():
            spec = TASKS[name]
            wanted = {"trainer": True, "floor": spec.floor, "vectorised": spec.vectorise}
            wanted |= {per: spec.vectorise for per in RUNS}
            runs = [(m, r) for m in methods for r in runners if wanted[r]]
            times = {run: RunTimes() for run in runs}
            finals = {}
            start = time.perf_counter()
            for block in range(spec.blocks if blocks is None else blocks):
                for method, runner in rotated(runs, block):
                    run_dir = tempfile.mkdtemp(dir=log_dir)  # the CLI saves its config there, once per directory
                    run_times, module = runners[runner](name, spec, methods[method], warmup, rounds, run_dir)
                    times[(method, runner)].rounds += run_times.rounds
                    times[(method, runner)].validation += run_times.validation
                    finals[(method, runner)] = module
            difference = {
                m: _max_difference(finals[(m, "trainer")], finals[(m, "floor")]) for m in methods if spec.floor
            }
            vectorised_difference = {
                m: _max_difference(finals[(m, "trainer")], finals[(m, "vectorised")]) for m in methods if spec.vectorise
            }
            runs_difference = {
                (m, per): _max_difference(finals[(m, "trainer")], finals[(m, per)])
                for m in methods
                for per in RUNS
                if spec.vectorise
            }
            results[name] = {
                "times": times,
                "max_abs_difference": difference,
                "vectorised_max_abs_difference": vectorised_difference,
                "runs_max_abs_difference": runs_difference,
                "val_interval": config_val_interval(spec),
                "seconds": time.perf_counter() - start,
            }
    return results


def versus_floor(
    name: str,
    spec: TaskSpec,
    times: dict[tuple[str, str], RunTimes],
    label: str,
    run: tuple[str, str],
    difference: float,
    **detail: float,
) -> Figure:
    """The figure of a Trainer run ``(method, runner)`` against the floor of the same method: median training
    round and its ratio (target ``spec.trainer_vs_floor_target``); ``difference``: of their final weights."""
    floor = (run[0], "floor")
    wall = {r: median([w for w, _ in times[r].rounds]) for r in (run, floor)}
    cpu = {r: median([c for _, c in times[r].rounds]) for r in (run, floor)}
    return Figure(
        f"{name}: {run[0]} {label} / floor round",
        round(wall[run], 4),
        "s/round",
        ratio=round(wall[run] / wall[floor], 3),
        target=spec.trainer_vs_floor_target,
        detail={
            "floor_s": spread([w for w, _ in times[floor].rounds]),
            "trainer_s": spread([w for w, _ in times[run].rounds]),
            "cpu_ratio": round(cpu[run] / cpu[floor], 3),
            **detail,
            "max_abs_difference_to_trainer": difference,
        },
    )


def run(quick: bool = False, only: list[str] | None = None) -> Section:
    """The ``tasks`` section (``only``: a subset of the tasks)."""
    tasks = QUICK_TASKS if quick else {name: spec.rounds for name, spec in TASKS.items()}
    if only:
        tasks = {name: rounds for name, rounds in tasks.items() if name in only}
    results = measure(tasks, 1 if quick else None)
    figures = []
    for name, result in results.items():
        spec, times, interval = TASKS[name], result["times"], result["val_interval"]
        train = {run: median([w for w, _ in t.rounds]) for run, t in times.items()}
        cpu = {run: median([c for _, c in t.rounds]) for run, t in times.items()}
        val = {m: median(times[(m, "trainer")].validation) for m in ("FLoRAL", "FedAvg")}
        per_round = {m: train[(m, "trainer")] + val[m] / interval for m in ("FLoRAL", "FedAvg")}
        before = BEFORE.get(name)
        figures.append(
            Figure(
                f"{name}: FLoRAL s/round / FedAvg s/round",
                round(per_round["FLoRAL"], 4),
                "s/round",
                ratio=round(per_round["FLoRAL"] / per_round["FedAvg"], 3),
                target=FLORAL_VS_FEDAVG_TARGET,
                detail={
                    "fedavg_s_per_round": round(per_round["FedAvg"], 4),
                    "training_round_s": {m: spread([w for w, _ in times[(m, "trainer")].rounds]) for m in val},
                    "validation_s": {m: spread(times[(m, "trainer")].validation) for m in val},
                    "val_interval": interval,
                    "cpu_ratio_training": round(cpu[("FLoRAL", "trainer")] / cpu[("FedAvg", "trainer")], 3),
                    "before_issue_13": None
                    if before is None
                    else {"floral_s": before[0], "fedavg_s": before[1], "ratio": round(before[0] / before[1], 2)},
                },
            )
        )

        if spec.floor:
            for method in ("FLoRAL", "FedAvg"):
                difference = result["max_abs_difference"][method]
                figures.append(versus_floor(name, spec, times, "Trainer round", (method, "trainer"), difference))
        if spec.vectorise and spec.floor:
            for per in RUNS:
                for method in ("FLoRAL", "FedAvg"):
                    difference = result["runs_max_abs_difference"][(method, per)]
                    speed_up = round(train[(method, "trainer")] / train[(method, per)], 2)
                    label = f"one Lightning step per {per}: Trainer round"
                    detail = {"speed_up_over_one_step_per_batch": speed_up}
                    figures.append(versus_floor(name, spec, times, label, (method, per), difference, **detail))
                figures.append(
                    Figure(
                        f"{name}: one Lightning step per {per}: FLoRAL round / FedAvg round",
                        round(train[("FLoRAL", per)], 4),
                        "s/round",
                        ratio=round(train[("FLoRAL", per)] / train[("FedAvg", per)], 3),
                        target=FLORAL_VS_FEDAVG_TARGET,
                        detail={
                            "fedavg_s": round(train[("FedAvg", per)], 4),
                            "floor_ratio": round(train[("FLoRAL", "floor")] / train[("FedAvg", "floor")], 3),
                            "cpu_ratio": round(cpu[("FLoRAL", per)] / cpu[("FedAvg", per)], 3),
                        },
                    )
                )
        if spec.vectorise:
            for method in ("FLoRAL", "FedAvg"):
                trainer, vectorised, floor = (method, "trainer"), (method, "vectorised"), (method, "floor")
                figures.append(
                    Figure(
                        f"{name}: {method} vectorised round / sequential Trainer round",
                        round(train[vectorised], 4),
                        "s/round",
                        ratio=round(train[vectorised] / train[trainer], 4),
                        target=VECTORISED_TARGET if method == "FLoRAL" else None,  # FedAvg's: context
                        detail={
                            "speed_up": round(train[trainer] / train[vectorised], 2),
                            "cpu_speed_up": round(cpu[trainer] / cpu[vectorised], 2),
                            "speed_up_over_floor": None
                            if floor not in train
                            else round(train[floor] / train[vectorised], 2),
                            "vectorised_s": spread([w for w, _ in times[vectorised].rounds]),
                            "trainer_s": spread([w for w, _ in times[trainer].rounds]),
                            "max_abs_difference_to_trainer": result["vectorised_max_abs_difference"][method],
                        },
                    )
                )
        if name in REFERENCE_FLORAL:
            reference = REFERENCE_FLORAL[name]
            figures.append(
                Figure(
                    f"{name}: FLoRAL s/round / reference FLoRAL s/round (given)",
                    round(per_round["FLoRAL"], 4),
                    "s/round",
                    ratio=round(per_round["FLoRAL"] / reference, 4),
                    detail={"reference_s_per_round": reference, "source": "issue 13, measured on this kind of machine"},
                )
            )
    params = {
        "tasks": {
            name: {
                "configs": list(TASKS[name].configs),
                "data": TASKS[name].data,
                "images_per_client": TASKS[name].images_per_client if TASKS[name].data == "images" else None,
                "timed_rounds_per_run": rounds,
            }
            for name, rounds in tasks.items()
        },
        "blocks": {name: 1 if quick else TASKS[name].blocks for name in tasks},
        "warmup_rounds_per_run": 1,
    }
    return Section("tasks", figures, __doc__.strip(), params)


def summary_table(section: Section) -> str:
    """The per-task table: FLoRAL and FedAvg s/round, their ratio, and Trainer / floor for each method."""
    figures = {f.name: f for f in section.figures}
    lines = [
        "| task | FLoRAL s/round | FedAvg s/round | FLoRAL / FedAvg (CPU time) | Trainer / floor, FLoRAL | "
        "Trainer / floor, FedAvg |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in section.params["tasks"]:
        versus = figures[f"{name}: FLoRAL s/round / FedAvg s/round"]
        floors = [figures.get(f"{name}: {m} Trainer round / floor round") for m in ("FLoRAL", "FedAvg")]
        cells = ["-" if f is None else f"{f.ratio:.2f}x" for f in floors]
        lines.append(
            f"| {name} | {versus.value:.3f} | {versus.detail['fedavg_s_per_round']:.3f} | {versus.ratio:.2f}x "
            f"({versus.detail['cpu_ratio_training']:.2f}x) | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def batch_runs_table(section: Section) -> str:
    """One Lightning step per batch, per client and per round vs the floor, per task and method."""
    figures = {f.name: f for f in section.figures}
    lines = [
        "| task | method | floor s/round | per batch / floor | per client / floor | per round / floor | "
        "FLoRAL / FedAvg: per batch, client, round (floor) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in section.params["tasks"]:
        for method in ("FLoRAL", "FedAvg"):
            runs = [
                figures.get(f"{name}: {method} one Lightning step per {per}: Trainer round / floor round")
                for per in RUNS
            ]
            if None in runs:
                continue
            batch = figures[f"{name}: {method} Trainer round / floor round"]
            versus = ""
            if method == "FLoRAL":
                ratios = [figures[f"{name}: FLoRAL s/round / FedAvg s/round"].ratio]
                ratios += [
                    figures[f"{name}: one Lightning step per {per}: FLoRAL round / FedAvg round"].ratio for per in RUNS
                ]
                floor = figures[f"{name}: one Lightning step per round: FLoRAL round / FedAvg round"].detail[
                    "floor_ratio"
                ]
                versus = ", ".join(f"{r:.2f}x" for r in ratios) + f" ({floor:.2f}x)"
            lines.append(
                f"| {name} | {method} | {runs[0].detail['floor_s']['median']:.4f} | {batch.ratio:.2f}x | "
                + " | ".join(f"{r.ratio:.2f}x" for r in runs)
                + f" | {versus} |"
            )
    return "\n".join(lines)


def vectorised_table(section: Section) -> str:
    """Sequential Trainer vs floor vs vectorised round, per task and method (the tasks with vectorised rows)."""
    figures = {f.name: f for f in section.figures}
    lines = [
        "| task | method | Trainer s/round (sequential) | floor s/round | vectorised s/round | speed-up vs Trainer "
        "(CPU time) | speed-up vs floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in section.params["tasks"]:
        for method in ("FLoRAL", "FedAvg"):
            vectorised = figures.get(f"{name}: {method} vectorised round / sequential Trainer round")
            if vectorised is None:
                continue
            d = vectorised.detail
            floor = d["speed_up_over_floor"]
            floor_s = (
                "-"
                if floor is None
                else f"{figures[f'{name}: {method} Trainer round / floor round'].detail['floor_s']['median']:.4f}"
            )
            lines.append(
                f"| {name} | {method} | {d['trainer_s']['median']:.4f} | {floor_s} | {vectorised.value:.4f} | "
                f"{d['speed_up']:.2f}x ({d['cpu_speed_up']:.2f}x) | {'-' if floor is None else f'{floor:.2f}x'} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    from pathlib import Path

    from bench.common import quiet_lightning

    parser = argparse.ArgumentParser(description="The tasks section alone (python -m bench --only tasks runs it too).")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), help="a subset of the tasks (default: all)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="write the section as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_lightning()
    section = run(args.quick, args.tasks)
    print(summary_table(section))
    if any("one Lightning step per" in f.name for f in section.figures):
        print()
        print(batch_runs_table(section))
    if any(f.name.endswith("vectorised round / sequential Trainer round") for f in section.figures):
        print()
        print(vectorised_table(section))
    if args.out:
        Path(args.out).write_text(json.dumps(section.as_dict(), indent=2) + "\n")


if __name__ == "__main__":
    main()
