"""Crash and resume as a user meets them: a real ``train.py fit`` process is SIGKILLed in the middle of a round
and rerun with ``--ckpt_path=last``; the result must be the uninterrupted run's, bit for bit."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parents[1]
# a shipped config with router noise on (its default), shortened: 5 of 20 clients a round, 6 rounds
SHIPPED = [
    "fit",
    "--config",
    "conf/synthetic_mlp.yaml",
    "--trainer.max_epochs=6",
    "--trainer.check_val_every_n_epoch=2",
    "--trainer.callbacks.init_args.every_n_epochs=1",  # a checkpoint at every evaluation (every 2 rounds)
    "--federated.clients_per_round=0.25",
    "--federated.server_optimizer=adam",  # server state in the checkpoint must carry over too
    "--federated.server_lr=0.1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.slow


def train(*args: str, root: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", *SHIPPED, f"--trainer.default_root_dir={root}", *args]
    return subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def scalars(version_dirs: list[Path]) -> dict[tuple[str, int], float]:
    """Every logged scalar by (tag, step); a later run's value replaces an earlier one's (a replayed round)."""
    out: dict[tuple[str, int], float] = {}
    for version_dir in version_dirs:
        for path in sorted(glob.glob(str(version_dir / "events.out.tfevents.*"))):
            acc = EventAccumulator(path, size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                out.update({(tag, event.step): event.value for event in acc.Scalars(tag)})
    return out


def test_sigkill_mid_round_then_ckpt_path_last_reproduces_the_uninterrupted_run(tmp_path):
    full = train(root=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]

    crashed_root, marker = tmp_path / "crashed", tmp_path / "paused"
    pause = {
        "class_path": "federated_helpers.PauseMidRound",
        "init_args": {"marker": str(marker), "round_idx": 3, "step": 7},
    }
    command = [sys.executable, "train.py", *SHIPPED, f"--trainer.default_root_dir={crashed_root}"]
    process = subprocess.Popen(
        [*command, f"--trainer.callbacks+={json.dumps(pause)}"],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), (
            f"the run never reached round 4: {process.stderr.read()[-3000:] if process.poll() else ''}"
        )
        checkpoint = crashed_root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # the round-end checkpoint of round 2
    finally:
        process.send_signal(signal.SIGKILL)  # in round 4 (index 3), at its 8th step: two rounds after the checkpoint
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    resumed = train("--ckpt_path=last", root=crashed_root)  # the one command a user reruns after a crash
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stderr

    ours = torch.load(crashed_root / "lightning_logs/version_1/checkpoints/last.ckpt", weights_only=True)
    theirs = torch.load(tmp_path / "full/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ours["epoch"] == theirs["epoch"] and ours["global_step"] == theirs["global_step"]
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for name, tensor in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][name], tensor), name
    # everything else that shapes the future: round, settings, the server's Adam moments
    ours_loop, theirs_loop = (c["callbacks"]["FederatedCallback"] for c in (ours, theirs))
    assert ours_loop["round"] == theirs_loop["round"] == 6
    for (name, a), b in zip(
        ours_loop["server_optimizer"]["state"].items(), theirs_loop["server_optimizer"]["state"].values()
    ):
        assert all(torch.equal(a[key], b[key]) for key in a), name

    logged = scalars([tmp_path / "full/lightning_logs/version_0"])
    replayed = scalars([crashed_root / "lightning_logs/version_0", crashed_root / "lightning_logs/version_1"])
    assert {tag for tag, _ in logged} >= {"train/loss", "val/mse", "val/routing_ari"}
    assert replayed == logged  # same (tag, step) pairs, bit-identical values

    mixtures = json.loads((crashed_root / "lightning_logs/version_1/checkpoints/last.mixtures.json").read_text())
    assert mixtures == json.loads(
        (tmp_path / "full/lightning_logs/version_0/checkpoints/last.mixtures.json").read_text()
    )
