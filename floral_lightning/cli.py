"""The command line: ``python train.py fit --config conf/cifar.yaml`` (LightningCLI, omegaconf parser)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from callbacks import FederatedCallback

from .data import FederatedDataModule
from .module import FloralModule


class FloralCLI(LightningCLI):
    """LightningCLI whose model and data are ``FloralModule`` and ``FederatedDataModule`` (or subclasses).

    The round loop is always on: its options are the top-level ``federated`` section
    (``--federated.clients_per_round=0.1``). ``model.init_args.num_clients`` is linked to
    ``data.init_args.num_clients``; configs are parsed with omegaconf so ``${...}`` interpolation works;
    unknown keys are errors.

    ``--lr_scheduler`` becomes the model's ``lr_scheduler`` option (a schedule over rounds that scales each
    parameter group's own rate). ``--optimizer`` is refused: Lightning would replace the module's optimizer
    with one whose single rate drops the per-group rates (base, adaptors, router); the client optimizer is
    ``model.init_args.optimizer``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FederatedCallback, "federated")
        parser.link_arguments("data.init_args.num_clients", "model.init_args.num_clients")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
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
