"""What a person reads of a run: the mixtures figure, TensorBoard's dashboard, and the run directory's files."""

from __future__ import annotations

import csv
import glob
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2

from callbacks import FederatedProgressBar, RunReport
from callbacks.run_report import UMASK, custom_scalars_layout, flatten_options
from floral_lightning.cli import main, run_options
from floral_lightning.figures import mixtures_figure, render_figure

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = ["fit", "--config", str(ROOT / "conf" / "synthetic_linear.yaml"), "--trainer.enable_model_summary=false"]


# --- the mixtures figure -------------------------------------------------------------------------------------
def shown_rows(fig) -> np.ndarray:
    """The matrix drawn in the figure's clients panel (rows in drawing order)."""
    return np.ma.getdata(fig.axes[1].images[0].get_array())


def test_figure_groups_clients_by_true_cluster_and_summarises_each():
    clusters = torch.tensor([1, 0, 1, 0, 0])
    mixtures = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.3, 0.7]])
    fig = mixtures_figure(mixtures, clusters, title="round 3", figsize=(6, 4), dpi=50)
    # cluster 0 first (clients 1, 3 with argmax 0, then client 4 with argmax 1), then cluster 1 (2, then 0)
    np.testing.assert_allclose(shown_rows(fig), mixtures[[1, 3, 4, 2, 0]].numpy())
    # the left panel: each cluster's mean mixture, written in its cells
    np.testing.assert_allclose(np.ma.getdata(fig.axes[0].images[0].get_array()), [[0.6, 0.4], [0.45, 0.55]])
    assert {t.get_text() for t in fig.axes[0].texts} == {"0.60", "0.40", "0.45", "0.55"}
    assert fig.axes[1].get_xlabel() == "adaptor" and "true cluster" in fig.axes[1].get_ylabel()
    assert fig.axes[-1].get_ylabel().startswith("mixture weight")  # the colour bar
    pixels, png = render_figure(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and pixels.shape == (200, 300, 3) and pixels.dtype == np.uint8
    assert (int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")) == (300, 200)  # 6 x 4 in at 50 dpi


def test_figure_without_clusters_groups_by_argmax_and_flags_nan_mixtures():
    mixtures = torch.tensor([[0.1, 0.9], [float("nan"), float("nan")], [0.8, 0.2], [0.4, 0.6]])
    fig = mixtures_figure(mixtures, None, title="t")  # a diverged client must not crash the report
    rows = shown_rows(fig)
    # groups: NaN (-1) first, then argmax 0 (client 2), then argmax 1 (clients 0, 3)
    assert np.isnan(rows[0]).all()
    np.testing.assert_allclose(rows[1:], mixtures[[2, 0, 3]].numpy())
    assert "argmax adaptor" in fig.axes[1].get_ylabel()
    assert "1 client(s) with NaN mixtures" in fig._suptitle.get_text()


def test_figure_samples_each_cluster_above_max_clients():
    clusters = torch.arange(10_000) % 4
    mixtures = torch.nn.functional.one_hot(clusters, 4).float()
    fig = mixtures_figure(mixtures, clusters, max_clients=200)
    rows = shown_rows(fig)
    assert rows.shape == (200, 4)  # 50 per cluster
    np.testing.assert_array_equal(rows.argmax(1), np.repeat(np.arange(4), 50))
    assert "200 of 10000" in fig.axes[1].get_title()


def test_figure_rejects_bad_input_by_name():
    with pytest.raises(ValueError, match=r"clusters has 3 entries but mixtures has 2 clients"):
        mixtures_figure(torch.ones(2, 2) / 2, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"figure_max_clients=0"):
        RunReport(figure_max_clients=0)


# --- layout, options, state ----------------------------------------------------------------------------------
def test_custom_scalars_layout_puts_accuracy_first_and_names_only_given_tags():
    scalars = dict.fromkeys(
        ["val/acc", "val/acc_worst", "val/acc_cluster10", "val/acc_cluster2", "val/loss", "val/routing_ari"], 0.0
    )
    (category,) = custom_scalars_layout(scalars, "val/acc").values()
    charts = list(category.items())
    assert charts[0] == ("val/acc: mean, unweighted, worst client", ["Multiline", ["^val/acc$", "^val/acc_worst$"]])
    assert charts[1][1][1] == ["^val/acc_cluster2$", "^val/acc_cluster10$"]  # numeric order
    assert charts[2][1][1] == ["^val/routing_ari$"]  # no router_entropy tag: not named
    assert len(charts) == 3


def test_run_options_flatten_the_config_without_init_args():
    config = {
        "model": {"class_path": "floral_lightning.FloralModule", "init_args": {"rank": 0.1, "router": {"top_k": None}}},
        "data": {"class_path": "x.FederatedDataModule", "init_args": {"source": {"class_path": "x.NpzArrays"}}},
        "federated": {"clients_per_round": 0.1, "server_betas": [0.9, 0.99]},
        "trainer": {"max_epochs": 7, "devices": 1},
        "seed_everything": 3,
    }
    assert run_options(config) == {
        "model.class": "FloralModule",
        "model.rank": 0.1,
        "model.router.top_k": "None",
        "data.class": "FederatedDataModule",
        "data.source.class": "NpzArrays",
        "federated.clients_per_round": 0.1,
        "federated.server_betas": "[0.9, 0.99]",
        "seed_everything": 3,
        "trainer.max_epochs": 7,
    }
    assert flatten_options({"a": {"b": True}}, "m") == {"m.a.b": True}


def test_best_round_so_far_follows_the_metric_direction():
    report = RunReport()
    accuracy = [(10, float("nan")), (20, 0.5), (30, 0.7), (40, 0.6), (50, 0.7)]
    assert [report.update_best("val/acc", v, r, True) for r, v in accuracy][1:] == [(0.5, 20), (0.7, 30), (0.7, 30),
                                                                                 (0.7, 30)]  # fmt: skip
    mse = [(1, 3.0), (2, 1.0), (3, 2.0)]
    assert [report.update_best("val/mse", v, r, False) for r, v in mse] == [(3.0, 1), (1.0, 2), (1.0, 2)]


def test_best_round_survives_a_checkpoint():
    report = RunReport()
    report.best = {"val/acc": (0.9, 40)}
    restored = RunReport()
    restored.load_state_dict(report.state_dict())
    assert restored.best == {"val/acc": (0.9, 40)}


def test_progress_bar_shows_the_client_id_as_an_int(monkeypatch):
    from lightning.pytorch.callbacks import TQDMProgressBar

    monkeypatch.setattr(TQDMProgressBar, "get_metrics", lambda self, trainer, module: {"client": 7.0, "v_num": 0})
    assert FederatedProgressBar().get_metrics(None, None) == {"client": 7, "v_num": 0}


# --- end to end: what TensorBoard and the run directory hold ------------------------------------------------
def events(log_dir: Path) -> EventAccumulator:
    (path,) = glob.glob(str(log_dir / "events.out.tfevents.*"))
    acc = EventAccumulator(path, size_guidance={"images": 0, "scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_dashboard_of_a_short_run(tmp_path, caplog):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # RunReport's filter goes in front of this one when the run starts
        cli = main([*SYNTHETIC, "--trainer.max_epochs=4", "--trainer.check_val_every_n_epoch=2",
                    f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])  # fmt: skip
    log_dir = Path(cli.trainer.log_dir)
    acc = events(log_dir)
    scalars = set(acc.Tags()["scalars"])

    # one x-axis: every value is stepped by the round (evaluations after rounds 2 and 4, training every round)
    assert [e.step for e in acc.Scalars("val/mse")] == [2, 4]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Images("val/mixtures")] == [2, 4]
    assert "epoch" not in scalars and "step" not in scalars  # Lightning uses our "step" key as the step

    # hp_metric is the personalised MSE of each evaluation (never Lightning's placeholder -1)
    mse = [e.value for e in acc.Scalars("val/mse")]
    assert [e.value for e in acc.Scalars("hp_metric")] == mse and -1.0 not in mse
    # the best round so far, by a hand-written running minimum
    best = [min(mse[: i + 1]) for i in range(len(mse))]
    assert [e.value for e in acc.Scalars("val/mse_best")] == pytest.approx(best)
    assert [e.value for e in acc.Scalars("val/mse_best_round")] == [2 * (mse.index(b) + 1) for b in best]

    # the figure: 9 x 6 inches at 100 dpi
    image = acc.Images("val/mixtures")[-1]
    assert (image.width, image.height) == (900, 600)
    # ... and the same picture is the run directory's PNG of that round
    logged = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    written = np.asarray(Image.open(log_dir / "mixtures" / "val_round00004.png").convert("RGB"))
    np.testing.assert_array_equal(logged, written)

    # custom scalars: accuracy-like chart first, and every tag it names exists
    (layout_event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(layout_event.tensor_proto.string_val[0])
    first = layout.category[0].chart[0]
    assert first.title.startswith("val/mse: mean, unweighted, worst")
    named = [tag for category in layout.category for chart in category.chart for tag in chart.multiline.tag]
    assert len(named) == 7  # 3 summary + 2 clusters + ARI + entropy
    for pattern in named:
        assert [t for t in scalars if re.search(pattern, t)] == [pattern.strip("^$")]

    # HPARAMS: model, router, federated and data options, with the metrics
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model.rank"].number_value == 1 and hparams["model.class"].string_value == "FloralModule"
    assert hparams["model.task"].string_value == "regression" and hparams["model.base.class"].string_value == "Linear"
    assert hparams["federated.clients_per_round"].number_value == 1.0
    assert hparams["data.num_clients"].number_value == 10 and hparams["trainer.max_epochs"].number_value == 4
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"hp_metric", "val/mse", "val/mse_worst", "val/routing_ari"} <= {m.name.tag for m in experiment.metric_infos}

    # per-client values: a histogram per evaluation, and the CSV, whose sample-weighted mean is val/mse
    assert [e.step for e in acc.Histograms("val/mse_clients")] == [2, 4]
    rows = list(csv.DictReader((log_dir / "clients_val.csv").open()))
    assert [int(r["round"]) for r in rows] == [2] * 10 + [4] * 10
    last = [r for r in rows if r["round"] == "4"]
    weighted = sum(float(r["mse"]) * int(r["samples"]) for r in last) / sum(int(r["samples"]) for r in last)
    assert weighted == pytest.approx(mse[-1], rel=1e-5)
    assert all(abs(sum(float(r[f"mixture_{c}"]) for c in range(2)) - 1) < 1e-5 for r in last)
    spread = np.std([float(r["mse"]) for r in last])
    assert acc.Scalars("val/mse_std")[-1].value == pytest.approx(spread, rel=1e-5)

    # with the progress bar off: one line per evaluation
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert len(lines) == 2 and lines[1].startswith("round 4/4 | val/mse ")
    assert "worst client" in lines[1] and "routing ARI" in lines[1] and lines[1].endswith("s/round")
    # silenced: nothing is logged per step, so Lightning's advice on the logging interval does not apply
    assert not [w for w in caught if "smaller than the logging interval" in str(w.message)]


@pytest.mark.slow
def test_csv_logger_run_directory_holds_figure_clients_and_overhead(tmp_path):
    csv_logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    cli = main([*SYNTHETIC, "--trainer.max_epochs=2", "--trainer.check_val_every_n_epoch=1", *csv_logger,
                f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                "--report.figure_max_clients=6"])  # fmt: skip
    (report,) = [c for c in cli.trainer.callbacks if isinstance(c, RunReport)]  # added by the CLI, options under report
    assert report.figure_max_clients == 6 and report.hyperparameters["federated.clients_per_round"] == 1.0
    log_dir = Path(cli.trainer.log_dir)
    assert sorted(p.name for p in (log_dir / "mixtures").iterdir()) == ["val_round00001.png", "val_round00002.png"]
    assert (log_dir / "mixtures" / "val_round00002.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(csv.DictReader((log_dir / "clients_val.csv").open()))) == 2 * 10
    assert "| adaptors (C=2, federated) |" in (log_dir / "overhead.md").read_text()
    # written atomically, yet with a normal file's permissions (not the temporary file's private 0600)
    assert (log_dir / "clients_val.csv").stat().st_mode & 0o777 == 0o666 & ~UMASK
    metrics = list(csv.DictReader((log_dir / "metrics.csv").open()))
    assert [r["step"] for r in metrics if r.get("val/mse")] == ["1", "2"]  # stepped by round here too
    assert "federated.clients_per_round: 1.0" in (log_dir / "hparams.yaml").read_text()


def test_the_figure_is_drawn_for_a_logger_at_the_rounds_asked_for(tmp_path, monkeypatch):
    """Without a logger nothing would get the mixtures figure (about half a second a draw): it is not drawn. With
    ``figure_every_n_rounds`` it is drawn after multiples of it and at the last round, and on every test."""
    import callbacks.run_report

    drawn = []
    monkeypatch.setattr(callbacks.run_report, "render_figure", lambda fig: drawn.append(fig) or render_figure(fig))
    args = [*SYNTHETIC, "--trainer.max_epochs=5", "--trainer.check_val_every_n_epoch=1",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]  # fmt: skip
    main([*args, "--trainer.logger=false"])
    assert drawn == []
    csv_logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    cli = main([*args, *csv_logger])
    assert len(drawn) == 5  # by default at every evaluation
    drawn.clear()
    cli = main([*args, *csv_logger, "--report.figure_every_n_rounds=2"])
    assert sorted(p.name for p in (Path(cli.trainer.log_dir) / "mixtures").iterdir()) == [
        "val_round00002.png", "val_round00004.png", "val_round00005.png"  # 5: the last round
    ]  # fmt: skip
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert len(drawn) == 4
    with pytest.raises(ValueError, match="figure_every_n_rounds=0: must be >= 1"):
        RunReport(figure_every_n_rounds=0)


def test_render_dashboard_names_a_directory_without_events(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_dashboard", ROOT / "docs" / "render_dashboard.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    with pytest.raises(SystemExit):
        render.main([str(tmp_path)])
    assert f"run_dir={tmp_path} holds no events.out.tfevents.* file" in capsys.readouterr().err
