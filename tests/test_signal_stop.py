"""A ``train.py fit`` stopped by a signal says so: exit code 128 + the signal, one line with the round it stopped
at and the command that resumes it, and its last round-end checkpoint kept, loadable, and resumed exactly."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import floral_lightning.module  # noqa: F401  (registers the option classes in checkpoints as safe for weights_only loads)

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
# 10 clients, 2 steps each a round (8 samples, batch 4): 20 steps a round; a checkpoint and an evaluation each round
FIT = [
    "fit",
    "--config",
    "conf/synthetic_linear.yaml",
    "--trainer.max_epochs=6",
    "--trainer.check_val_every_n_epoch=1",
    "--trainer.callbacks.init_args.every_n_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]

pytestmark = pytest.mark.slow


def train(*args: str) -> subprocess.CompletedProcess:
    # SIGINT back to its default in the child: a suite started in the background (``pytest &``) inherits it
    # ignored, and Python then never raises KeyboardInterrupt
    return subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def stop_at(round_idx: int, step: int, signum: int, marker: Path) -> str:
    helper = {
        "class_path": "federated_helpers.SignalAtRound",
        "init_args": {"marker": str(marker), "round_idx": round_idx, "step": step, "signum": int(signum)},
    }
    return f"--trainer.callbacks+={json.dumps(helper)}"


def stop_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("train.py: stopped by")]


def test_sigterm_mid_round_exits_143_keeps_the_round_end_checkpoint_and_its_resume_command_finishes_the_run(
    tmp_path,
):
    full = train(*FIT, f"--trainer.default_root_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-3000:]
    assert not stop_lines(full.stderr)

    root = tmp_path / "stopped"
    # SIGTERM at the 2nd step of round 4: rounds 1-3 are done, round 4 half done
    stopped = train(*FIT, f"--trainer.default_root_dir={root}", stop_at(3, 1, signal.SIGTERM, tmp_path / "sent"))
    assert stopped.returncode == 128 + signal.SIGTERM == 143, stopped.stderr[-3000:]
    checkpoint = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    (line,) = stop_lines(stopped.stderr)
    assert line.startswith(f"train.py: stopped by SIGTERM after round 3 of 6; its last round-end checkpoint (round 3) "
                           f"is {checkpoint}; resume with: python train.py ")  # fmt: skip
    assert line.endswith(" --ckpt_path=last")

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # the round-end state, not mid-round
    assert saved["callbacks"]["FederatedCallback"]["round"] == 3 and saved["epoch"] == 2
    assert saved["global_step"] == 3 * 20

    # the printed command, run as printed (the helper signals once), resumes from that checkpoint
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:2] == ["python", "train.py"]
    resumed = train(*command[2:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"--ckpt_path=last: resuming from {checkpoint}" in resumed.stderr

    ours = torch.load(root / "lightning_logs/version_1/checkpoints/last.ckpt", weights_only=True)
    theirs = torch.load(tmp_path / "full/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ours["callbacks"]["FederatedCallback"]["round"] == theirs["callbacks"]["FederatedCallback"]["round"] == 6
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for name, tensor in theirs["state_dict"].items():  # the uninterrupted run's weights, bit for bit
        assert torch.equal(ours["state_dict"][name], tensor), name


def test_sigint_exits_130_and_a_stop_before_any_checkpoint_says_a_rerun_starts_over(tmp_path):
    no_checkpoints = [*FIT[:5], "--trainer.callbacks.init_args.every_n_epochs=100", *FIT[6:]]
    stopped = train(*no_checkpoints, f"--trainer.default_root_dir={tmp_path}",
                    stop_at(2, 0, signal.SIGINT, tmp_path / "sent"))  # fmt: skip
    assert stopped.returncode == 128 + signal.SIGINT == 130, stopped.stderr[-3000:]
    assert stop_lines(stopped.stderr) == [
        "train.py: stopped by SIGINT after round 2 of 6; no round-end checkpoint was written, so a rerun starts "
        "from round 0"
    ]
    assert not list(tmp_path.glob("**/*.ckpt"))
