"""Evaluating every client's test set at once with FLoRAL against one FedAvg model on the same samples.

FLoRAL evaluation runs the ``ClientEvalLoader`` batches of ``FederatedDataModule`` (many clients per batch,
``model(x, client_ids)`` with one id per sample) in eval mode under ``torch.no_grad``; FedAvg runs the bare
``CifarCNN`` on the very same batches. The batches are materialised once before timing (normalisation is the
same for both and is left out, which makes the ratio stricter). With the default ``auto`` path the convs run
each client's contiguous run of the batch through the merged path (``FloralLayer.merge_runs_from``) and the
linear layers take the factorised path. For context: the factorised path everywhere, and each batch split into
its clients' runs in Python (``torch.unique_consecutive``; the loader is client-sorted), each run through the
whole model with an int id, with FedAvg on the same sub-batches as its control (smaller batches alone change
the time). All FLoRAL variants are exact.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from bench.common import Figure, Section, interleaved_times, median, spread
from bench.rounds import RoundSizes, cifar_like_data, cifar_module

EVAL_TARGET = 1.3  # FLoRAL evaluation / FedAvg evaluation


def eval_variants(test_per_client: int, num_clients: int = 20) -> tuple[dict[str, Callable[[], None]], dict]:
    """Closures that evaluate all clients' test sets: FedAvg and FLoRAL (factorised) on the loader's batches,
    and FLoRAL (merged per client) and FedAvg on the same batches split into their clients' runs."""
    data = cifar_like_data(RoundSizes(num_clients=num_clients, train_per_client=4, test_per_client=test_per_client))
    loader = data.test_dataloader()
    batches = list(loader)
    floral = cifar_module(num_clients, 4).model.eval()
    with torch.no_grad():  # trained-looking adaptors and mixtures (B starts at 0); costs do not depend on values
        for name, p in floral.named_parameters():
            if name.endswith("adaptor_B") or name.startswith("router."):
                p.normal_(0.0, 0.01)
    factorised = copy.deepcopy(floral)
    factorised.set_path("factorised")
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
    def run_factorised() -> None:
        for x, _, ids in batches:
            factorised(x, ids)

    @torch.no_grad()
    def run_fedavg_split() -> None:  # control: the same sub-batches through FedAvg
        for x, _, ids in batches:
            _, counts = torch.unique_consecutive(ids, return_counts=True)
            torch.cat([fedavg(part) for part in x.split(counts.tolist())])

    @torch.no_grad()
    def run_floral_split() -> None:
        for x, _, ids in batches:
            clients, counts = torch.unique_consecutive(ids, return_counts=True)
            torch.cat([floral(part, int(k)) for part, k in zip(x.split(counts.tolist()), clients)])

    facts = {
        "samples": sum(len(b[0]) for b in batches),
        "batches": len(batches),
        "eval_batch_size": loader.batch_size,
        "clients_per_batch": [int(b[2].unique().numel()) for b in batches],
    }
    variants = {
        "FedAvg": run_fedavg,
        "FLoRAL": run_floral,
        "FLoRAL_factorised": run_factorised,
        "FLoRAL_split": run_floral_split,
        "FedAvg_split": run_fedavg_split,
    }
    return variants, facts


def run(quick: bool = False) -> Section:
    """The ``evaluation`` section."""
    test_per_client, repeats = (16, 3) if quick else (100, 7)
    variants, facts = eval_variants(test_per_client)
    samples = interleaved_times(variants, repeats=repeats, calls=1, warmup=1)
    fedavg, fedavg_cpu = median(samples["FedAvg"].wall), median(samples["FedAvg"].cpu)
    floral = median(samples["FLoRAL"].wall)
    factorised = median(samples["FLoRAL_factorised"].wall)
    split = median(samples["FLoRAL_split"].wall)
    fedavg_split = median(samples["FedAvg_split"].wall)
    figures = [
        Figure(
            "FedAvg model, all clients' test sets",
            round(fedavg * 1e3, 2),
            "ms",
            ratio=1.0,
            detail={"ms": spread(samples["FedAvg"].wall, 1e3), **facts},
        ),
        Figure(
            "FLoRAL, all clients at once (mixture per sample, auto path)",
            round(floral * 1e3, 2),
            "ms",
            ratio=round(floral / fedavg, 3),
            target=EVAL_TARGET,
            detail={
                "ms": spread(samples["FLoRAL"].wall, 1e3),
                "cpu_ratio": round(median(samples["FLoRAL"].cpu) / fedavg_cpu, 3),
            },
        ),
        Figure(
            "FLoRAL, all clients at once, factorised path forced",
            round(factorised * 1e3, 2),
            "ms",
            ratio=round(factorised / fedavg, 3),
            detail={"ms": spread(samples["FLoRAL_factorised"].wall, 1e3)},
        ),
        Figure(
            "FedAvg, same batches split by client",
            round(fedavg_split * 1e3, 2),
            "ms",
            ratio=round(fedavg_split / fedavg, 3),
            detail={"ratio_is": "/ FedAvg on the whole batches", "ms": spread(samples["FedAvg_split"].wall, 1e3)},
        ),
        Figure(
            "FLoRAL, same batches split by client (merged path per client)",
            round(split * 1e3, 2),
            "ms",
            ratio=round(split / fedavg_split, 3),
            detail={
                "ratio_is": "/ FedAvg on the same sub-batches",
                "ms": spread(samples["FLoRAL_split"].wall, 1e3),
                "cpu_ratio": round(median(samples["FLoRAL_split"].cpu) / median(samples["FedAvg_split"].cpu), 3),
                "ratio_to_fedavg_full_batches": round(split / fedavg, 3),
            },
        ),
    ]
    method = (
        f"20 clients x {test_per_client} RandomImages test images 3x32x32 (rotate clusters), CifarCNN, FLoRAL C=4 "
        "rho=1%, eval mode, torch.no_grad. The ClientEvalLoader batches (eval_batch_size 1024, batches span "
        "clients) are materialised once; FLoRAL runs model(x, client_ids) (a mixture per sample; auto path: convs "
        "merged per client run, linears factorised), FedAvg the bare "
        f"CifarCNN on the same batches. Interleaved, {repeats} rounds after 1 warm-up; value = median time of a "
        "whole evaluation, ratio = / FedAvg on the same batches. Context (no target): the factorised path forced "
        "everywhere; the batches split into their clients' contiguous runs in Python, each run through the whole "
        "model with an int id, against FedAvg on the same sub-batches."
    )
    return Section("evaluation", figures, method, {"test_per_client": test_per_client, "repeats": repeats, **facts})
