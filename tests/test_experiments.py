"""The experiment runner (``python -m experiments``): what counts as a finished cell, the report of a grid, and a
real 2-cell grid in which one cell is stopped by SIGTERM, left out, and resumed to the uninterrupted value."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from experiments.cells import METHODS, Cell, cell_command, eval_every
from experiments.grid import Progress, main, parse_args
from experiments.record import RunRecord, judge, read_record, summarise
from experiments.report import FIELDS, append_rows, report, store_curve

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


# --- what a run's record says ------------------------------------------------------------------------------------


def write_metrics(run_dir: Path, version: int, rows: list[dict[str, float]]) -> None:
    """A CSV logger's metrics.csv as Lightning writes it: one row per log call, empty cells for other names."""
    path = run_dir / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    names = sorted({name for row in rows for name in row} | {"step", "epoch"})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def write_checkpoint(run_dir: Path, version: int, rounds: int) -> Path:
    path = run_dir / "csv" / f"version_{version}" / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    loop_state = {"round": rounds, "server_optimizer": {}}  # what the round loop's state holds (besides more)
    torch.save({"state_dict": {}, "callbacks": {"FederatedCallback": loop_state}}, path)
    return path


def rounds_rows(first: int, last: int, value=lambda r: 1.0 / r) -> list[dict[str, float]]:
    """What a run logs for rounds first..last: the round loop's row, then an evaluation."""
    rows = []
    for r in range(first, last + 1):
        rows += [{"step": r, "epoch": r - 1, "round/clients": 10.0}, {"step": r, "val/mse": value(r)}]
    return rows


def test_a_stopped_then_resumed_run_reads_as_one_and_is_judged_by_its_last_round_and_checkpoint(tmp_path):
    write_metrics(tmp_path, 0, rounds_rows(1, 4, value=lambda r: 100.0))  # rounds 3-4 are replayed after resuming
    write_checkpoint(tmp_path, 0, 2)
    record = read_record(tmp_path)
    assert record.last_round == 4 and record.checkpoint_round == 2
    assert judge(record, 6) == "stopped at round 4 of 6"

    write_metrics(tmp_path, 1, rounds_rows(3, 6))  # resumed from round 2's checkpoint
    write_checkpoint(tmp_path, 1, 6)
    # version 10 sorts after version 2 by number, not by name
    write_metrics(tmp_path, 10, [{"step": 6, "val/mse": 0.5}])
    record = read_record(tmp_path)
    assert record.history("val/mse") == [(1, 100.0), (2, 100.0), (3, 1 / 3), (4, 1 / 4), (5, 1 / 5), (6, 0.5)]
    assert record.metric == "mse" and record.last_round == 6 and record.checkpoint_round == 6
    assert judge(record, 6) is None
    assert judge(record, 7) == "stopped at round 6 of 7"


def test_judge_refuses_each_way_a_run_can_look_finished_without_being_so(tmp_path):
    assert judge(read_record(tmp_path), 3) == "no metrics.csv: the run logged nothing"
    finished = RunRecord(
        metrics={"round/clients": {1: 5.0, 2: 5.0, 3: 5.0}, "val/acc": {1: 0.2, 3: 0.9}}, checkpoint_round=3
    )
    assert judge(finished, 3) is None
    no_checkpoint = RunRecord(metrics=finished.metrics)
    assert judge(no_checkpoint, 3) == "logged 3 rounds but no last.ckpt"
    old_checkpoint = RunRecord(metrics=finished.metrics, checkpoint=tmp_path / "last.ckpt", checkpoint_round=2)
    assert judge(old_checkpoint, 3) == "logged 3 rounds but its last.ckpt is of round 2"
    unevaluated = RunRecord(metrics={**finished.metrics, "val/acc": {1: 0.2, 2: 0.5}}, checkpoint_round=3)
    assert judge(unevaluated, 3) == "no evaluation of val/acc at round 3"
    diverged = RunRecord(metrics={**finished.metrics, "val/acc": {1: 0.2, 3: math.nan}}, checkpoint_round=3)
    assert judge(diverged, 3) == "val/acc over the last 1 % of rounds is nan"


def test_cell_value_is_the_mean_of_the_last_percent_of_rounds():
    # 1 % of 1000 rounds = the last 10 rounds: of evaluations every 10 rounds, only round 1000 falls inside
    record = RunRecord(metrics={"val/acc": {r: r / 1000 for r in range(10, 1001, 10)}})
    assert summarise(record, 1000)["value"] == pytest.approx(1.0)
    record = RunRecord(metrics={"val/acc": {r: r / 1000 for r in range(1, 1001)}, "val/routing_ari": {1000: 0.5}})
    values = summarise(record, 1000)
    assert values["metric"] == "acc" and values["value"] == pytest.approx(sum(range(991, 1001)) / 10 / 1000)
    assert values["routing_ari"] == 0.5 and math.isnan(values["value_worst"])  # not logged: nan, not an error


def test_evaluations_and_checkpoints_fall_on_the_last_round():
    assert [eval_every(n) for n in (1, 6, 45, 300, 500, 2000)] == [1, 1, 1, 15, 25, 100]
    for rounds in range(1, 400):
        every = eval_every(rounds)
        assert rounds % every == 0 and every <= max(1, rounds // 20)


def test_the_cell_command_resumes_logs_csv_first_and_checkpoints_at_every_evaluation(tmp_path):
    cell = Cell("synthetic_linear", "floral1", 2, 300)
    command = cell_command(cell, cell.run_dir(tmp_path), ["--data.init_args.batch_size=8"])
    assert cell.run_dir(tmp_path) == tmp_path / "runs/synthetic_linear/floral1/seed2_rounds300"
    assert command[-2:] == ["--data.init_args.batch_size=8", "--ckpt_path=last"]  # the user's options, then resume
    expected = {"--trainer.check_val_every_n_epoch=15", "--trainer.callbacks.init_args.every_n_epochs=15",
                "--seed_everything=2", "--trainer.max_epochs=300", "--model.init_args.rank=0.01",
                "--report.figure_every_n_rounds=75"}  # the mixtures figure at every 5th evaluation  # fmt: skip
    assert expected <= set(command)
    (logger,) = [a for a in command if a.startswith("--trainer.logger=")]
    assert logger.index("CSVLogger") < logger.index("TensorBoardLogger")  # checkpoints go under csv/version_*/


@pytest.mark.parametrize("method", list(METHODS))
def test_every_methods_cell_command_parses_and_checkpoints_at_every_evaluation(tmp_path, method):
    """The interval goes to the config's checkpoint callback even where a method adds a callback of its own
    (``--trainer.callbacks+=``; jsonargparse gives ``callbacks.init_args.*`` to the last callback)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from floral_lightning.cli import main as train_main

    cell = Cell("synthetic_linear", method, 0, 300)
    command = cell_command(cell, cell.run_dir(tmp_path), [])
    cli = train_main(command[3:-1], run=False)  # after python train.py fit, before --ckpt_path
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint._every_n_epochs == 15


# --- the report ----------------------------------------------------------------------------------------------------


def grid_args(out: Path, **kw) -> Namespace:
    args = dict(tasks=["synthetic_linear"], methods=["fedavg", "floral1"], seeds=[0, 1], rounds=4, override=[],
                jobs=1, out=str(out))  # fmt: skip
    return Namespace(**(args | kw))


def row(method: str, seed: int, value: float) -> dict:
    return {"task": "synthetic_linear", "method": method, "seed": seed, "rounds": 4, "metric": "mse", "value": value,
            "value_unweighted": value, "value_worst": 2 * value, "routing_ari": 1.0, "base_params": 33,
            "extra_params": 0 if method == "fedavg" else 34, "extra_percent": 0.0 if method == "fedavg" else 103.03,
            "wall_s": 10.0, "log_dir": "runs/x"}  # fmt: skip


def test_the_report_leaves_out_and_names_every_cell_that_is_not_a_finished_result(tmp_path):
    append_rows(tmp_path / "results.csv", [row("fedavg", 0, 2.0), row("fedavg", 1, 4.0), row("floral1", 0, 1.0),
                                           row("floral1", 1, math.nan)], FIELDS)  # fmt: skip
    store_curve(tmp_path / "curves.csv", ("synthetic_linear", "fedavg", "0", "4"), [(2, 3.0), (4, 2.0)])
    store_curve(tmp_path / "curves.csv", ("synthetic_linear", "floral1", "0", "4"), [(2, 3.0)])  # truncated
    # a grid with a seed never run, and a cell that has a run directory but stopped
    stopped = Cell("synthetic_linear", "fedavg", 2, 4).run_dir(tmp_path)
    write_metrics(stopped, 0, rounds_rows(1, 3))
    missing = report(tmp_path, grid_args(tmp_path, seeds=[0, 1, 2]))
    assert sorted((cell.method, cell.seed, reason) for cell, reason in missing) == [
        ("fedavg", 2, "stopped at round 3 of 4"),
        ("floral1", 0, "its curve ends at round 2 of 4"),
        ("floral1", 1, "its value is nan"),
        ("floral1", 2, "not run"),
    ]
    text = (tmp_path / "results.md").read_text()
    assert "| FedAvg | **3 (1.4)** n=2 |" in text  # mean (std) of seeds 0 and 1, 2 of the 3 seeds requested
    assert "| FLoRAL(1%) | - |" in text
    assert "## Incomplete: 4 of 6 cell(s), not in the table" in text
    assert "- synthetic_linear/fedavg/seed 2: stopped at round 3 of 4" in text
    assert "| FedAvg | synthetic_linear | 2 | 3 | 3 | 6 | 1 | 10 |" in text  # every value, mean over seeds
    assert "1 cell(s) have no stored curve" in text and "synthetic_linear/fedavg/1." in text
    assert (tmp_path / "curves_synthetic_linear.png").stat().st_size > 1000

    assert main(["report", "--tasks", "synthetic_linear", "--methods", "fedavg", "--seeds", "0", "1", "--rounds", "4",
                 "--out", str(tmp_path)]) == 0  # fmt: skip
    assert "## Incomplete" not in (tmp_path / "results.md").read_text()
    assert main(["report", "--tasks", "synthetic_linear", "--methods", "floral1", "--seeds", "0", "--rounds", "4",
                 "--out", str(tmp_path)]) == 1  # fmt: skip
    with pytest.raises(SystemExit, match=r"empty/results.csv does not exist; run 'compare'"):
        main(["report", "--tasks", "synthetic_linear", "--methods", "fedavg", "--rounds", "3",
              "--out", str(tmp_path / "empty")])  # fmt: skip


def test_bad_grid_arguments_are_refused_by_name(capsys):
    for argv, message in [
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--rounds", "3", "--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["--rounds", "3", "--methods", "fedavgg"], "argument --methods: invalid choice: 'fedavgg' (choose from"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(["compare", "--tasks", "synthetic_linear", "--methods", "fedavg", "--out", "x", *argv])
        assert message in capsys.readouterr().err


def test_progress_counts_cells_and_estimates_the_time_left():
    progress = Progress(total=10, jobs=2)
    progress.recorded, progress.failed, progress.running = 3, 1, 2
    assert progress.summary().startswith("3/10 recorded, 1 incomplete, 2 running, 4 left; elapsed 0m0")
    assert "about" not in progress.summary()  # no estimate before a cell has finished
    progress.walls = [60.0, 60.0]
    assert progress.summary().endswith(", about 2m30s left")  # (4 + 2 / 2) cells x 60 s / 2 jobs


# --- a real grid ---------------------------------------------------------------------------------------------------


def experiments(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def results(out: Path) -> dict[str, dict[str, str]]:
    return {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}


@pytest.mark.slow
def test_a_sigterm_d_cell_is_left_out_the_other_recorded_and_rerunning_resumes_it_to_the_uninterrupted_value(
    tmp_path, capsys
):
    out = tmp_path / "grid"
    # the floral1 cell signals itself in the middle of round 4 (once: the marker stays)
    stop = {
        "class_path": "federated_helpers.SignalAtRound",
        "init_args": {"marker": str(tmp_path / "sent"), "round_idx": 3, "step": 1, "only_under": "/floral1/"},
    }
    grid = [
        "compare",
        "--tasks",
        "synthetic_linear",
        "--methods",
        "fedavg",
        "floral1",
        "--seeds",
        "0",
        "--rounds",
        "6",
        "--jobs",
        "2",
        "--out",
        str(out),
        f"--override=--trainer.callbacks+={json.dumps(stop)}",
    ]
    # the floral1 cell never stopped (run beside the grid, to save time), for its value
    cell = Cell("synthetic_linear", "floral1", 0, 6)
    command = cell_command(cell, cell.run_dir(tmp_path / "reference"), [])
    with (tmp_path / "reference.log").open("w") as log:  # a file, not a pipe that could fill up and block it
        reference = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    first = experiments(*grid)  # fmt: skip
    assert first.returncode == 1, first.stderr[-3000:]
    assert results(out).keys() == {"fedavg"}
    assert "INCOMPLETE synthetic_linear/floral1/seed 0: exit 143; stopped at round 3 of 6" in first.stdout
    assert "1/2 recorded, 1 incomplete, 0 running, 0 left" in first.stdout
    assert "train.py: stopped by SIGTERM after round 3 of 6" in first.stderr  # the cell's last lines
    assert "grid incomplete: 1 of 2 cell(s) not recorded" in first.stderr
    assert "| FLoRAL(1%) | - |" in (out / "results.md").read_text()
    assert "- synthetic_linear/floral1/seed 0: stopped at round 3 of 6" in (out / "results.md").read_text()
    fedavg = results(out)["fedavg"]

    second = experiments(*grid)  # the same command
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 to run" in second.stdout and "recorded synthetic_linear/floral1/seed 0" in second.stdout
    run_dir = cell.run_dir(out)
    log = (run_dir / "train.log").read_text()
    assert f"resuming from {run_dir}/csv/version_0/checkpoints/last.ckpt" in log  # round 3's, not round 0
    assert results(out)["fedavg"] == fedavg  # not run again
    curve = [(r["round"], r["value"]) for r in csv.DictReader((out / "curves.csv").open()) if r["method"] == "floral1"]
    assert [r for r, _ in curve] == ["1", "2", "3", "4", "5", "6"]

    # the same cell, never stopped: the resumed cell's value is its value, to the last digit
    assert reference.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()[-3000:]
    record = read_record(cell.run_dir(tmp_path / "reference"))
    assert judge(record, 6) is None
    assert float(results(out)["floral1"]["value"]) == summarise(record, 6)["value"]
    assert curve[-1][1] == results(out)["floral1"]["value"]

    capsys.readouterr()
    assert main(grid) == 0  # everything recorded: nothing runs (in this process, so no cell could), complete
    assert "2 cell(s), 0 to run" in capsys.readouterr().out
    assert len(results(out)) == 2


@pytest.mark.slow
def test_a_grid_stopped_by_sigterm_stops_its_cell_at_a_round_exits_143_and_the_same_command_resumes(tmp_path):
    out = tmp_path / "grid"
    # the first cell sends SIGTERM to the grid (its parent) in the middle of round 3, once
    stop = {
        "class_path": "federated_helpers.SignalAtRound",
        "init_args": {"marker": str(tmp_path / "sent"), "round_idx": 2, "step": 1, "to_parent": True},
    }
    grid = ["compare", "--tasks", "synthetic_linear", "--methods", "floral1", "fedavg", "--seeds", "0",
            "--rounds", "4", "--out", str(out), f"--override=--trainer.callbacks+={json.dumps(stop)}"]  # fmt: skip
    first = experiments(*grid)
    assert first.returncode == 128 + 15, first.stderr[-3000:]
    assert "grid: SIGTERM: stopping the running cell(s) at a round" in first.stdout
    # the grid passed the SIGTERM on: the cell stopped as a SIGTERM'd train.py does, checkpoint of round 2 kept
    assert "INCOMPLETE synthetic_linear/floral1/seed 0: exit 143; stopped at round 2 of 4" in first.stdout
    assert "grid stopped by SIGTERM: 2 of 2 cell(s) not recorded" in first.stderr
    assert not (out / "results.csv").exists()
    report_md = (out / "results.md").read_text()
    assert "- synthetic_linear/fedavg/seed 0: not run" in report_md  # the second cell never started
    assert "- synthetic_linear/floral1/seed 0: stopped at round 2 of 4" in report_md

    second = experiments(*grid)
    assert second.returncode == 0, second.stderr[-3000:]
    assert results(out).keys() == {"floral1", "fedavg"}
    run_dir = Cell("synthetic_linear", "floral1", 0, 4).run_dir(out)
    assert f"resuming from {run_dir}/csv/version_0/checkpoints/last.ckpt" in (run_dir / "train.log").read_text()
