"""Bad inputs fail loudly, naming what is wrong (the table in ``tests/bad_inputs.py``, shown in
``docs/reliability.md``), and a diverging run stops with its client, round and step."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_inputs import CASES, DOC, document, normalise, row

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_inputs")


def documented_rows() -> dict[str, str]:
    rows = [line for line in DOC.read_text().splitlines() if re.match(r"\| \d+ \|", line)]
    return {line.split(" | ")[2]: line for line in rows}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_refused_by_name_as_documented(case, workdir):
    message = normalise(case.run(workdir), workdir)
    missing = [fragment for fragment in case.expect if fragment not in message]
    assert not missing, f"the message does not name {missing}: {message}"
    index = CASES.index(case) + 1
    assert documented_rows().get(case.name) == row(index, case, message), (
        "docs/reliability.md is out of date: run `PYTHONPATH=. python tests/bad_inputs.py`"
    )


def test_reliability_doc_lists_exactly_the_cases():
    assert len(CASES) >= 25
    assert list(documented_rows()) == [c.name for c in CASES]
    assert f"lists {len(CASES)} bad inputs" in (ROOT / "README.md").read_text()
    assert DOC.read_text().startswith(document([""] * len(CASES)).split("| 1 |")[0])


def strict_json(path: Path) -> dict:
    def refuse(constant: str):
        raise ValueError(f"{path} holds {constant}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow
def test_diverging_run_exits_non_zero_naming_client_round_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    """conf/synthetic_linear.yaml at a client learning rate of 6 (0.1 in the config) trains for a few rounds,
    then its loss overflows; checkpoints every round."""
    command = [
        sys.executable, "train.py", "fit", "--config", "conf/synthetic_linear.yaml", "--model.init_args.optimizer.lr=6",
        "--trainer.check_val_every_n_epoch=1", "--trainer.callbacks.init_args.every_n_epochs=1",
        "--trainer.max_epochs=30", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1  # an uncaught FloatingPointError
    found = re.search(
        r"FloatingPointError: non-finite training loss \(\S+\) at local step (\d+) of client (\d+) in round (\d+) "
        r"\(global step \d+\)\. Training stopped; the last good checkpoint is (\S+) \(resume with --ckpt_path=last\)",
        result.stderr,
    )
    assert found, result.stderr[-3000:]
    round_idx, checkpoint = int(found.group(3)), Path(found.group(4))
    assert round_idx >= 2 and checkpoint == tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"

    state = torch.load(checkpoint, weights_only=True)
    assert state["callbacks"]["FederatedCallback"]["round"] == round_idx  # the last round that ended well
    assert all(bool(torch.isfinite(t).all()) for t in state["state_dict"].values())
    assert strict_json(checkpoint.with_name("last.mixtures.json"))["round"] == round_idx
    tested = subprocess.run(
        [sys.executable, "train.py", "test", "--config", "conf/synthetic_linear.yaml", f"--ckpt_path={checkpoint}",
         f"--trainer.default_root_dir={tmp_path / 'test'}", "--trainer.enable_progress_bar=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert tested.returncode == 0, tested.stderr[-3000:]
    # the checkpoint's model is evaluated, and the replaced config option is named
    assert (
        "the checkpoint's model options replace the config's: model.init_args.optimizer.lr=0.1 (checkpoint: 6.0)"
        in tested.stderr
    )
