"""Every random decision of a run, drawn from a named stream of ``(seed, stream, *keys)``.

A federated run must be a pure function of its seed and its checkpoint: resuming after round t, re-running one
cell of a grid, or training round t's clients in another order (or in another process) must draw exactly the
same numbers. So nothing draws from a generator whose state depends on what ran before it; each decision seeds
its own generator from the keys that identify it:

=======================  ==============================================  =======================================
stream                   keys after the stream                           what it decides
=======================  ==============================================  =======================================
``SETUP``                ``round``                                       the clients sampled in a round
``SETUP``                ``SplitStep, part, 0``                          the data split pipeline (partition, ...)
``LOADER``               ``round, client, epoch``                        a client's batch order and augmentation
``FINETUNE``             ``round, client, epoch``                        the FT baseline's fine-tuning batches
``LOCAL_TRAINING``       ``round, client``                               router noise and dropout of a client's
                                                                         local training (the global torch RNG is
                                                                         seeded from it when the client starts)
``ROUTER_INIT``          ``0``                                           the k-means++ seeds of
                                                                         ``callbacks.ClusteredRouterInit``
``ROUTER_INIT``          ``1``                                           ``callbacks.AdaptorInitNoise``'s draw
=======================  ==============================================  =======================================

The numbers are part of the results' identity: changing a tag changes every split and sample drawn from it.
"""

from __future__ import annotations

import os
from enum import IntEnum

import numpy as np
import torch

__all__ = ["SplitStep", "Stream", "run_seed", "seed_local_training", "seeded_generator", "stream_seed"]


class Stream(IntEnum):
    """The first key after the run's seed: one per kind of random decision."""

    SETUP = 0
    LOADER = 1
    FINETUNE = 2
    LOCAL_TRAINING = 3
    ROUTER_INIT = 4


class SplitStep(IntEnum):
    """Sub-streams of ``Stream.SETUP`` for the data split pipeline: each step has its own, so changing e.g.
    ``train_fraction`` leaves the partition untouched."""

    PARTITION = 0
    REDUCE = 2
    VAL = 3
    CLIENT_TEST = 4  # the train/test split of a naturally partitioned client (keys: client, 0)


def run_seed(seed: int | None) -> int:
    """``seed``, or when it is ``None`` the run's global seed (``seed_everything``, which Lightning exports as
    ``PL_GLOBAL_SEED``; 0 if unset), so one ``--seed_everything=N`` seeds the data and the client sampling."""
    return int(seed) if seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))


def stream_seed(*keys: int) -> int:
    """A 64-bit seed hashed from a tuple of integers.

    NumPy's ``SeedSequence`` hashes the tuple, so nearby tuples such as (seed, round, client, epoch) give
    unrelated streams (a linear combination of the keys would collide and correlate).
    """
    entropy = [int(k) % 2**64 for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``stream_seed(*keys)``."""
    return torch.Generator().manual_seed(stream_seed(*keys))


def seed_local_training(seed: int, round_idx: int, client_id: int) -> None:
    """Seed the global torch RNG (CPU and every CUDA device) for ``client_id``'s local training in ``round_idx``.

    Router noise and dropout draw from the global RNG; seeding it per (seed, round, client) makes a client's
    update independent of which clients trained before it, of the process that trains it, and of whether the
    run was resumed — the RNG state never needs to be checkpointed.
    """
    seed_global_rng(stream_seed(seed, Stream.LOCAL_TRAINING, round_idx, client_id) % 2**63)


def seed_global_rng(seed: int) -> None:
    """``torch.manual_seed(seed)`` for the devices in use: every device's default generator when an accelerator
    is initialised, the CPU's (and MPS's) alone when none is.

    Why not always ``torch.manual_seed``: for each accelerator that is not initialised (CUDA, XPU and MTIA on a
    GPU build of torch run on a CPU) it queues a lazy seed with a formatted stack trace, about 0.3 ms a call —
    as long as a local step of a small model, paid by every client of every round. An accelerator that is not
    initialised holds no tensors to draw for; the round loop reseeds at every client, after the Trainer has
    moved the model to its device (which initialises it).
    """
    if any(device.is_initialized() for device in (torch.cuda, torch.xpu, torch.mtia)):
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    torch.mps.manual_seed(seed)
