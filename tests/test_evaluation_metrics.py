"""The logged evaluation values (``FloralModule._log_evaluation`` with ``floral_lightning/metrics.py``) against
values computed by hand from each client's own predictions (spec §2, "Evaluation"):

- ``val/acc``: the sample-weighted mean over clients of each client's accuracy; ``_unweighted``: the plain
  mean; ``_worst``: the worst client (the lowest accuracy, the highest loss or MSE); ``_clusterC``: the
  sample-weighted mean over the clients of true cluster C;
- ``val/routing_ari``: the adjusted Rand index between true clusters and argmax mixtures, from its
  pair-counting definition; ``val/router_entropy``: the mean entropy of softmax(theta / T);
- each client is evaluated with its mixture *without* noise (a huge training noise makes a leak obvious).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from floral_lightning.data import FederatedDataModule, RandomImages, SyntheticLinear
from floral_lightning.metrics import adjusted_rand_index
from floral_lightning.models import MLP
from floral_lightning.module import FloralModule, RouterOptions
from floral_lightning.tasks import RegressionModule

K, C, T = 6, 3, 2.0
CLUSTERS = [0, 1, 2, 0, 1, 2]  # k mod 3
ROUTED = [0, 1, 1, 0, 2, 2]  # argmax mixtures: cluster 1 and 2 partly merged


def hand_ari(true: list[int], pred: list[int]) -> float:
    """ARI = (index - expected) / (max - expected) over the contingency table, with binomial coefficients."""
    n = len(true)
    table: dict[tuple[int, int], int] = {}
    for t, p in zip(true, pred):
        table[t, p] = table.get((t, p), 0) + 1
    index = sum(math.comb(v, 2) for v in table.values())
    rows = sum(math.comb(true.count(t), 2) for t in set(true))
    cols = sum(math.comb(pred.count(p), 2) for p in set(pred))
    expected = rows * cols / math.comb(n, 2)
    return (index - expected) / ((rows + cols) / 2 - expected)


def validate(module: L.LightningModule, data: FederatedDataModule) -> dict[str, float]:
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.validate(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def per_client_batches(data: FederatedDataModule) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Every client's (prepared) validation samples, regrouped from the mixed evaluation batches."""
    xs: dict[int, list] = {}
    ys: dict[int, list] = {}
    for x, y, ids in data.val_dataloader():
        for k in ids.unique().tolist():
            xs.setdefault(k, []).append(x[ids == k])
            ys.setdefault(k, []).append(y[ids == k])
    return {k: (torch.cat(xs[k]), torch.cat(ys[k])) for k in xs}


def summary(values: dict[int, float], sizes: dict[int, int], worst) -> dict[str, float]:
    total = sum(sizes.values())
    out = {
        "": sum(values[k] * sizes[k] for k in values) / total,
        "_unweighted": sum(values.values()) / len(values),
        "_worst": worst(values.values()),
    }
    for c in set(CLUSTERS):
        members = [k for k in values if CLUSTERS[k] == c]
        out[f"_cluster{c}"] = sum(values[k] * sizes[k] for k in members) / sum(sizes[k] for k in members)
    return out


def test_logged_classification_values_equal_the_hand_computed_ones():
    data = FederatedDataModule(
        RandomImages(num_train=60, num_test=90, shape=(1, 3, 3), num_classes=3, seed=1),
        num_clients=K,
        num_clusters=C,
        cluster_transform="label_shift",
        dirichlet_alpha=0.8,  # unequal test sizes per client: the weighted and plain means differ
        eval_batch_size=7,  # batches span clients
        seed=0,
    )
    torch.manual_seed(0)
    router = RouterOptions(noise="uniform", noise_std=50.0, temperature=T, min_prob=0.05)
    module = FloralModule(MLP(9, [8], 3), num_clients=K, num_adaptors=C, rank=2, alpha=0.6, router=router)
    with torch.no_grad():
        logits = torch.randn(K, C, generator=torch.Generator().manual_seed(3))
        logits[torch.arange(K), ROUTED] += 3.0  # argmax = ROUTED
        module.model.router.logits.copy_(logits)
        for layer in module.model.floral_layers().values():
            layer.adaptor_B.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))
    logged = validate(module, data)

    model = module.model.eval()
    acc, loss, sizes = {}, {}, {}
    with torch.no_grad():
        for k, (x, y) in per_client_batches(data).items():
            e = (logits[k] / T).exp()
            w = (e / e.sum()).clamp_min(0.05)  # no noise at evaluation
            out = model(x, mixture=w)
            acc[k] = (out.argmax(-1) == y).double().mean().item()
            loss[k] = F.cross_entropy(out, y).item()
            sizes[k] = len(y)
    assert len(set(sizes.values())) > 1 and len(set(acc.values())) > 2  # the set-up discriminates

    for suffix, value in summary(acc, sizes, min).items():
        assert logged[f"val/acc{suffix}"] == pytest.approx(value, abs=1e-6), f"val/acc{suffix}"
    for suffix, value in summary(loss, sizes, max).items():  # loss: lower is better, the worst is the max
        assert logged[f"val/loss{suffix}"] == pytest.approx(value, rel=1e-5), f"val/loss{suffix}"

    ari = hand_ari(CLUSTERS, ROUTED)
    assert 0 < ari < 1
    assert logged["val/routing_ari"] == pytest.approx(ari)
    p = torch.softmax(logits / T, -1)
    assert logged["val/router_entropy"] == pytest.approx(-(p * p.log()).sum(-1).mean().item(), rel=1e-5)


def test_logged_regression_worst_is_the_highest_error():
    data = FederatedDataModule(SyntheticLinear(samples_per_client=10), num_clients=4, num_clusters=2, seed=0)
    torch.manual_seed(0)
    module = RegressionModule(nn.Linear(10, 3), num_clients=4, num_adaptors=2, rank=1)
    logged = validate(module, data)
    data.setup("fit")
    mse = {}
    with torch.no_grad():
        for k, (x, y) in per_client_batches(data).items():
            w = torch.softmax(module.model.router.logits[k], -1).clamp_min(0.01)
            mse[k] = (module.model(x, mixture=w) - y).pow(2).mean().item()
    assert logged["val/mse_worst"] == pytest.approx(max(mse.values()), rel=1e-5)
    assert logged["val/mse_unweighted"] == pytest.approx(sum(mse.values()) / 4, rel=1e-5)
    assert max(mse.values()) > 1.5 * min(mse.values())


@pytest.mark.parametrize(
    "true, pred",
    [([0, 0, 1, 1, 2, 2], [0, 1, 1, 0, 2, 2]), ([0, 1, 2, 0, 1, 2], [0, 1, 1, 0, 2, 2]), ([0, 0, 0, 1], [1, 1, 0, 0])],
)
def test_adjusted_rand_index_is_the_pair_counting_definition(true, pred):
    assert adjusted_rand_index(torch.tensor(true), torch.tensor(pred)) == pytest.approx(hand_ari(true, pred))
