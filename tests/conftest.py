"""Shared test set-up: the offline data files, and seeded random tensors for the definition tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: where the shared offline data live: beside the checkout, or wherever FLORAL_DATA_DIR points (a worktree
#: outside the main checkout's parent sets it to reach the same files)
SHARED_DATA = Path(os.environ.get("FLORAL_DATA_DIR", ROOT.parent / "shared" / "data"))


def shared_data_file(name: str) -> Path:
    """The path of an offline data file; a missing file skips the test locally and fails it in CI.

    CI sets ``CI=true``: there a missing file means the test silently did not run, which must be seen.
    """
    path = SHARED_DATA / name
    if not path.is_file():
        message = f"offline data file {path} is missing (set FLORAL_DATA_DIR to the folder that holds {name})"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture
def mnist_npz() -> Path:
    """The offline MNIST subset (``x_train, y_train, x_test, y_test``)."""
    return shared_data_file("mnist_subset.npz")


@pytest.fixture
def randn() -> Callable[..., torch.Tensor]:
    """``randn(*shape)``: float64 normal draws from a generator seeded once per test (reproducible, and
    independent of the global RNG that the code under test may consume)."""
    generator = torch.Generator().manual_seed(1234)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    return draw
