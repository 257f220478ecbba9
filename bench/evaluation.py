"""Evaluating every client's test set at once with FLoRAL against one FedAvg model on the same samples.

FLoRAL evaluation runs the ``ClientEvalLoader`` batches of ``FederatedDataModule`` (many clients per batch,
``model(x, client_ids)`` with one id per sample: each sample its own mixture, the factorised path) in eval
mode under ``torch.no_grad``; FedAvg runs the bare ``CifarCNN`` on the very same batches. The batches are
materialised once before timing (normalisation is the same for both and is left out, which makes the ratio
stricter). For context, the alternative of evaluating each client on its own with the merged path
(``model(x_k, k)``: weights merged once per client) is timed too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.common import Figure, Section, interleaved_times, median, spread
from bench.rounds import RoundSizes, cifar_like_data, cifar_module

EVAL_TARGET = 1.3  # FLoRAL evaluation / FedAvg evaluation


def eval_variants(test_per_client: int, num_clients: int = 20) -> tuple[dict[str, Callable[[], None]], dict]:
    """Closures that evaluate all clients' test sets: FedAvg, FLoRAL (factorised), FLoRAL per client (merged)."""
    data = cifar_like_data(RoundSizes(num_clients=num_clients, train_per_client=4, test_per_client=test_per_client))
    loader = data.test_dataloader()
    batches = list(loader)
    per_client = [(loader.prep(data.client_split(k, "test")[0]), k) for k in range(num_clients)]
    floral = cifar_module(num_clients, 4).model.eval()
    with torch.no_grad():  # trained-looking adaptors and mixtures (B starts at 0); costs do not depend on values
        for name, p in floral.named_parameters():
            if name.endswith("adaptor_B") or name.startswith("router."):
                p.normal_(0.0, 0.01)
    fedavg = cifar_module(num_clients, 0).model.eval()

    @torch.no_grad()
    def run_fedavg() -> None:
        for x, _, _ in batches:
            fedavg(x)

    @torch.no_grad()
    def run_floral() -> None:
        for x, _, ids in batches:
            floral(x, ids)

    @torch.no_grad()
    def run_floral_per_client() -> None:
        for x, k in per_client:
            floral(x, k)

    facts = {
        "samples": sum(len(b[0]) for b in batches),
        "batches": len(batches),
        "eval_batch_size": loader.batch_size,
        "clients_per_batch": [int(b[2].unique().numel()) for b in batches],
    }
    return {"FedAvg": run_fedavg, "FLoRAL": run_floral, "FLoRAL_per_client": run_floral_per_client}, facts


def run(quick: bool = False) -> Section:
    """The ``evaluation`` section."""
    test_per_client, repeats = (16, 3) if quick else (250, 7)
    variants, facts = eval_variants(test_per_client)
    samples = interleaved_times(variants, repeats=repeats, calls=1, warmup=1)
    fedavg = median(samples["FedAvg"])
    floral = median(samples["FLoRAL"])
    per_client = median(samples["FLoRAL_per_client"])
    figures = [
        Figure("FedAvg model, all clients' test sets", round(fedavg * 1e3, 2), "ms", ratio=1.0, detail=facts),
        Figure(
            "FLoRAL, all clients at once (mixture per sample)",
            round(floral * 1e3, 2),
            "ms",
            ratio=round(floral / fedavg, 3),
            target=EVAL_TARGET,
            detail={"ms": spread(samples["FLoRAL"], 1e3)},
        ),
        Figure(
            "FLoRAL, one client at a time (merged path)",
            round(per_client * 1e3, 2),
            "ms",
            ratio=round(per_client / fedavg, 3),
            detail={"ms": spread(samples["FLoRAL_per_client"], 1e3)},
        ),
    ]
    method = (
        f"20 clients x {test_per_client} RandomImages test images 3x32x32 (rotate clusters), CifarCNN, FLoRAL C=4 "
        "rho=1%, eval mode, torch.no_grad. The ClientEvalLoader batches (eval_batch_size 1024, batches span "
        "clients) are materialised once; FLoRAL runs model(x, client_ids) (a mixture per sample), FedAvg the bare "
        f"CifarCNN on the same batches. Interleaved, {repeats} rounds after 1 warm-up; value = median time of a "
        "whole evaluation, ratio = / FedAvg."
    )
    return Section("evaluation", figures, method, {"test_per_client": test_per_client, "repeats": repeats, **facts})
