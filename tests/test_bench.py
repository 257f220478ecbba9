"""The benchmark suite runs end to end in --quick mode and writes a complete results file.

Timings depend on the machine and its load, so nothing here asserts on speed: only that every section is
present and every figure is a finite positive number with its target and met fields.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"layers", "round", "fedavg_vs_floral", "tasks", "evaluation", "scaling", "startup"}


@pytest.mark.slow
def test_quick_suite_writes_every_section(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| section | figure |" in proc.stdout  # the Markdown table

    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert results["torch_num_threads"] >= 1 and results["torch_version"]
    assert {"date", "machine", "command", "summary"} <= set(results)
    assert set(results["sections"]) == SECTIONS
    targeted = 0
    for name, section in results["sections"].items():
        assert section["method"] and section["figures"], name
        for figure in section["figures"]:
            label = f"{name}: {figure['name']}"
            assert {"value", "unit", "ratio", "target", "met", "command"} <= set(figure), label
            assert isinstance(figure["value"], (int, float)), label
            assert math.isfinite(figure["value"]) and figure["value"] > 0, label
            assert figure["command"].startswith("python -m bench --only " + name), label
            if figure["ratio"] is not None:
                assert math.isfinite(figure["ratio"]) and figure["ratio"] > 0, label
            if figure["target"] is None:
                assert figure["met"] is None, label
            else:
                targeted += 1
                assert figure["ratio"] is not None and isinstance(figure["met"], bool), label
                assert figure["met"] == (figure["ratio"] <= figure["target"]), label
    assert results["summary"]["targets"] == targeted > 0


@pytest.mark.slow
def test_layers_script_prints_and_writes_json(tmp_path):
    out = tmp_path / "layers.json"
    proc = subprocess.run(
        [sys.executable, "bench/layers.py", "--quick", "--model", "cifar_cnn", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "merged path" in proc.stdout
    figures = json.loads(out.read_text())["layers"]["figures"]
    assert [f["name"].split(": ")[1] for f in figures] == ["base model", "naive path", "factorised path", "merged path"]
    assert all(f["ratio"] > 0 for f in figures) and figures[0]["ratio"] == 1.0


def test_step_ab_measures_two_package_versions_and_names_a_bad_directory(tmp_path, capsys):
    import floral_lightning
    from bench import step_ab

    result = step_ab.measure(floral_lightning, rotations=1, steps=1)  # the package against itself, tiny
    assert set(result) == set(step_ab.CASES)
    assert all(t[v] > 0 for t in result.values() for v in ("base", "old", "new"))
    with pytest.raises(SystemExit):
        step_ab.main(["--old", str(tmp_path)])
    assert f"{tmp_path}/floral_old/__init__.py" in capsys.readouterr().err


def test_router_diagnostics_script_prints_each_variant_and_writes_its_curves(tmp_path):
    out = tmp_path / "router.json"
    proc = subprocess.run(
        [sys.executable, "bench/router_diagnostics.py", "--task", "synthetic_linear", "--rounds", "3",
         "--eval-every", "1", "--print-every", "1", "--variants", "paper", "cluster", "--out", str(out),
         "--log-dir", str(tmp_path / "logs")],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### paper" in proc.stdout and "### cluster" in proc.stdout
    variants = json.loads(out.read_text())["variants"]
    for result in variants.values():  # the last one is the cluster run, used below
        assert [row["round"] for row in result["diagnostics"]] == [1.0, 2.0, 3.0]
        assert [r for r, _ in result["val"]["val/mse"]] == [1, 2, 3]
        assert result["final"] == result["val"]["val/mse"][-1][1]
    # synthetic linear's two clusters are found from the first updates: ARI 1 from the first round on
    assert variants["cluster"]["diagnostics"][0]["router/ari"] == 1.0
    assert variants["cluster"]["first_round_ari_target"] == 1
    # --grid reads a runner folder's results.csv and each cell's run log: point one row at the cluster run
    from bench.router_diagnostics import grid_rows

    fields = "task,method,seed,rounds,value,routing_ari,log_dir"
    row = f"synthetic_linear,floral1_cluster,0,3,{result['final']},1.0,logs/synthetic_linear/cluster/seed0"
    (tmp_path / "results.csv").write_text(f"{fields}\n{row}\n")
    lines = grid_rows(tmp_path, ["floral1_cluster"])
    assert lines[2] == f"| synthetic_linear | floral1_cluster | 0 | {result['final']:.4g} | 1.000 | 1 |"


def test_first_round_at_is_the_round_from_which_the_curve_stays_at_the_target():
    from bench.router_diagnostics import first_round_at

    assert first_round_at([(1, 0.2), (2, 0.96), (3, 0.9), (4, 0.97), (5, 1.0)], 0.95) == 4
    assert first_round_at([(1, 0.99), (2, 0.96)], 0.95) == 1
    assert first_round_at([(1, 0.99), (2, 0.5)], 0.95) is None


def test_curve_rows_compare_runs_of_different_lengths_at_one_round(tmp_path):
    from bench.router_diagnostics import curve_rows

    (tmp_path / "curves.csv").write_text(
        "task,method,seed,rounds,round,value\n"
        "t,floral1,0,2000,500,0.25\nt,floral1,0,2000,1000,0.125\n"
        "t,floral1_cluster,0,500,500,0.5\nt,other,0,500,500,9.0\n"
    )
    rows = curve_rows(tmp_path, ["floral1_cluster", "floral1"], 500)
    assert rows[2:] == ["| t | floral1_cluster | 0 | 500 | 0.5 |", "| t | floral1 | 0 | 2000 | 0.25 |"]
