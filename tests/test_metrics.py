"""Evaluation summaries, adjusted Rand index and the per-client metric."""

from __future__ import annotations

import torch

from floral_lightning.metrics import PerClientMean, adjusted_rand_index, summarize_clients


def test_adjusted_rand_index_known_values():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(a, a) == 1.0
    assert adjusted_rand_index(a, torch.tensor([5, 5, 3, 3, 9, 9])) == 1.0  # relabelling
    # contingency all ones: index 0, expected 3 * 6 / 15 = 1.2, max 4.5, so (0 - 1.2) / (4.5 - 1.2) = -4/11
    assert abs(adjusted_rand_index(a, torch.tensor([0, 1, 0, 1, 0, 1])) - (-4 / 11)) < 1e-9
    # sklearn's value for this pair is 0.24242424...
    got = adjusted_rand_index(torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert abs(got - 0.24242424242424243) < 1e-9


def test_per_client_mean_and_summary():
    metric = PerClientMean(num_clients=3)
    metric.update(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 2, 2]))
    metric.update(torch.tensor([0.0]), torch.tensor([0]))
    means, counts = metric.compute()
    torch.testing.assert_close(means[[0, 2]], torch.tensor([1 / 3, 1.0], dtype=torch.float64))
    assert torch.isnan(means[1]) and counts.tolist() == [3.0, 0.0, 2.0]
    summary = summarize_clients(means, counts, higher_is_better=True, clusters=torch.tensor([0, 1, 1]))
    assert abs(summary["mean"] - 3 / 5) < 1e-9  # sample-weighted: (1 + 2) / 5
    assert abs(summary["unweighted"] - (1 / 3 + 1) / 2) < 1e-9
    assert abs(summary["worst"] - 1 / 3) < 1e-9
    assert summary["cluster0"] == 1 / 3 and summary["cluster1"] == 1.0
    # spread: population std of the seen clients' means 1/3 and 1 is half their distance
    assert abs(summary["std"] - (1 - 1 / 3) / 2) < 1e-9
    assert summarize_clients(means, counts, higher_is_better=False)["worst"] == 1.0
