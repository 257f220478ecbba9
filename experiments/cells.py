"""The grid's cells: the tasks, the methods, and the ``train.py fit`` command of one (task, method, seed, rounds).

Adding a method is one entry in :data:`METHODS`; adding a task is one entry in :data:`TASKS`.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout: train.py and conf/ are here

#: task name -> (config files, later ones overlaying earlier ones; number of clusters C)
TASKS: dict[str, tuple[list[str], int]] = {
    "mnist_rotate": (["conf/mnist.yaml"], 4),
    "mnist_label_shift": (["conf/mnist_label_shift.yaml"], 4),
    "mnist_rotate_reduced": (["conf/mnist.yaml", "conf/reduced.yaml"], 4),
    "mnist_label_shift_reduced": (["conf/mnist_label_shift.yaml", "conf/reduced.yaml"], 4),
    "cifar10_rotate": (["conf/cifar.yaml"], 4),
    "cifar10_label_shift": (["conf/cifar_label_shift.yaml"], 4),
    "cifar10_rotate_reduced": (["conf/cifar.yaml", "conf/reduced.yaml"], 4),
    "cifar10_label_shift_reduced": (["conf/cifar_label_shift.yaml", "conf/reduced.yaml"], 4),
    "cifar100_reduced": (["conf/cifar100.yaml", "conf/reduced.yaml"], 10),
    "synthetic_linear": (["conf/synthetic_linear.yaml"], 2),
    "synthetic_mlp": (["conf/synthetic_mlp.yaml"], 4),
}

FEDAVG = ["--model.init_args.num_adaptors=0"]
ORACLE = ["--model.init_args.router.oracle=true"]
#: the paper's router start (all logits zero), pinned for the FLoRAL methods that ran with it: the MNIST and
#: synthetic configs start the router clustered (``router.init=clustered``, method ``floral1_cluster``)
PAPER_START = "--model.init_args.router.init=zeros"
#: method name -> (label in the table, class in floral_lightning.methods or None for the config's own
#: module, train.py overrides). ``{C}`` in an override is replaced by the task's number of clusters.
METHODS: dict[str, tuple[str, str | None, list[str]]] = {
    "fedavg": ("FedAvg", None, FEDAVG),
    "local_adaptor": ("Local Adaptor", "LocalAdaptorModule", []),
    "ensemble": ("Ensemble", "EnsembleModule", ["--model.init_args.num_members={C}"]),
    "ensemble_oracle": ("Ensemble (oracle)", "EnsembleModule", ["--model.init_args.num_members={C}", *ORACLE]),
    "floral1": ("FLoRAL(1%)", None, ["--model.init_args.rank=0.01", PAPER_START]),
    "floral1_noprecond": ("FLoRAL(1%) no precond.", None, ["--model.init_args.rank=0.01", PAPER_START,
                                                           "--model.init_args.precondition=false"]),
    "floral1_oracle": ("FLoRAL(1%) (oracle)", None, ["--model.init_args.rank=0.01", *ORACLE]),
    # beyond the paper (issue 12): router logits from a clustering of the clients' first updates
    "floral1_cluster": ("FLoRAL(1%) clustered start", None, ["--model.init_args.rank=0.01",
                                                             "--model.init_args.router.init=clustered"]),
    "floral10": ("FLoRAL(10%)", None, ["--model.init_args.rank=0.1", PAPER_START]),
    "floral10_oracle": ("FLoRAL(10%) (oracle)", None, ["--model.init_args.rank=0.1", *ORACLE]),
    # FineTune and FedProx also run on top of FLoRAL; pin them to the plain base here
    "finetune": ("FedAvg + fine-tuning", "FineTuneModule", FEDAVG),
    "ditto": ("Ditto", "DittoModule", []),
    "fedprox": ("FedProx", "FedProxModule", FEDAVG),
}  # fmt: skip


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    task: str
    method: str
    seed: int
    rounds: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        """(task, method, seed, rounds) as ``results.csv`` spells them."""
        return self.task, self.method, str(self.seed), str(self.rounds)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/seed {self.seed}"

    def run_dir(self, out: Path) -> Path:
        """The cell's run directory (its ``trainer.default_root_dir``). The rounds are part of it: a checkpoint of
        a 300-round run is not a point on the way to 500 rounds (a schedule over rounds depends on their number)."""
        return out / "runs" / self.task / self.method / f"seed{self.seed}_rounds{self.rounds}"


def method_overrides(task: str, method: str) -> list[str]:
    """The ``train.py`` arguments that turn a task's config into ``method``."""
    _, cls, overrides = METHODS[method]
    args = [o.replace("{C}", str(TASKS[task][1])) for o in overrides]
    if cls is not None:  # the config's init_args (its task included) carry over to the method's class
        args.insert(0, f"--model.class_path=floral_lightning.methods.{cls}")
    return args


def config_args(task: str) -> list[str]:
    """``--config FILE`` for each of the task's config files, in order."""
    return [arg for cfg in TASKS[task][0] for arg in ("--config", str(ROOT / cfg))]


def eval_every(rounds: int) -> int:
    """Rounds between evaluations (and checkpoints): about 20 per run, and a divisor of ``rounds``, so that the
    last round is always evaluated and checkpointed (Lightning evaluates every n-th epoch, not the last one)."""
    target = max(1, rounds // 20)
    return max(n for n in range(1, target + 1) if rounds % n == 0)


#: the cell's loggers: the CSV logger's ``metrics.csv`` is what the runner reads (see :mod:`experiments.record`);
#: TensorBoard is for people. The CSV logger comes first, so the checkpoints go under ``csv/version_*/``.
LOGGERS = (
    '[{{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: "{dir}", name: csv}}}}, '
    '{{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {{save_dir: "{dir}", name: tensorboard}}}}]'
)


def cell_command(cell: Cell, run_dir: Path, extra: list[str]) -> list[str]:
    """The ``train.py fit`` command of one cell.

    It evaluates and writes ``last.ckpt`` every :func:`eval_every` rounds (the configs' checkpoint callback is the
    last of ``trainer.callbacks``), and ``--ckpt_path=last`` makes the same command start the cell or resume it
    from its newest round-end checkpoint, exactly (see ``floral_lightning.cli``).
    """
    every = eval_every(cell.rounds)
    return [
        sys.executable, str(ROOT / "train.py"), "fit", *config_args(cell.task),
        f"--seed_everything={cell.seed}", f"--trainer.max_epochs={cell.rounds}",
        # ``callbacks.init_args`` sets the last callback so far: the config's checkpoint, before a method appends one
        f"--trainer.check_val_every_n_epoch={every}", f"--trainer.callbacks.init_args.every_n_epochs={every}",
        # the mixtures figure (half a second a draw) at every 5th evaluation and the last: 5 per run, not 20
        f"--report.figure_every_n_rounds={5 * every}",
        *method_overrides(cell.task, cell.method),
        f"--trainer.default_root_dir={run_dir}", f"--trainer.logger={LOGGERS.format(dir=run_dir)}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra, "--ckpt_path=last",
    ]  # fmt: skip


def client_parameters(module) -> int:
    """Parameters one client trains: all of the module's, counting one row of the router table."""
    return sum(
        p.numel() // p.shape[0] if name.endswith("router.logits") else p.numel()
        for name, p in module.named_parameters()
    )


def parameter_overhead(task: str, method: str, extra: list[str]) -> tuple[int, int]:
    """(base parameters, extra parameters per client) of a method on a task, without training.

    Extra counts everything a client trains beyond the base model: adaptors and its mixture logits, other
    ensemble members, a local adaptor or a personal model.
    """
    from floral_lightning.cli import main

    configs = config_args(task)
    # quiet: Lightning's start-up lines and its warning that the grid's own sys.argv is not the CLI's arguments
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in quiet]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for logger in quiet:
                logger.setLevel(logging.WARNING)
            fedavg = main([*configs, *method_overrides(task, "fedavg"), *extra], run=False).model
            model = main([*configs, *method_overrides(task, method), *extra], run=False).model
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
    base = client_parameters(fedavg)
    return base, client_parameters(model) - base
