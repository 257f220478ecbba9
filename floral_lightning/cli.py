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
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FederatedCallback, "federated")
        parser.link_arguments("data.init_args.num_clients", "model.init_args.num_clients")


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
