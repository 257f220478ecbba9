"""Checkpoint files: the mixtures file beside each checkpoint is consistent with it, strict JSON, written
atomically with the checkpoint's mode; ``--ckpt_path=last`` finds the run's newest ``last.ckpt``; a client whose
update is non-finite is dropped when asked to."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import fsspec.implementations.local
import lightning as L
import pytest
import torch
from federated_helpers import RecordingCallback, linear_data, quiet_trainer
from torch import nn

from callbacks import FederatedCallback, MixtureCheckpoint
from callbacks.mixture_checkpoint import read_mixtures, write_json_atomic
from floral_lightning.aggregation import aggregate
from floral_lightning.cli import find_last_checkpoint, main
from floral_lightning.module import ClientOptimizer, RouterOptions
from floral_lightning.tasks import RegressionModule

ROOT = Path(__file__).resolve().parents[1]


def linear_module() -> RegressionModule:
    torch.manual_seed(0)
    options = {"router": RouterOptions(noise="uniform"), "optimizer": ClientOptimizer(lr=0.05, router_lr=0.1)}
    return RegressionModule(nn.Linear(10, 3), num_clients=6, num_adaptors=2, rank=1, **options)


def fit_with_checkpoints(dirpath: Path, rounds: int, ckpt_path: Path | None = None) -> MixtureCheckpoint:
    checkpoint = MixtureCheckpoint(dirpath=dirpath, save_last=True)
    trainer = L.Trainer(
        max_epochs=rounds,
        callbacks=[FederatedCallback(clients_per_round=3, seed=1), checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(linear_module(), datamodule=linear_data(), ckpt_path=ckpt_path)
    return checkpoint


def test_mixtures_file_has_the_checkpoints_mode_is_written_first_and_leaves_no_temporary_files(tmp_path):
    umask = os.umask(0o022)
    try:
        fit_with_checkpoints(tmp_path, 2)
    finally:
        os.umask(umask)
    checkpoint, mixtures = tmp_path / "last.ckpt", tmp_path / "last.mixtures.json"
    assert stat.S_IMODE(mixtures.stat().st_mode) == stat.S_IMODE(checkpoint.stat().st_mode) == 0o644
    # written first: a crash between the two writes leaves the mixtures ahead (detectably), never behind
    assert mixtures.stat().st_mtime_ns <= checkpoint.stat().st_mtime_ns
    assert not list(tmp_path.glob("*.tmp"))
    record = read_mixtures(checkpoint)  # stamps agree
    assert record["round"] == 2 and record["global_step"] == torch.load(checkpoint, weights_only=True)["global_step"]


def test_each_checkpoint_kept_has_its_mixtures_file_and_a_removed_one_takes_it_along(tmp_path):
    # no monitor and save_top_k=1: each round's save removes the previous round's checkpoint
    checkpoint = fit_with_checkpoints(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=2-step=36.ckpt", "last.ckpt"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["epoch=2-step=36.mixtures.json", "last.mixtures.json"]
    assert read_mixtures(checkpoint.best_model_path)["round"] == 3


def test_stale_temporary_files_of_a_crashed_write_are_removed_when_a_run_starts(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = [tmp_path / "last.mixtures.json.4242.tmp", tmp_path / "epoch=0-step=12.ckpt.tmp"]
    for path in stale:
        path.write_text("half a file")
    keep = tmp_path / "notes.txt"
    keep.write_text("not ours")
    fit_with_checkpoints(tmp_path, 1)
    assert not any(path.exists() for path in stale) and keep.exists()


def test_a_resume_rewrites_a_mixtures_file_that_a_crash_split_from_its_checkpoint(tmp_path):
    fit_with_checkpoints(tmp_path / "run", 2)
    resume_from = tmp_path / "from" / "last.ckpt"
    resume_from.parent.mkdir()
    shutil.copy(tmp_path / "run" / "last.ckpt", resume_from)
    ahead = json.loads((tmp_path / "run" / "last.mixtures.json").read_text())
    ahead |= {"round": 3, "global_step": ahead["global_step"] + 12, "clients": []}  # the next save's, say
    write_json_atomic(ahead, resume_from.with_name("last.mixtures.json"))
    with pytest.raises(ValueError, match=r"last.mixtures.json is of round 3 .*/last.ckpt is of round 2"):
        read_mixtures(resume_from)

    fit_with_checkpoints(tmp_path / "resumed", 3, ckpt_path=resume_from)  # saves into resumed/, not from/
    repaired = read_mixtures(resume_from)
    assert repaired["round"] == 2
    logits = torch.load(resume_from, weights_only=True)["state_dict"]["model.router.logits"]
    assert torch.equal(torch.tensor([c["logits"] for c in repaired["clients"]]), logits)


def test_mixture_files_are_strict_json_and_non_finite_mixtures_are_refused_by_client(tmp_path):
    record = {
        "round": 1,
        "clients": [{"client_id": 0, "mixture": [0.5, 0.5]}, {"client_id": 1, "mixture": [1.0, float("nan")]}],
    }
    path = tmp_path / "m.json"
    with pytest.raises(ValueError, match=r"refusing to write .*m.json: non-finite mixtures of clients \[1\]"):
        write_json_atomic(record, path)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_failed_write_keeps_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json_atomic({"round": 1}, path)

    def crash(src, dst):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_json_atomic({"round": 2}, path)
    assert json.loads(path.read_text()) == {"round": 1} and not list(tmp_path.glob("*.tmp"))


def test_a_checkpoint_write_that_fails_before_its_commit_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Lightning writes a checkpoint in an fsspec transaction: to a temporary file, moved over the old one when
    complete. A crash before the move leaves the previous checkpoint loadable."""
    trainer = quiet_trainer(1, FederatedCallback(clients_per_round=3, seed=1))
    trainer.fit(linear_module(), datamodule=linear_data())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    def crash(self):
        raise OSError("killed before the move")

    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "commit", crash)
    with pytest.raises(OSError):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before


def test_find_last_checkpoint_takes_the_newest_last_ckpt_of_the_run_directory(tmp_path):
    assert find_last_checkpoint(tmp_path) is None
    paths = [tmp_path / f"lightning_logs/version_{i}/checkpoints/last.ckpt" for i in range(3)]
    for age, path in zip((30, 10, 20), paths):  # version_1 is the newest (the last run that saved)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, ns=(10**18 - age * 10**9,) * 2)
    (tmp_path / "lightning_logs/version_3/checkpoints").mkdir(parents=True)  # a run killed before its first save
    assert find_last_checkpoint(tmp_path) == paths[1]
    no_logger = tmp_path / "checkpoints" / "last.ckpt"
    no_logger.parent.mkdir()
    no_logger.write_bytes(b"")
    assert find_last_checkpoint(tmp_path) == no_logger


@pytest.mark.slow
def test_ckpt_path_last_starts_a_new_run_when_there_is_none_then_resumes_it(tmp_path, capsys):
    args = ["fit", "--config", str(ROOT / "conf/synthetic_linear.yaml"), "--ckpt_path=last",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]  # fmt: skip
    first = main([*args, "--trainer.max_epochs=1"])
    assert first.trainer.current_epoch == 1
    assert f"no last.ckpt under {tmp_path}; starting a new run" in capsys.readouterr().err
    second = main([*args, "--trainer.max_epochs=2"])
    assert f"resuming from {tmp_path}/lightning_logs/version_0/checkpoints/last.ckpt" in capsys.readouterr().err
    fed = next(cb for cb in second.trainer.callbacks if isinstance(cb, FederatedCallback))
    assert fed.round == 2 and second.trainer.global_step == 2 * first.trainer.global_step


class NaNForClient(RegressionModule):
    """Client 2's loss is NaN at its second local step."""

    def on_client_start(self, client_id: int) -> None:
        super().on_client_start(client_id)
        self.local_step = 0

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch[2] == 2 and self.local_step == 1:
            loss = loss * float("nan")
        self.local_step += 1
        return loss


def test_skip_nonfinite_clients_drops_the_client_keeps_its_mixture_and_logs_it():
    torch.manual_seed(0)
    module = NaNForClient(nn.Linear(10, 3), num_clients=6, num_adaptors=2, rank=1)
    before = module.model.router.logits.detach().clone()
    callback = RecordingCallback(clients_per_round=1.0, seed=0, skip_nonfinite_clients=True)
    with pytest.warns(UserWarning, match=r"non-finite training loss \(nan\) at local step 1 of client 2 in round 0"):
        trainer = quiet_trainer(1, callback)
        trainer.fit(module, datamodule=linear_data())
    assert trainer.callback_metrics["round/skipped_clients"] == 1.0
    assert trainer.callback_metrics["round/clients"] == 5.0
    logits = module.model.router.logits.detach()
    assert torch.equal(logits[2], before[2])  # the dropped client's mixture is as before the round
    assert not torch.equal(logits[3], before[3])
    kept = [u for u in callback.updates if u.client_id != 2]
    expected = aggregate(callback.start, module.federated_roles(), kept)
    for name, tensor in module.federated_state().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)


def test_a_nonfinite_client_stops_the_run_by_default_naming_client_round_and_step():
    torch.manual_seed(0)
    module = NaNForClient(nn.Linear(10, 3), num_clients=6, num_adaptors=2, rank=1)
    trainer = quiet_trainer(1, FederatedCallback(clients_per_round=1.0, seed=0))
    with pytest.raises(FloatingPointError, match=r"loss \(nan\) at local step 1 of client 2 in round 0 \(global step"):
        trainer.fit(module, datamodule=linear_data())


class SaveMidRound(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            trainer.save_checkpoint(self.path)


def test_a_checkpoint_saved_in_the_middle_of_a_round_warns(tmp_path):
    trainer = quiet_trainer(1, FederatedCallback(clients_per_round=3, seed=1))
    trainer.callbacks.append(SaveMidRound(tmp_path / "mid.ckpt"))
    with pytest.warns(UserWarning, match="checkpoint saved in the middle of a federated round"):
        trainer.fit(linear_module(), datamodule=linear_data())
