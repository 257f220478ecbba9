"""Bad inputs and what the user is told: the table that ``tests/test_reliability.py`` checks and that
``docs/reliability.md`` is generated from.

Each case builds a bad config, file, checkpoint or run, triggers it the way a user would (the CLI, a
``Trainer.fit``, a data module's ``setup``), and returns the message the user gets. The test asserts that the
message names what is wrong (``expect``: fragments that must all appear) and that the document shows exactly
this message. Regenerate the document after changing a message or a case:

    PYTHONPATH=. python tests/bad_inputs.py
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # federated_helpers, when run as a script

from federated_helpers import linear_data, quiet_trainer  # noqa: E402

from callbacks import FederatedCallback  # noqa: E402
from callbacks.mixture_checkpoint import read_mixtures, write_json_atomic  # noqa: E402
from floral_lightning.cli import main  # noqa: E402
from floral_lightning.data import FederatedDataModule, NpzArrays, SyntheticLinear  # noqa: E402
from floral_lightning.models import MLP  # noqa: E402
from floral_lightning.module import ClientOptimizer, FloralModule, RouterOptions  # noqa: E402
from floral_lightning.tasks import RegressionModule  # noqa: E402

DOC = ROOT / "docs" / "reliability.md"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
LINEAR = ["--config", str(ROOT / "conf" / "synthetic_linear.yaml"), *QUIET]


@dataclass(frozen=True)
class Case:
    """One bad input: ``run(workdir)`` triggers it and returns the message the user gets."""

    category: str  # config, data, checkpoint, runtime
    name: str
    run: Callable[[Path], str]
    expect: tuple[str, ...]  # fragments the message must contain: what is wrong, and the offending value


# --- how a message reaches the user -------------------------------------------------------------------------
def error_of(action: Callable[[], object]) -> str:
    """The message of the error ``action`` raises: the exception's text, or for a CLI exit the ``error:`` lines
    it printed. Raises ``AssertionError`` if nothing went wrong."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            action()
    except SystemExit as exit_:
        assert exit_.code not in (0, None), "the CLI exited with code 0"
        printed = stderr.getvalue()
        return printed[printed.index("error:") :] if "error:" in printed else str(exit_.code)
    except Exception as err:  # noqa: BLE001 - the point is to show whatever the user would see
        return f"{type(err).__name__}: {err}"
    raise AssertionError("no error was raised")


def warning_of(action: Callable[[], object]) -> str:
    """The text of the first ``UserWarning`` from the project that ``action`` emits (training continues)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    ours = [w for w in caught if "dropped from the round" in str(w.message)]
    assert ours, "no warning was emitted"
    return f"UserWarning: {ours[0].message}"


def cli(*args: str) -> Callable[[], object]:
    return lambda: main(list(args))


# --- small builders -----------------------------------------------------------------------------------------
def npz(workdir: Path, name: str, **overrides: np.ndarray) -> Path:
    """A small valid classification ``.npz`` (30/10 samples of 4 features, labels 0..2), with ``overrides``."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(30, 4)).astype(np.float32),
        "y_train": np.arange(30) % 3,
        "x_test": rng.normal(size=(10, 4)).astype(np.float32),
        "y_test": np.arange(10) % 3,
    }
    arrays.update(overrides)
    path = workdir / name
    np.savez(path, **arrays)
    return path


def npz_data(path: Path, num_classes: int | None = None, **kwargs) -> FederatedDataModule:
    return FederatedDataModule(NpzArrays(str(path), num_classes=num_classes), num_clients=3, batch_size=8, **kwargs)


def linear_module(num_clients: int = 6, **kwargs) -> RegressionModule:
    torch.manual_seed(0)
    return RegressionModule(nn.Linear(10, 3), num_clients=num_clients, num_adaptors=2, rank=1, **kwargs)


def classifier(in_features: int = 4, num_classes: int = 3, num_clients: int = 3) -> FloralModule:
    torch.manual_seed(0)
    return FloralModule(MLP(in_features, [8], num_classes), num_clients=num_clients, num_adaptors=2, rank=1)


def fit(module: L.LightningModule, data: L.LightningDataModule, rounds: int = 1, **callback) -> Callable[[], object]:
    return lambda: quiet_trainer(rounds, FederatedCallback(**callback)).fit(module, datamodule=data)


@functools.cache
def trained(workdir: Path) -> Path:
    """A 2-round run of ``conf/synthetic_linear.yaml`` through the CLI; its ``last.ckpt``."""
    root = workdir / "trained"
    main(["fit", *LINEAR, "--trainer.max_epochs=2", f"--trainer.default_root_dir={root}", "--trainer.logger=false"])
    return root / "checkpoints" / "last.ckpt"


def resume(workdir: Path, *overrides: str) -> Callable[[], object]:
    root = workdir / "resumed"  # the same run directory each time, as a user who retries
    return cli("fit", *LINEAR, f"--ckpt_path={trained(workdir)}", "--trainer.max_epochs=3", "--trainer.logger=false",
               f"--trainer.default_root_dir={root}", *overrides)  # fmt: skip


class Overflowing(RegressionModule):
    """Every client ends local training with a finite but huge bias (3e38, near float32's largest number)."""

    def on_client_end(self, client_id: int) -> None:
        with torch.no_grad():
            self.model.base.base.bias.fill_(3e38)
        super().on_client_end(client_id)


def corrupt(path: Path, target: Path, keep: float) -> Path:
    target.write_bytes(path.read_bytes()[: int(len(path.read_bytes()) * keep)])
    return target


def mismatched_mixtures(workdir: Path) -> Callable[[], object]:
    """A checkpoint whose mixtures file was overwritten by a later save (a crash between the two writes)."""
    checkpoint = trained(workdir)
    mixtures = checkpoint.with_name("last.mixtures.json")
    record = __import__("json").loads(mixtures.read_text())
    split = workdir / "split" / "last.ckpt"
    split.parent.mkdir(exist_ok=True)
    split.write_bytes(checkpoint.read_bytes())
    write_json_atomic(record | {"round": record["round"] + 1, "global_step": record["global_step"] + 20},
                      split.with_name("last.mixtures.json"))  # fmt: skip
    return lambda: read_mixtures(split)


# --- the table ----------------------------------------------------------------------------------------------
CASES = [
    # config
    Case("config", "unknown option in a config or on the command line",
         lambda w: error_of(cli("fit", *LINEAR, "--model.init_args.rnak=3")), ("rnak",)),
    Case("config", "clients_per_round fraction above 1",
         lambda w: error_of(fit(linear_module(), linear_data(), clients_per_round=1.5)),
         ("clients_per_round=1.5", "(0, 1]")),
    Case("config", "clients_per_round count above num_clients",
         lambda w: error_of(fit(linear_module(), linear_data(), clients_per_round=7)),
         ("clients_per_round=7", "num_clients=6")),
    Case("config", "local_epochs below 1", lambda w: error_of(lambda: FederatedCallback(local_epochs=0)),
         ("local_epochs=0", ">= 1")),
    Case("config", "unknown lightning_step",
         lambda w: error_of(cli("fit", *LINEAR, "--federated.lightning_step=epoch")),
         ("'epoch'", "'batch', 'client', 'round'")),
    Case("config", "mixtures figure every 0 rounds",
         lambda w: error_of(cli("fit", *LINEAR, "--report.figure_every_n_rounds=0")),
         ("figure_every_n_rounds=0", ">= 1")),
    Case("config", "unknown server optimizer",
         lambda w: error_of(lambda: FederatedCallback(server_optimizer="rmsprop")), ("'rmsprop'", "sgd", "adam")),
    Case("config", "server learning rate of 0", lambda w: error_of(lambda: FederatedCallback(server_lr=0.0)),
         ("lr=0.0", "> 0")),
    Case("config", "unknown client optimizer",
         lambda w: error_of(lambda: linear_module(optimizer=ClientOptimizer(name="adamw"))), ("'adamw'", "sgd")),
    Case("config", "negative number of adaptors",
         lambda w: error_of(lambda: RegressionModule(nn.Linear(10, 3), num_clients=6, num_adaptors=-1)),
         ("num_adaptors=-1", ">= 1")),
    Case("config", "unknown router noise",
         lambda w: error_of(lambda: linear_module(router=RouterOptions(noise="gaussan"))), ("'gaussan'", "uniform")),
    Case("config", "model and data disagree on num_clients",
         lambda w: error_of(fit(linear_module(num_clients=5), linear_data())), ("num_clients=5", "num_clients=6")),
    Case("config", "gradient accumulation (a client's steps are its own)",
         lambda w: error_of(lambda: FederatedCallback().setup(L.Trainer(accumulate_grad_batches=2, logger=False),
                                                              linear_module(), "fit")),
         ("accumulate_grad_batches",)),
    Case("config", "validation inside a round",
         lambda w: error_of(lambda: FederatedCallback().setup(L.Trainer(val_check_interval=0.5, logger=False),
                                                              linear_module(), "fit")),
         ("val_check_interval=0.5", "check_val_every_n_epoch")),
    Case("config", "unknown cluster transform",
         lambda w: error_of(lambda: FederatedDataModule(SyntheticLinear(), num_clients=4, cluster_transform="rotat")),
         ("cluster_transform='rotat'", "label_shift")),
    Case("config", "no clients", lambda w: error_of(lambda: FederatedDataModule(SyntheticLinear(), num_clients=0)),
         ("num_clients=0", ">= 1")),
    Case("config", "train_fraction of 0",
         lambda w: error_of(lambda: FederatedDataModule(SyntheticLinear(), num_clients=2, train_fraction=0.0)),
         ("train_fraction=0.0", "(0, 1]")),
    Case("config", "image augmentation on feature vectors",
         lambda w: error_of(lambda: npz_data(npz(w, "vectors.npz"), augment="flip_crop").setup("fit")),
         ("augment='flip_crop'", "uint8 images")),
    # data
    Case("data", ".npz path that does not exist",
         lambda w: error_of(lambda: npz_data(w / "missing.npz").setup("fit")), ("missing.npz", "no file")),
    Case("data", ".npz without a required array",
         lambda w: error_of(lambda: npz_data(_without(w)).setup("fit")),
         ("lacks key(s) ['y_test']",)),
    Case("data", "truncated .npz",
         lambda w: error_of(lambda: npz_data(corrupt(npz(w, "whole.npz"), w / "truncated.npz", 0.6)).setup("fit")),
         ("truncated.npz", ".npz")),
    Case("data", "a text file named .npz",
         lambda w: error_of(lambda: npz_data(_text(w)).setup("fit")), ("text.npz", "not an .npz archive")),
    Case("data", "x and y of different lengths",
         lambda w: error_of(lambda: npz_data(npz(w, "lengths.npz", y_train=np.zeros(29, np.int64))).setup("fit")),
         ("x_train has 30 samples", "y_train has 29")),
    Case("data", "negative label (label shift's mod would hide it)",
         lambda w: error_of(lambda: npz_data(npz(w, "negative.npz", y_train=_labels_with(-3)), num_classes=3,
                                              num_clusters=3, cluster_transform="label_shift").setup("fit")),
         ("y_train", "-3", "index 5", "[0, 3)")),
    Case("data", "label at or above num_classes",
         lambda w: error_of(lambda: npz_data(npz(w, "large.npz", y_test=_labels_with(42, 10)), num_classes=3)
                            .setup("fit")),
         ("y_test", "42", "[0, 3)")),
    Case("data", "more classes in the data than the model outputs (inferred num_classes)",
         lambda w: error_of(fit(classifier(), npz_data(npz(w, "more.npz", y_train=_labels_with(42))))),
         ("outputs 3 scores", "num_classes=43")),
    Case("data", "NaN feature",
         lambda w: error_of(lambda: npz_data(npz(w, "nan.npz", x_train=_features_with(float("nan")))).setup("fit")),
         ("x_train", "non-finite", "index 7")),
    Case("data", "infinite regression target",
         lambda w: error_of(lambda: npz_data(npz(w, "inf.npz", y_train=np.zeros(30, np.float32),
                                                               y_test=np.full(10, np.inf, np.float32))).setup("fit")),
         ("y_test", "non-finite", "index 0")),
    Case("data", "1-D features (one number per sample) into an MLP",
         lambda w: error_of(fit(classifier(), npz_data(npz(w, "flat.npz", x_train=np.zeros(30, np.float32),
                                                           x_test=np.zeros(10, np.float32))))),
         ("shape ()", "expects 4 features")),
    Case("data", "images into an MLP built for other images",
         lambda w: error_of(fit(classifier(in_features=784), npz_data(npz(w, "images.npz", x_train=_images(30),
                                                                          x_test=_images(10))))),
         ("shape (3, 32, 32)", "3072 values", "expects 784 features")),
    Case("data", "a client with no data",
         lambda w: error_of(lambda: FederatedDataModule(NpzArrays(str(npz(w, "few.npz"))), num_clients=40)
                            .setup("fit")),
         ("get no training data", "num_clients=40")),
    # checkpoint
    Case("checkpoint", "--ckpt_path that does not exist",
         lambda w: error_of(cli("fit", *LINEAR, f"--ckpt_path={w / 'nothing.ckpt'}")),
         ("nothing.ckpt", "no such file")),
    Case("checkpoint", "--ckpt_path to a file that is not a checkpoint",
         lambda w: error_of(cli("fit", *LINEAR, f"--ckpt_path={_text(w)}")), ("text.npz", "not a checkpoint")),
    Case("checkpoint", "truncated checkpoint",
         lambda w: error_of(cli("fit", *LINEAR, f"--ckpt_path={corrupt(trained(w), w / 'cut.ckpt', 0.5)}")),
         ("cut.ckpt", "truncated")),
    Case("checkpoint", "--ckpt_path=last for test with no run to find",
         lambda w: error_of(cli("test", *LINEAR, "--ckpt_path=last", f"--trainer.default_root_dir={w / 'empty'}")),
         ("no last.ckpt", "empty")),
    Case("checkpoint", "resuming with another model option (rank)",
         lambda w: error_of(resume(w, "--model.init_args.rank=2")), ("model.init_args.rank=2", "(checkpoint: 1)")),
    Case("checkpoint", "resuming with another router option",
         lambda w: error_of(resume(w, "--model.init_args.router.temperature=2.0")),
         ("model.init_args.router.temperature=2.0", "(checkpoint: 1.0)")),
    Case("checkpoint", "resuming with another model class",
         lambda w: error_of(resume(w, "--model.class_path=floral_lightning.methods.FedAvgModule")),
         ("model.class_path", "FedAvgModule", "(checkpoint: 'floral_lightning.module.FloralModule')")),
    Case("checkpoint", "resuming with another round-loop option",
         lambda w: error_of(resume(w, "--federated.clients_per_round=0.5")),
         ("federated.clients_per_round=0.5", "(checkpoint: 1.0)")),
    Case("checkpoint", "resuming with other data options",
         lambda w: error_of(resume(w, "--data.init_args.batch_size=2")),
         ("data.init_args.batch_size=2", "(checkpoint: 4)")),
    Case("checkpoint", "resuming with other data behind the same data options",
         lambda w: error_of(resume(w, "--data.init_args.source.init_args.samples_per_client=10")),
         ("the data itself", "fingerprint", "SyntheticLinear")),
    Case("checkpoint", "resuming with another seed (other client data)",
         lambda w: error_of(resume(w, "--seed_everything=1")), ("seed=1", "(checkpoint: 0)")),
    Case("checkpoint", "a mixtures file of another save than its checkpoint",
         lambda w: error_of(mismatched_mixtures(w)), ("is of round 3", "is of round 2", "split by a crash")),
    # runtime
    Case("runtime", "diverging learning rate (non-finite loss)",
         lambda w: error_of(fit(linear_module(optimizer=ClientOptimizer(lr=1e6)), linear_data(), 2)),
         ("non-finite training loss", "client 0 in round 0", "local step", "Training stopped")),
    Case("runtime", "non-finite aggregated weights",
         lambda w: error_of(fit(Overflowing(nn.Linear(10, 3), num_clients=6, num_adaptors=2, rank=1), linear_data(),
                                server_lr=2.0)),
         ("aggregated weights after round 0", "not finite", "base.base.bias")),
    Case("runtime", "diverging client with skip_nonfinite_clients=true (training continues)",
         lambda w: warning_of(fit(linear_module(optimizer=ClientOptimizer(lr=1e6)), linear_data(),
                                  skip_nonfinite_clients=True)),
         ("client 0 in round 0", "dropped from the round")),
]  # fmt: skip


def _without(workdir: Path) -> Path:
    path = npz(workdir, "nokey.npz")
    with np.load(path) as arrays:
        np.savez(path, **{k: arrays[k] for k in ("x_train", "y_train", "x_test")})
    return path


def _text(workdir: Path) -> Path:
    path = workdir / "text.npz"
    path.write_text("x,y\n1,2\n")
    return path


def _images(n: int) -> np.ndarray:
    return np.zeros((n, 3, 32, 32), np.uint8)  # CIFAR-shaped


def _labels_with(value: int, n: int = 30, at: int = 5) -> np.ndarray:
    labels = np.arange(n) % 3
    labels[at] = value
    return labels


def _features_with(value: float) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    x[7, 2] = value
    return x


# --- the document -------------------------------------------------------------------------------------------
HEADER = """# Reliability: bad inputs and what you are told

Every row is a case of `tests/bad_inputs.py`: the test triggers it the way a user would (the command line, a
`Trainer.fit`, a data module's `setup`) and checks that the message names what is wrong, and that this page shows
the message it got. Generated by `PYTHONPATH=. python tests/bad_inputs.py`; do not edit by hand. Temporary paths
are shown as `<tmp>` and data fingerprints as `<digest>`.

Besides these refusals: a run killed at any point resumes bit-identically with `--ckpt_path=last`
(`tests/test_resume.py`), and a diverging run through `train.py` exits non-zero with the client, round and step
while its last good checkpoint still loads (`tests/test_reliability.py`).

| # | kind | bad input | what you get |
|---|---|---|---|
"""


def normalise(message: str, workdir: Path) -> str:
    """The message as the document shows it: temporary paths as ``<tmp>``, data fingerprints as ``<digest>``
    (they hash generated floats, whose last bits depend on the CPU's kernels), one line, table-safe."""
    message = message.replace(str(workdir), "<tmp>").replace(str(ROOT), ".")
    message = re.sub(r"(fingerprint|checkpoint:) [0-9a-f]{16}\b", r"\1 <digest>", message)
    message = re.sub(r"\s+", " ", message).strip()
    return message.replace("|", "\\|")


def row(index: int, case: Case, message: str) -> str:
    return f"| {index} | {case.category} | {case.name} | {message} |"


def document(messages: list[str]) -> str:
    return HEADER + "\n".join(row(i + 1, c, m) for i, (c, m) in enumerate(zip(CASES, messages))) + "\n"


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        DOC.write_text(document([normalise(case.run(workdir), workdir) for case in CASES]))
    print(f"wrote {DOC} ({len(CASES)} cases)")
