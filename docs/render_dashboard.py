"""Render a run's TensorBoard dashboard to PNG with headless Chromium (the README's screenshots).

Serves TensorBoard for one run directory on a local port, opens each tab in headless Chromium, saves a
screenshot per tab (a palette PNG, so they stay small enough to commit), and copies the run's latest mixtures
figure beside them::

    apt-get install -y chromium          # Debian's package; any Chromium or Chrome works (--chromium PATH)
    python docs/render_dashboard.py lightning_logs/version_0 --out docs/dashboard

writes ``custom_scalars.png`` (``--tabs`` picks others: ``time_series``, ``hparams``, ``images``) and
``mixtures.png`` (the run's latest ``mixtures/val_round*.png``) into ``--out``.
Nothing leaves the machine: TensorBoard listens on 127.0.0.1 and Chromium runs with networking extras off.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

#: TensorBoard tabs that can be captured: name -> URL fragment (smoothing off: a run has few evaluations)
TABS = {
    "custom_scalars": "custom_scalars&_smoothingWeight=0",
    "time_series": "timeseries",
    "hparams": "hparams",
    "images": "images",
}

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"TensorBoard did not answer at {url} within {timeout_s:.0f} s") from None
            time.sleep(0.5)


def screenshot(chromium: str, url: str, path: Path, size: tuple[int, int], wait_ms: int) -> None:
    """One headless Chromium screenshot of ``url``; ``wait_ms`` of virtual time lets the page's scripts draw."""
    with tempfile.TemporaryDirectory() as profile:
        window = [f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={wait_ms}"]
        subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *window, f"--screenshot={path}", url],
            check=True,
            capture_output=True,
            timeout=120,
        )
    # 256-colour palette: a dashboard is flat colours, so this is lossless to the eye and several times smaller
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run's log directory (holds events.out.tfevents.*)")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard"), help="where the PNGs go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="the browser binary")
    parser.add_argument("--tabs", nargs="+", choices=sorted(TABS), default=["custom_scalars"])
    parser.add_argument("--size", type=int, nargs=2, default=(1280, 860), metavar=("W", "H"))
    parser.add_argument("--wait-ms", type=int, default=15000, help="virtual time the page gets to render")
    args = parser.parse_args(argv)
    if not list(args.run_dir.glob("events.out.tfevents.*")):
        parser.error(f"run_dir={args.run_dir} holds no events.out.tfevents.* file; pass a run's log directory")
    args.out.mkdir(parents=True, exist_ok=True)

    port = free_port()
    serve = ["--logdir", str(args.run_dir), "--host", "127.0.0.1", "--port", str(port), "--load_fast=false"]
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", *serve],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_until_up(base, timeout_s=60)
        time.sleep(3)  # the first load of the event files
        for name in args.tabs:
            screenshot(args.chromium, f"{base}#{TABS[name]}", args.out / f"{name}.png", tuple(args.size), args.wait_ms)
            print(f"wrote {args.out / f'{name}.png'}")
    finally:
        server.terminate()
        server.wait(timeout=30)

    figures = sorted((args.run_dir / "mixtures").glob("val_round*.png"))
    if figures:
        shutil.copyfile(figures[-1], args.out / "mixtures.png")
        print(f"wrote {args.out / 'mixtures.png'} (from {figures[-1].name})")


if __name__ == "__main__":
    main()
