"""Start-up cost: from launching ``python train.py fit ...`` to its first training step.

The fit runs the shipped ``conf/synthetic_linear.yaml`` for one round (``--trainer.max_epochs=1``) in a fresh
interpreter, with one extra callback appended from the command line
(``--trainer.callbacks+=bench.startup.StartupStamps``) that prints ``time.time()`` at ``on_fit_start`` and
at the first ``on_train_batch_start``; the parent subtracts the wall-clock time it launched the process at.
Appending a callback is what any user can do; the callback does nothing else. Everything the config does
is included: argument parsing, imports, data set-up, the sanity validation, the checkpoint written at the
end (its log directory is a temporary one). A fresh ``python -c "import floral_lightning.cli"`` that prints
``time.time()`` once imported is timed the same way, to show the share of the imports.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time

from lightning.pytorch.callbacks import Callback

from bench.common import ROOT, Figure, Section, spread

STAMP = "FLORAL_BENCH_STAMP"


class StartupStamps(Callback):
    """Prints wall-clock stamps at the start of ``fit`` and of the first training batch."""

    def __init__(self) -> None:
        self._stepped = False

    def on_fit_start(self, trainer, pl_module) -> None:
        print(f"{STAMP} fit_start {time.time():.6f}", flush=True)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._stepped:
            self._stepped = True
            print(f"{STAMP} first_step {time.time():.6f}", flush=True)


def fit_command(log_dir: str) -> list[str]:
    """The measured command (paths relative to the repository root)."""
    return [
        "train.py",
        "fit",
        "--config",
        "conf/synthetic_linear.yaml",
        "--trainer.max_epochs=1",
        f"--trainer.default_root_dir={log_dir}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.callbacks+=bench.startup.StartupStamps",
    ]


# prints the wall-clock time once the import is done, so interpreter teardown is not counted
IMPORT_COMMAND = ["-c", "import floral_lightning.cli, time; print(f'{time.time():.6f}')"]


def time_fit(root: str) -> dict[str, float]:
    """Seconds from launch to ``fit`` start, to the first training step, and to the process's exit."""
    with tempfile.TemporaryDirectory(prefix="floral_bench_") as log_dir:
        start = time.time()
        proc = subprocess.run(
            [sys.executable, *fit_command(log_dir)], cwd=root, capture_output=True, text=True, timeout=300
        )
        end = time.time()
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    stamps = {}
    for line in proc.stdout.splitlines():
        if line.startswith(STAMP):
            _, name, value = line.split()
            stamps[name] = float(value) - start
    if set(stamps) != {"fit_start", "first_step"}:
        raise RuntimeError(f"train.py printed stamps {sorted(stamps)}; expected fit_start and first_step")
    return {"to_fit_start": stamps["fit_start"], "to_first_step": stamps["first_step"], "to_exit": end - start}


def time_import(root: str) -> float:
    """Seconds from launching a fresh interpreter to the end of ``import floral_lightning.cli``."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, *IMPORT_COMMAND], cwd=root, check=True, capture_output=True, text=True, timeout=300
    )
    return float(proc.stdout.split()[-1]) - start


def measure(root: str, repeats: int) -> dict[str, list[float]]:
    """``repeats`` alternations of the import and the fit (medians are taken by the caller)."""
    out: dict[str, list[float]] = {"import": [], "to_fit_start": [], "to_first_step": [], "to_exit": []}
    for _ in range(repeats):
        out["import"].append(time_import(root))
        for key, value in time_fit(root).items():
            out[key].append(value)
    return out


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median of every series."""
    return {key: float(statistics.median(values)) for key, values in samples.items()}


def run(quick: bool = False) -> Section:
    """The ``startup`` section."""
    repeats = 1 if quick else 3
    samples = measure(str(ROOT), repeats)
    m = medians(samples)
    command = "python " + " ".join(fit_command("<tmp>"))
    figures = [
        Figure(
            "python -c 'import floral_lightning.cli': launch to import done",
            round(m["import"], 3),
            "s",
            detail={"s": spread(samples["import"]), "command": "python " + " ".join(IMPORT_COMMAND)},
        ),
        Figure(
            "train.py fit: launch to on_fit_start",
            round(m["to_fit_start"], 3),
            "s",
            detail={"s": spread(samples["to_fit_start"]), "command": command},
        ),
        Figure(
            "train.py fit: launch to first training step",
            round(m["to_first_step"], 3),
            "s",
            ratio=round(m["to_first_step"] / m["import"], 3),
            detail={"s": spread(samples["to_first_step"]), "command": command, "ratio_is": "/ import time"},
        ),
        Figure(
            "train.py fit: launch to exit (1 round, checkpoint written)",
            round(m["to_exit"], 3),
            "s",
            detail={"s": spread(samples["to_exit"]), "command": command},
        ),
    ]
    method = __doc__.split("\n\n", 1)[1].strip().replace("\n", " ") + f" Median of {repeats} alternations."
    return Section("startup", figures, method, {"repeats": repeats, "config": "conf/synthetic_linear.yaml"})
