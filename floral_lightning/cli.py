"""The command line: ``python train.py fit --config conf/cifar.yaml`` (LightningCLI, omegaconf parser)."""

from __future__ import annotations

import dataclasses
import shlex
import signal
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks import FederatedCallback, FederatedProgressBar, RunReport
from callbacks.mixture_checkpoint import checkpoint_round
from callbacks.run_report import completed_rounds, flatten_options

from .data import FederatedDataModule
from .module import FloralModule

#: the config sections a run's HPARAMS show (with ``trainer.max_epochs``, the number of rounds)
HPARAM_SECTIONS = ("model", "data", "federated", "seed_everything")


def run_options(config: dict[str, Any]) -> dict[str, Any]:
    """The options that tell a grid's runs apart, flat for HPARAMS: ``model.rank``, ``model.router.temperature``,
    ``data.num_clients``, ``federated.clients_per_round``, ... A ``class_path`` becomes its class name under
    ``class`` (``model.class: FloralModule``, ``data.source.class: NpzArrays``) and ``init_args`` drops out."""

    def unwrap(value: Any) -> Any:
        if isinstance(value, dict) and "class_path" in value:
            return {"class": value["class_path"].rsplit(".", 1)[-1], **unwrap(value.get("init_args") or {})}
        if isinstance(value, dict):
            return {key: unwrap(item) for key, item in value.items()}
        return value

    sections = {key: unwrap(config[key]) for key in HPARAM_SECTIONS if key in config}
    sections["trainer.max_epochs"] = (config.get("trainer") or {}).get("max_epochs")
    return flatten_options(sections)


class FloralCLI(LightningCLI):
    """LightningCLI whose model and data are ``FloralModule`` and ``FederatedDataModule`` (or subclasses).

    The round loop is always on: its options are the top-level ``federated`` section
    (``--federated.clients_per_round=0.1``); so is the run report (``callbacks.RunReport``, options under
    ``report``), and the progress bar shows the client id as an int (``callbacks.FederatedProgressBar``).
    ``model.init_args.num_clients`` is linked to ``data.init_args.num_clients``; configs are parsed with
    omegaconf so ``${...}`` interpolation works; unknown keys are errors.

    ``--lr_scheduler`` becomes the model's ``lr_scheduler`` option (a schedule over rounds that scales each
    parameter group's own rate). ``--optimizer`` is refused: Lightning would replace the module's optimizer
    with one whose single rate drops the per-group rates (base, adaptors, router); the client optimizer is
    ``model.init_args.optimizer``.

    Resuming: ``--ckpt_path=last`` resumes from the newest ``last.ckpt`` of the run directory
    (``trainer.default_root_dir``; see :func:`find_last_checkpoint`) and starts from scratch when there is none,
    so the same command starts a run and resumes it after a crash. When resuming, a model option that differs from
    the checkpoint's hyperparameters is refused by name (:func:`differing_model_options`), never silently replaced.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FederatedCallback, "federated")
        parser.add_lightning_class_args(RunReport, "report")
        parser.link_arguments("data.init_args.num_clients", "model.init_args.num_clients")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        select_client_parallel(config["trainer"])
        optimizer = config.get("optimizer")
        if optimizer:
            raise ValueError(
                f"--optimizer={optimizer.get('class_path', optimizer)} is not supported: it would replace the "
                "client optimizer's parameter groups (base, adaptors, router), each with its own learning rate, "
                "by one optimizer at one rate. Set model.init_args.optimizer.{name,lr,adaptor_lr,router_lr,"
                "momentum,weight_decay} instead (name: sgd or adam)"
            )
        scheduler = config.get("lr_scheduler")
        if scheduler:
            scheduler = scheduler.as_dict()
            # resuming with --ckpt_path brings the run's schedule back as the model option: the same one is fine
            existing = config.model.init_args.get("lr_scheduler")
            if existing and existing != scheduler:
                raise ValueError(
                    f"--lr_scheduler={scheduler} differs from model.init_args.lr_scheduler={existing} "
                    "(from the config or the checkpoint being resumed); keep one of them"
                )
            config.model.init_args.lr_scheduler = scheduler
            config.lr_scheduler = None

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # the command line as given, for the resume command of a run stopped by a signal
        self.argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            self.config[subcommand] = resolve_resume(self.config[subcommand], subcommand)
            if self.config[subcommand].get("ckpt_path") is not None:
                # a resumed run without a logger writes its config.yaml where the crashed run wrote its own
                self.save_config_kwargs["overwrite"] = True

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except SystemExit as err:
            exit_if_stopped_by_signal(err, self.trainer, subcommand, self.argv)
            raise

    def instantiate_trainer(self, **kwargs: Any):
        trainer_config = self._get(self.config_init, "trainer", default={})
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks")) or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        # Lightning adds its own bar unless one is given; give ours, unless the bar is off or the user chose one
        if trainer_config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks
        ):
            kwargs["callbacks"] = [*callbacks, FederatedProgressBar()]
        trainer = super().instantiate_trainer(**kwargs)
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        for callback in trainer.callbacks:
            if isinstance(callback, RunReport):
                callback.hyperparameters = run_options(config.as_dict())
        return trainer


def select_client_parallel(trainer: Any) -> None:
    """Choose ``trainer.strategy=client_parallel`` (``floral_lightning.distributed``) when the trainer config asks for
    more than one process (``devices`` a count > 1, -1, or several device ids; or ``num_nodes`` > 1) and leaves
    the strategy at ``auto``: Lightning's own choice, DDP, would all-reduce gradients across different clients.
    ``devices="auto"`` is left alone (one process on CPU); a strategy the user names is kept."""
    if trainer["strategy"] != "auto":
        return
    devices = trainer["devices"]
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    several = (
        (isinstance(devices, int) and (devices > 1 or devices == -1))
        or (isinstance(devices, (list, tuple)) and len(devices) > 1)
        or int(trainer["num_nodes"] or 1) > 1
    )
    if several:
        trainer["strategy"] = "client_parallel"


def exit_if_stopped_by_signal(err: SystemExit, trainer: Any, subcommand: str, argv: list[str]) -> None:
    """Turn a run that a signal stopped into exit code 128 + the signal (143 for SIGTERM, 130 for SIGINT), after
    one line on stderr saying at which round it stopped and the command that resumes it; any other exit returns.

    Lightning ends a SIGTERM'd run with ``SIGTERMException`` (a ``SystemExit`` with code 0) and a Ctrl-C'd one with
    ``sys.exit(1)`` raised while handling the ``KeyboardInterrupt``: without this, a grid (or a scheduler) would
    take a run stopped at round 30 of 300 for a finished one. Neither path writes a checkpoint, so the newest
    ``last.ckpt`` is the last round-end one (a mid-round state could not be resumed exactly) and is left as is.
    """
    if isinstance(err, SIGTERMException):
        signum = signal.SIGTERM
    elif isinstance(err.__context__, KeyboardInterrupt):  # sys.exit(1) inside Lightning's KeyboardInterrupt handler
        signum = signal.SIGINT
    else:
        return
    where = f"stopped by {signum.name} during {subcommand}"
    if subcommand == "fit":
        where = f"stopped by {signum.name} after round {completed_rounds(trainer)}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:  # -1 or None: no limit
            where += f" of {trainer.max_epochs}"
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "")
        if checkpoint and Path(checkpoint).is_file():
            try:
                saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
                saved_round = checkpoint_round(saved)
            except Exception as read_error:  # the line must still come out, with the resume command
                saved_round = f"unreadable: {type(read_error).__name__}"
            # --ckpt_path=last finds it when it is the run directory's newest last.ckpt; otherwise name the file
            found = find_last_checkpoint(Path(trainer.default_root_dir))
            resume = "last" if found is not None and found.samefile(checkpoint) else checkpoint
            args = [a for i, a in enumerate(argv) if not _is_ckpt_path_arg(argv, i)]
            program = sys.argv[0] if sys.argv[0].endswith(".py") else "train.py"
            command = shlex.join(["python", program, *args, f"--ckpt_path={resume}"])
            where += f"; its last round-end checkpoint (round {saved_round}) is {checkpoint}; resume with: {command}"
        else:
            where += "; no round-end checkpoint was written, so a rerun starts from round 0"
    print(f"train.py: {where}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum) from err


def _is_ckpt_path_arg(argv: list[str], i: int) -> bool:
    """Whether ``argv[i]`` is a ``--ckpt_path`` option or its value (``--ckpt_path=X`` or ``--ckpt_path X``)."""
    return argv[i].startswith("--ckpt_path=") or argv[i] == "--ckpt_path" or (i > 0 and argv[i - 1] == "--ckpt_path")


def resolve_resume(config: Any, subcommand: str) -> Any:
    """Turn ``ckpt_path: last`` into the newest ``last.ckpt`` of the run directory (or ``None`` for a fresh
    ``fit``), and refuse to resume (``fit``) a checkpoint whose model options differ from the config's; ``validate``
    and ``test`` evaluate the checkpoint's model and say which config options it replaces."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path == "last":
        root = Path(config["trainer"].get("default_root_dir") or ".")
        found = find_last_checkpoint(root)
        if found is None and subcommand != "fit":
            _refuse(f"--ckpt_path=last: no last.ckpt under {root} to {subcommand}")
        if found is None:
            print(f"--ckpt_path=last: no last.ckpt under {root}; starting a new run", file=sys.stderr)
        else:
            print(f"--ckpt_path=last: resuming from {found}", file=sys.stderr)
        config["ckpt_path"] = None if found is None else str(found)
    elif _is_local_path(ckpt_path) and not Path(ckpt_path).is_file():
        _refuse(f"--ckpt_path={ckpt_path}: no such file; give a checkpoint file, or 'last' for the newest last.ckpt")
    if _is_local_path(config.get("ckpt_path")):
        hparams = _checkpoint_hparams(Path(config["ckpt_path"]))
        differ = differing_model_options(config["model"].as_dict(), hparams)
        if differ and subcommand != "fit":  # evaluating a checkpoint: its model, whatever the config says
            print(
                f"{subcommand}: the checkpoint's model options replace the config's: {', '.join(differ)}",
                file=sys.stderr,
            )
        elif differ:
            _refuse(
                f"resuming {config['ckpt_path']} with model options that differ from the checkpoint's: "
                f"{', '.join(differ)}. The checkpoint's weights belong to its own options: drop the override(s), "
                "or start a new run without --ckpt_path"
            )
    return config


def _is_local_path(ckpt_path: str | None) -> bool:
    """Whether ``ckpt_path`` names a local file (not a URL, nor one of Lightning's other keywords)."""
    return ckpt_path is not None and "://" not in ckpt_path and ckpt_path not in ("best", "hpc", "registry")


def find_last_checkpoint(root: Path) -> Path | None:
    """The newest (by modification time) ``last.ckpt`` of the run directory ``root``: under
    ``root/<logger name>/version_*/checkpoints/`` (one folder per run of the same command) or ``root/checkpoints/``
    (no logger)."""
    candidates = [*root.glob("*/version_*/checkpoints/last.ckpt"), *root.glob("checkpoints/last.ckpt")]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


def differing_model_options(model_config: dict[str, Any], hparams: dict[str, Any]) -> list[str]:
    """``model.<key>=<config value> (checkpoint: <value>)`` for every option saved in the checkpoint's
    hyperparameters that the config gives another value (options the module does not save, such as ``base``,
    are checked by the state dict's shapes when the weights load)."""
    saved = {k: v for k, v in hparams.items() if k not in ("_class_path", "_instantiator")}
    ours = _flatten(model_config.get("init_args") or {}, "model.init_args")
    differ = []
    if "_class_path" in hparams and model_config.get("class_path") != hparams["_class_path"]:
        differ.append(f"model.class_path={model_config.get('class_path')!r} (checkpoint: {hparams['_class_path']!r})")
    for key, value in _flatten(saved, "model.init_args").items():
        # repr: an int rank 1 (one component) is not the fraction 1.0 (the whole budget)
        if key in ours and repr(ours[key]) != repr(value):
            differ.append(f"{key}={ours[key]!r} (checkpoint: {value!r})")
    return differ


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Nested dicts and dataclasses as ``{dotted.key: leaf}``; tuples become lists (YAML has no tuples)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}"))
        return out
    if isinstance(value, tuple):
        value = list(value)
    return {prefix: value}


def _checkpoint_hparams(path: Path) -> dict[str, Any]:
    if not zipfile.is_zipfile(path):  # what torch.save writes; a truncated one has lost its directory
        _refuse(
            f"--ckpt_path={path}: not a checkpoint (not a complete torch.save archive: truncated, or another format)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # a truncated file, another format: name the file, not just the reader's complaint
        _refuse(f"--ckpt_path={path}: cannot read it as a checkpoint ({type(err).__name__}: {err})")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        _refuse(f"--ckpt_path={path}: not a Lightning checkpoint (no 'state_dict' in it)")
    return dict(checkpoint.get("hyper_parameters", {}))


def _refuse(message: str) -> None:
    """Exit like an argument error: the message on stderr, exit code 2, no traceback."""
    print(f"train.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(args: list[str] | None = None, run: bool = True) -> FloralCLI:
    return FloralCLI(
        FloralModule,
        FederatedDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
        run=run,
    )
