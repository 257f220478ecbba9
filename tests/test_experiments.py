"""The experiment runner: a tiny grid, its report, and resuming without redoing finished cells."""

from __future__ import annotations

import csv
import shutil

import pytest

from floral_lightning.experiments import load_curves, main, summarise_cell

pytestmark = pytest.mark.slow


def test_grid_report_and_resume(tmp_path, capsys):
    args = ["compare", "--tasks", "synthetic_linear", "--methods", "fedavg", "floral1", "--seeds", "0",
            "--rounds", "3", "--jobs", "2", "--out", str(tmp_path)]  # fmt: skip
    main(args)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {(r["method"], r["seed"]) for r in rows} == {("fedavg", "0"), ("floral1", "0")}
    assert all(float(r["value"]) > 0 and r["metric"] == "mse" for r in rows)
    fedavg, floral = sorted(rows, key=lambda r: r["method"])
    assert int(fedavg["extra_params"]) == 0 and int(floral["extra_params"]) > 0
    report = (tmp_path / "results.md").read_text()
    assert "| FedAvg |" in report and "**" in report and "% increase" in report and "--jobs 2" in report
    assert (tmp_path / "curves_synthetic_linear.png").stat().st_size > 1000
    curves = list(csv.DictReader((tmp_path / "curves.csv").open()))
    # evaluated every round (rounds // 20, at least 1); the cell's value is the last 1 %: round 3 alone
    assert sorted((r["method"], r["round"]) for r in curves) == [(m, str(i)) for m in ("fedavg", "floral1")
                                                                 for i in (1, 2, 3)]  # fmt: skip
    assert [r["value"] for r in curves if r["method"] == "fedavg" and r["round"] == "3"] == [fedavg["value"]]
    # a cell redone after a kill (curve stored, row not yet) has its curve twice: the later one wins
    with (tmp_path / "curves.csv").open("a") as f:
        f.write("synthetic_linear,fedavg,0,3,3,0.5\n")
    fedavg_curve = {int(r["round"]): float(r["value"]) for r in curves if r["method"] == "fedavg"}
    stored = load_curves(tmp_path, rows)
    assert stored["synthetic_linear", "fedavg", "0", "3"] == fedavg_curve | {3: 0.5}

    capsys.readouterr()
    main(args)  # everything is done: nothing runs again
    assert "synthetic_linear / " not in capsys.readouterr().out
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == 2

    # the report alone, for a grid with a seed not run yet: nothing runs, the cells say how many seeds they have
    main(["report", "--tasks", "synthetic_linear", "--methods", "fedavg", "floral1", "--seeds", "0", "1",
          "--rounds", "3", "--out", str(tmp_path)])  # fmt: skip
    assert "synthetic_linear / " not in capsys.readouterr().out
    report = (tmp_path / "results.md").read_text()
    assert report.count(" n=1") == 2 and "--seeds 0 1" in report and "invocation's wall time" not in report

    # the report needs no run logs: curves come from curves.csv; a cell with neither is named, not a crash
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "curves_synthetic_linear.png").unlink()
    lines = (tmp_path / "curves.csv").read_text().splitlines()
    (tmp_path / "curves.csv").write_text("\n".join(line for line in lines if ",floral1," not in line) + "\n")
    main(["report", "--tasks", "synthetic_linear", "--methods", "fedavg", "floral1", "--rounds", "3",
          "--out", str(tmp_path)])  # fmt: skip
    assert "1 cell(s) have no stored curve" in (tmp_path / "results.md").read_text()
    assert "synthetic_linear/floral1/0." in (tmp_path / "results.md").read_text()
    assert (tmp_path / "curves_synthetic_linear.png").stat().st_size > 1000

    # a report of a folder that holds no grid says so, instead of a traceback
    with pytest.raises(SystemExit, match=r"empty/results.csv does not exist; run 'compare'"):
        main(["report", "--tasks", "synthetic_linear", "--methods", "fedavg", "--rounds", "3",
              "--out", str(tmp_path / "empty")])  # fmt: skip


def test_cell_value_is_the_mean_of_the_last_percent_of_rounds():
    history = {"val/acc": [(r, r / 1000) for r in range(10, 1001, 10)]}
    # 1 % of 1000 rounds = the last 10 rounds: only the round-1000 evaluation falls inside (round > 990)
    assert summarise_cell(history, 1000)["value"] == pytest.approx(1.0)
    history = {"val/acc": [(r, r / 1000) for r in range(1, 1001)]}
    assert summarise_cell(history, 1000)["value"] == pytest.approx(sum(range(991, 1001)) / 10 / 1000)
