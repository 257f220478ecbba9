"""Mutation testing of the core: plant one plausible single-line bug at a time, and check the fast tests fail.

    nice -n 10 python tools/mutate.py                  # every mutant; table on stdout, JSON in tools/mutation.json
    nice -n 10 python tools/mutate.py --only router,loop.sizes      # mutants whose id contains either text
    python tools/mutate.py --list                      # the mutants and whether each still applies, no tests run
    python tools/mutate.py --merge a.json b.json       # combine runs made in pieces (later files win per mutant)

Each mutant is a unique snippet of a core file and its replacement, the bug it plants, and the tests that
should catch it (a targeted selection of fast test files: running the whole suite per mutant would take
hours on a small machine). The repository is copied to a temporary folder (per worker), so the working
tree is never modified, even when the run is interrupted. Outcomes:

- ``killed``: a test failed (or the run timed out, or the mutant broke the import);
- ``survived``: every selected test passed: the tests miss this bug (or the mutant is equivalent);
- ``stale``: the snippet is no longer in the file, or not exactly once (the code moved on: update the
  mutant); stale mutants are reported and left out of the score.

Mutants marked ``equivalent`` change the code without changing any observable behaviour (e.g. a choice
between two exact paths); they are run and reported but left out of the score, with the reason.
The score is ``killed / (killed + survived)`` over the non-equivalent mutants that applied.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: what a worker's copy of the repository needs to run the selected tests
COPIED = ("floral_lightning", "callbacks", "tests", "conf", "pyproject.toml", "train.py")

# The targeted test selections, fastest killers first (pytest stops at the first failure: -x).
LAYERS = ("tests/test_layers_definition.py", "tests/test_conv_layers.py", "tests/test_embedding_norm_layers.py",
          "tests/test_model.py")  # fmt: skip
ROUTER = ("tests/test_router.py", "tests/test_layers_definition.py", "tests/test_evaluation_metrics.py",
          "tests/test_model.py")  # fmt: skip
AGGREGATION = ("tests/test_aggregation.py", "tests/test_round_loop.py")
ROUND_LOOP = ("tests/test_round_loop.py", "tests/test_trainer.py")
METRICS = ("tests/test_metrics.py", "tests/test_evaluation_metrics.py")
MODULE = ("tests/test_round_loop.py", "tests/test_evaluation_metrics.py", "tests/test_trainer.py")
METHODS = ("tests/test_methods.py",)


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``find`` (exactly once in ``file``) becomes ``replace``."""

    id: str
    file: str
    find: str
    replace: str
    bug: str
    tests: tuple[str, ...]
    #: why the mutant cannot be detected (it changes no observable behaviour); None for a real bug
    equivalent: str | None = None


def m(id: str, file: str, find: str, replace: str, bug: str, tests: tuple[str, ...], equivalent: str | None = None):
    return Mutant(id, file, find, replace, bug, tests, equivalent)


BASE, LIN, CONV, EMB, NORM, RANK = (f"floral_lightning/layers/{n}.py" for n in
                                    ("base", "linear", "conv", "embedding", "norm", "rank"))  # fmt: skip
ROUTER_PY, MODEL, AGG, METRICS_PY, MODULE_PY, METHODS_PY, ENSEMBLE, PERSONALIZED = (
    f"floral_lightning/{n}.py"
    for n in ("router", "model", "aggregation", "metrics", "module", "methods", "ensemble", "personalized")
)
LOOP = "callbacks/federated.py"
RUNS_PY, DATA_FED, SEEDING = (
    "floral_lightning/batch_runs.py",
    "floral_lightning/data/federated.py",
    "floral_lightning/seeding.py",
)
ROUTER_INIT, MODULE_PY = "floral_lightning/router_init.py", "floral_lightning/module.py"
VECTORISED_PY, REPORT_PY = "floral_lightning/vectorised.py", "callbacks/run_report.py"
VECTORISED = ("tests/test_vectorised.py",)
BATCH_RUNS = ("tests/test_batch_runs.py",)
ROUTER_INIT_TESTS = ("tests/test_router_init.py",)

MUTANTS: list[Mutant] = [
    # --- layers: alpha, paths, geometry, statistics ----------------------------------------------------------
    m(
        "layers.alpha-ignored-everywhere",
        BASE,
        "self.alpha = float(alpha)",
        "self.alpha = 1.0",
        "alpha ignored on every path of every layer",
        LAYERS,
    ),
    m(
        "layers.auto-merged-is-factorised",
        BASE,
        "return self.forward_one_mixture(x, w)",
        "return self.forward_factorised(x, w.expand(x.shape[0], -1))",
        "auto runs a one-mixture batch on the factorised path (same values, the slow path; tests check the choice)",
        LAYERS,
    ),
    m(
        "layers.runs-mixtures-reversed",
        BASE,
        "zip(x.split(lengths), mixtures)",
        "zip(x.split(lengths), mixtures.flip(0))",
        "each run of one client merged with another run's mixture",
        LAYERS,
    ),
    m(
        "layers.merged-module-bias-sign",
        BASE,
        "merged.bias.add_(db)",
        "merged.bias.sub_(db)",
        "merge() subtracts the adaptor bias",
        LAYERS,
    ),
    m(
        "layers.scale-channels-order",
        BASE,
        "expand(b, groups, c, per_group).reshape(",
        "expand(b, groups, c, per_group).transpose(1, 2).reshape(",
        "per-sample mixture channels in (adaptor, group) order instead of (group, adaptor)",
        LAYERS,
    ),
    m(
        "linear.merged-alpha",
        LIN,
        "a, b = self._stacked(self.alpha * w)",
        "a, b = self._stacked(w)",
        "linear merged path ignores alpha on the weight",
        LAYERS,
    ),
    m(
        "linear.merged-bias-alpha",
        LIN,
        "bias = None if self.adaptor_bias is None else self.alpha * (w @ self.adaptor_bias)",
        "bias = None if self.adaptor_bias is None else w @ self.adaptor_bias",
        "linear merged path ignores alpha on the bias",
        LAYERS,
    ),
    m(
        "linear.factorised-alpha",
        LIN,
        "per_sample(self.alpha * scale_channels(w, self.rank), x)",
        "per_sample(scale_channels(w, self.rank), x)",
        "linear factorised path ignores alpha",
        LAYERS,
    ),
    m(
        "linear.factorised-bias-alpha",
        LIN,
        "out = out + per_sample(self.alpha * (w @ self.adaptor_bias), x)",
        "out = out + per_sample(w @ self.adaptor_bias, x)",
        "linear factorised bias ignores alpha",
        LAYERS,
    ),
    m(
        "linear.naive-alpha",
        LIN,
        "out = out + self.alpha * per_sample(w[:, c : c + 1], x) * delta",
        "out = out + per_sample(w[:, c : c + 1], x) * delta",
        "linear naive path ignores alpha",
        LAYERS,
    ),
    m(
        "linear.stack-without-permute",
        LIN,
        "b.permute(1, 0, 2).reshape(-1, c * r)",
        "b.reshape(-1, c * r)",
        "B factors stacked without the permute (adaptors' rows mixed up)",
        LAYERS,
    ),
    m(
        "linear.bias-init-ones",
        LIN,
        "nn.Parameter(torch.zeros(num_adaptors, d_out, **factory))",
        "nn.Parameter(torch.ones(num_adaptors, d_out, **factory))",
        "adaptor biases start at one (model != base at init)",
        LAYERS,
    ),
    m(
        "linear.bias-flag-ignored",
        LIN,
        "has_bias = bias and base.bias is not None",
        "has_bias = base.bias is not None",
        "bias=False still gives adaptors a bias",
        LAYERS,
    ),
    m(
        "linear.precondition-wrong-gram",
        LIN,
        "torch.linalg.solve(b.transpose(1, 2) @ b + eye, a.grad)",
        "torch.linalg.solve(a @ a.transpose(1, 2) + eye, a.grad)",
        "grad A preconditioned by A's Gram instead of B's",
        LAYERS,
    ),
    m(
        "rank.ceil-budget",
        RANK,
        "math.floor(rank * d_in * d_out / (d_in + d_out))",
        "math.ceil(rank * d_in * d_out / (d_in + d_out))",
        "fractional rank rounded up",
        LAYERS,
    ),
    m(
        "rank.ceil-sqrt",
        RANK,
        "math.floor(math.sqrt(max_rank))",
        "math.ceil(math.sqrt(max_rank))",
        "sqrt rank rounded up",
        LAYERS,
    ),
    m(
        "rank.log-natural",
        RANK,
        "math.floor(math.log2(1 + max_rank))",
        "math.floor(math.log(1 + max_rank))",
        "log rank with the natural log",
        LAYERS,
    ),
    m(
        "rank.no-clip",
        RANK,
        "if r > max_rank:",
        "if r > max_rank + 1:",
        "a rank one above the max is not clipped",
        LAYERS,
    ),
    m(
        "rank.init-bound",
        RANK,
        "bound = math.sqrt(6.0 / fan_in)",
        "bound = math.sqrt(3.0 / fan_in)",
        "He-uniform bound halved in variance",
        LAYERS,
    ),
    m(
        "rank.init-b-not-zero",
        RANK,
        "a.uniform_(-bound, bound)\n            b.zero_()",
        "a.uniform_(-bound, bound)\n            b.uniform_(-bound, bound)",
        "B not zeroed at init (model != base)",
        LAYERS,
    ),
    m(
        "conv.balanced-2d-sides-swapped",
        CONV,
        "return (1, 0)  # height",
        "return (0, 1)  # height",
        "balanced_2d puts height on the first conv and width on the second",
        LAYERS,
    ),
    m(
        "conv.balanced-side-swapped",
        CONV,
        'split = "in" if in_channels <= out_channels else "out"',
        'split = "out" if in_channels <= out_channels else "in"',
        "balanced puts the kernel on the side with more channels",
        LAYERS,
    ),
    m(
        "conv.merged-alpha",
        CONV,
        "b = self.adaptor_B * with_trailing_dims(self.alpha * w, self.adaptor_B.dim() - 1)",
        "b = self.adaptor_B * with_trailing_dims(w, self.adaptor_B.dim() - 1)",
        "conv merged kernel ignores alpha",
        LAYERS,
    ),
    m(
        "conv.merged-bias-alpha",
        CONV,
        "db = None if self.adaptor_bias is None else self.alpha * (w @ self.adaptor_bias)",
        "db = None if self.adaptor_bias is None else w @ self.adaptor_bias",
        "conv merged bias ignores alpha",
        LAYERS,
    ),
    m(
        "conv.factorised-alpha",
        CONV,
        "with_trailing_dims(self.alpha * scale_channels(w, self.rank, g), self.n_dims)",
        "with_trailing_dims(scale_channels(w, self.rank, g), self.n_dims)",
        "conv factorised path ignores alpha",
        LAYERS,
    ),
    m(
        "conv.factorised-bias-alpha",
        CONV,
        "out = out + with_trailing_dims(self.alpha * (w @ self.adaptor_bias), self.n_dims)",
        "out = out + with_trailing_dims(w @ self.adaptor_bias, self.n_dims)",
        "conv factorised bias ignores alpha",
        LAYERS,
    ),
    m(
        "conv.naive-alpha",
        CONV,
        "out = out + self.alpha * with_trailing_dims(w[:, c : c + 1], self.n_dims) * delta",
        "out = out + with_trailing_dims(w[:, c : c + 1], self.n_dims) * delta",
        "conv naive path ignores alpha",
        LAYERS,
    ),
    m(
        "conv.stride-wrong-side",
        CONV,
        "self.stride1 = _on_side(stride, self.sides, 0, 1)",
        "self.stride1 = _on_side(stride, self.sides, 1, 1)",
        "the first conv takes the second conv's strides",
        LAYERS,
    ),
    m(
        "conv.padding-wrong-side",
        CONV,
        "self.padding2 = _on_side(tuple(padding), self.sides, 1, 0)",
        "self.padding2 = _on_side(tuple(padding), self.sides, 0, 0)",
        "the second conv takes the first conv's padding",
        LAYERS,
    ),
    m(
        "conv.dilation-wrong-side",
        CONV,
        "self.dilation1 = _on_side(dilation, self.sides, 0, 1)",
        "self.dilation1 = _on_side(dilation, self.sides, 1, 1)",
        "the first conv takes the second conv's dilation",
        LAYERS,
    ),
    m(
        "conv.output-padding-wrong-side",
        CONV,
        "self.output_padding2 = _on_side(op, self.sides, 1, 0)",
        "self.output_padding2 = _on_side(op, self.sides, 0, 0)",
        "transposed: output padding on the wrong conv",
        LAYERS,
    ),
    m(
        "conv.pre-pad-zeros",
        CONV,
        "return F.pad(x, self._pre_pad, mode=self.base.padding_mode)",
        'return F.pad(x, self._pre_pad, mode="constant")',
        "adaptors zero-pad where the base pads circularly",
        LAYERS,
    ),
    m(
        "conv.stack-grouped-no-transpose",
        CONV,
        "return t.reshape(c, g, m // g, *rest).transpose(0, 1).reshape(c * m, *rest)",
        "return t.reshape(c * m, *rest)",
        "grouped factors stacked in (adaptor, group) order",
        LAYERS,
    ),
    m(
        "conv.precondition-own-gram",
        CONV,
        "a.grad.div_(with_trailing_dims(gram_norm(b, g) + eps, a.dim() - 1))",
        "a.grad.div_(with_trailing_dims(gram_norm(a, g) + eps, a.dim() - 1))",
        "grad A divided by A's own Gram norm",
        LAYERS,
    ),
    m(
        "conv.gram-norm-groups-summed",
        BASE,
        "torch.linalg.matrix_norm(gram).pow(2).sum(1).sqrt()",
        "torch.linalg.matrix_norm(gram).sum(1)",
        "grouped Gram norm: block norms summed, not root-sum-squared",
        LAYERS,
    ),
    m(
        "conv.same-pad-swapped",
        CONV,
        "for p in (total // 2, total - total // 2))",
        "for p in (total - total // 2, total // 2))",
        "'same' with a non-'zeros' mode: an even kernel's extra padding before, not after",
        LAYERS,
    ),
    m(
        "conv.runs-never-merged",
        CONV,
        "merge_runs_from = 4.0",
        "merge_runs_from = None",
        "eval runs of one client take the factorised path (same values, the slow path; tests check the choice)",
        LAYERS,
    ),
    m(
        "embedding.merged-table-alpha",
        EMB,
        "reshape(n, c * r) * (self.alpha * w).repeat_interleave(r)",
        "reshape(n, c * r) * w.repeat_interleave(r)",
        "embedding merged table ignores alpha",
        LAYERS,
    ),
    m(
        "embedding.merged-lookup-alpha",
        EMB,
        "h = self._lookup(x) * (self.alpha * w).repeat_interleave(self.rank)",
        "h = self._lookup(x) * w.repeat_interleave(self.rank)",
        "embedding merged lookup ignores alpha",
        LAYERS,
    ),
    m(
        "embedding.factorised-alpha",
        EMB,
        "h = h * per_sample(self.alpha * scale_channels(w, self.rank), h)",
        "h = h * per_sample(scale_channels(w, self.rank), h)",
        "embedding factorised path ignores alpha",
        LAYERS,
    ),
    m(
        "embedding.padding-not-masked",
        EMB,
        "return h if pad is None else h * (x != pad).unsqueeze(-1).to(h.dtype)",
        "return h",
        "adaptors contribute at padding positions",
        LAYERS,
    ),
    m(
        "embedding.table-padding-row-kept",
        EMB,
        "keep[pad] = 0",
        "keep[pad] = 1",
        "the merged table adds the adaptors to the padding row",
        LAYERS,
    ),
    m(
        "embedding.lookup-offsets",
        EMB,
        "offsets = torch.arange(c, device=x.device) * n",
        "offsets = torch.arange(c, device=x.device) * r",
        "stacked lookup reads the wrong adaptor's rows",
        LAYERS,
    ),
    m(
        "norm.mixed-affine-alpha",
        NORM,
        "g = (self.alpha * w) @ self.adaptor_weight.flatten(1)",
        "g = w @ self.adaptor_weight.flatten(1)",
        "norm adaptor scale ignores alpha",
        LAYERS,
    ),
    m(
        "norm.running-rsqrt",
        NORM,
        "(self.adaptor_running_var + self.base.eps).rsqrt()",
        "(self.adaptor_running_var + self.base.eps).sqrt()",
        "eval: multiplies by the std instead of dividing",
        LAYERS,
    ),
    m(
        "norm.running-shift-sign",
        NORM,
        "shift = self.adaptor_bias - self.adaptor_running_mean * scale",
        "shift = self.adaptor_bias + self.adaptor_running_mean * scale",
        "eval: the running mean added, not subtracted",
        LAYERS,
    ),
    m(
        "norm.merged-fold-sign",
        NORM,
        "b = t + s * base.running_mean",
        "b = t - s * base.running_mean",
        "merged eval fold: the base mean term with the wrong sign",
        LAYERS,
    ),
    m(
        "norm.stats-biased-var",
        NORM,
        "var, mean = torch.var_mean(x, dim=dims, correction=1)",
        "var, mean = torch.var_mean(x, dim=dims, correction=0)",
        "adaptor running variance biased (BatchNorm's is not)",
        LAYERS,
    ),
    m(
        "norm.stats-momentum-swapped",
        NORM,
        "rm.copy_(f * mean.to(rm.dtype) + (1 - f) * rm)",
        "rm.copy_((1 - f) * mean.to(rm.dtype) + f * rm)",
        "running mean update with the momentum the wrong way round",
        LAYERS,
    ),
    m(
        "norm.cumulative-average-off-by-one",
        NORM,
        "f = (1.0 / self.adaptor_num_batches_tracked.to(rm.dtype)).unsqueeze(1)",
        "f = (1.0 / (self.adaptor_num_batches_tracked.to(rm.dtype) + 1)).unsqueeze(1)",
        "momentum=None cumulative average off by one batch",
        LAYERS,
    ),
    m(
        "norm.naive-alpha",
        NORM,
        "out = out + self.alpha * weight * y",
        "out = out + weight * y",
        "norm naive path ignores alpha",
        LAYERS,
    ),
    m(
        "norm.no-affine-base-scale",
        NORM,
        "weight = 1.0 + g if base.weight is None else base.weight + g",
        "weight = g if base.weight is None else base.weight + g",
        "affine-free base: its unit scale dropped",
        LAYERS,
    ),
    m(
        "norm.input-stats-in-eval",
        NORM,
        "return not self.tracks or self.base.training",
        "return not self.tracks",
        "training mode uses the running statistics",
        LAYERS,
    ),
    m(
        "norm.running-var-init-zero",
        NORM,
        '"adaptor_running_var", torch.ones(',
        '"adaptor_running_var", torch.zeros(',
        "adaptor running variances start at zero",
        LAYERS,
    ),
    m(
        "model.client-runs-last-row",
        MODEL,
        "mixture[lengths.cumsum(0) - lengths]",
        "mixture[lengths.cumsum(0) - 1]",
        "each run's mixture taken from its last row instead of its first",
        LAYERS,
        equivalent="runs are only used without noise (eval mode), where every row of a run is the same mixture",
    ),
    m(
        "model.mixture-of-noisy",
        MODEL,
        "self.router.eval()\n        try:",
        "self.router.train()\n        try:",
        "mixture_of (merge, checkpoints) draws training noise",
        ROUTER,
    ),
    m(
        "model.roles-wrapped-base-as-adaptor",
        MODEL,
        "elif name.startswith(adaptor_prefixes) and not _is_under_wrapped_base(name, adaptor_prefixes):",
        "elif name.startswith(adaptor_prefixes):",
        "a wrapped layer's base weight gets the adaptor role",
        LAYERS,
    ),
    # --- router --------------------------------------------------------------------------------------------------
    m(
        "router.temperature-ignored",
        ROUTER_PY,
        "theta = theta / self.temperature\n",
        "theta = theta\n",
        "the router temperature ignored",
        ROUTER,
    ),
    m(
        "router.noise-on-at-evaluation",
        ROUTER_PY,
        'return self.training and self.noise != "none" and self.noise_std > 0',
        'return self.noise != "none" and self.noise_std > 0',
        "router noise left on at evaluation",
        ROUTER,
    ),
    m(
        "router.top-k-keeps-smallest",
        ROUTER_PY,
        "w.topk(self.top_k, dim=-1).indices",
        "w.topk(self.top_k, dim=-1, largest=False).indices",
        "top-k keeps the smallest weights",
        ROUTER,
    ),
    m(
        "router.noise-kinds-swapped",
        ROUTER_PY,
        'torch.rand_like if self.noise == "uniform" else torch.randn_like',
        'torch.randn_like if self.noise == "uniform" else torch.rand_like',
        "uniform and gaussian noise swapped",
        ROUTER,
    ),
    m(
        "router.noise-std-ignored",
        ROUTER_PY,
        "theta = theta + (noise if self.noise_std == 1.0 else self.noise_std * noise)",
        "theta = theta + noise",
        "noise_std ignored",
        ROUTER,
    ),
    m(
        "router.floor-renormalised",
        ROUTER_PY,
        "w = w.clamp_min(self.min_prob)\n",
        "w = w.clamp_min(self.min_prob)\n            w = w / w.sum(-1, keepdim=True)\n",
        "floored mixture renormalised (the reference does not)",
        ROUTER,
    ),
    m("router.floor-ignored", ROUTER_PY, "if self.min_prob > 0:", "if self.min_prob > 1:", "min_prob ignored", ROUTER),
    m(
        "router.top-k-all-kept-boundary",
        ROUTER_PY,
        "self.top_k < self.num_adaptors:",
        "self.top_k <= self.num_adaptors:",
        "top-k also applied when k = C",
        ROUTER,
        equivalent="keeping the C largest of C weights keeps them all",
    ),
    m(
        "router.probabilities-with-temperature",
        ROUTER_PY,
        "return F.softmax(theta.detach(), dim=-1)",
        "return F.softmax(theta.detach() / self.temperature, dim=-1)",
        "p(c|k) divided by the temperature",
        ROUTER,
    ),
    m(
        "router.entropy-sign",
        ROUTER_PY,
        "return -(log_p.exp() * log_p).sum(-1).mean()",
        "return (log_p.exp() * log_p).sum(-1).mean()",
        "entropy with the wrong sign (penalty smooths)",
        ROUTER,
    ),
    m(
        "router.entropy-temperature",
        ROUTER_PY,
        "F.log_softmax(theta / self.temperature, dim=-1)",
        "F.log_softmax(theta, dim=-1)",
        "entropy ignores the temperature",
        ROUTER,
    ),
    m(
        "router.oracle-soft",
        ROUTER_PY,
        "self.logits.fill_(-100.0)",
        "self.logits.fill_(-1.0)",
        "oracle logits only mildly one-hot",
        ROUTER + ("tests/test_trainer.py",),
    ),
    m(
        "router.oracle-not-frozen",
        ROUTER_PY,
        "self.logits.requires_grad_(False)",
        "self.logits.requires_grad_(True)",
        "oracle logits keep training",
        ROUTER + ("tests/test_trainer.py",),
    ),
    # --- aggregation ---------------------------------------------------------------------------------------------
    m(
        "aggregation.p-k-unweighted",
        AGG,
        "[state[k] for k in self._shared], alpha=n)",
        "[state[k] for k in self._shared], alpha=1.0)",
        "shared tensors summed without n_k",
        AGGREGATION,
    ),
    m(
        "aggregation.shared-total-counts-clients",
        AGG,
        "self._shared_total += n",
        "self._shared_total += 1",
        "shared average divided by the number of clients",
        AGGREGATION,
    ),
    m(
        "aggregation.p-k-given-c-ignores-n",
        AGG,
        "joint = n * torch.softmax(logits.detach().float(), dim=-1)",
        "joint = torch.softmax(logits.detach().float(), dim=-1)",
        "p(k|c) ignores the client sizes",
        AGGREGATION,
    ),
    m(
        "aggregation.p-k-given-c-ignores-mixture",
        AGG,
        "joint = n * torch.softmax(logits.detach().float(), dim=-1)",
        "joint = n * torch.ones_like(logits.detach().float())",
        "adaptors averaged with p(k), not p(k|c)",
        AGGREGATION,
    ),
    m(
        "aggregation.integer-buffers-summed",
        AGG,
        "else torch.maximum(self._max[k], state[k])",
        "else self._max[k] + state[k]",
        "integer buffers (num_batches_tracked) summed",
        AGGREGATION,
    ),
    m(
        "aggregation.shared-mean-by-clients",
        AGG,
        "out = {k: self._sums[k] / self._shared_total for k in self._shared}",
        "out = {k: self._sums[k] / self.num_clients for k in self._shared}",
        "shared sums divided by the client count",
        AGGREGATION,
    ),
    m(
        "aggregation.no-fallback",
        AGG,
        "out[k] = torch.where(total > 0, avg, fallback[k])",
        "out[k] = avg",
        "an adaptor no client weighted becomes zero instead of keeping its value",
        AGGREGATION,
    ),
    m(
        "aggregation.client-weights-normalised-over-c",
        AGG,
        "return p_k, joint / joint.sum(0, keepdim=True)",
        "return p_k, joint / joint.sum(1, keepdim=True)",
        "client_weights normalises p(k|c) over adaptors",
        AGGREGATION,
    ),
    m(
        "aggregation.client-weights-uniform-p-k",
        AGG,
        "p_k = n / n.sum()",
        "p_k = torch.ones_like(n) / len(n)",
        "client_weights: p(k) uniform",
        AGGREGATION,
    ),
    m(
        "server.plain-average-ignores-adaptor-lr",
        AGG,
        "self.lr == 1.0 and self.adaptor_lr == 1.0 and self.momentum == 0.0",
        "self.lr == 1.0 and self.momentum == 0.0",
        "server lr 1 skips the optimizer even when the adaptor lr is not 1",
        AGGREGATION,
    ),
    m(
        "server.pseudo-gradient-sign",
        AGG,
        "global_state[name].grad = global_state[name] - averages[name]",
        "global_state[name].grad = averages[name] - global_state[name]",
        "server steps away from the average",
        AGGREGATION,
    ),
    m(
        "server.adaptor-lr-ignored",
        AGG,
        '("adaptor", self.adaptor_lr)',
        '("adaptor", self.lr)',
        "the server adaptor lr ignored",
        AGGREGATION,
    ),
    m(
        "server.momentum-ignored",
        AGG,
        "torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum)",
        "torch.optim.SGD(groups, lr=self.lr)",
        "FedAvgM without momentum",
        AGGREGATION,
    ),
    m(
        "server.adam-betas-ignored",
        AGG,
        "torch.optim.Adam(groups, lr=self.lr, betas=self.betas, eps=self.eps)",
        "torch.optim.Adam(groups, lr=self.lr, eps=self.eps)",
        "FedAdam ignores its betas",
        AGGREGATION,
    ),
    m(
        "server.adam-eps-ignored",
        AGG,
        "torch.optim.Adam(groups, lr=self.lr, betas=self.betas, eps=self.eps)",
        "torch.optim.Adam(groups, lr=self.lr, betas=self.betas)",
        "FedAdam ignores its epsilon",
        AGGREGATION,
    ),
    m(
        "server.buffers-optimised",
        AGG,
        "if n in trainable and global_state[n].is_floating_point()",
        "if global_state[n].is_floating_point()",
        "buffers (norm statistics) go through the server optimizer",
        AGGREGATION,
    ),
    m(
        "server.adaptor-lr-default-one",
        AGG,
        "self.adaptor_lr = lr if adaptor_lr is None else adaptor_lr",
        "self.adaptor_lr = 1.0 if adaptor_lr is None else adaptor_lr",
        "the adaptor lr defaults to 1, not the base lr",
        AGGREGATION,
    ),
    # --- the round loop ------------------------------------------------------------------------------------------
    m(
        "loop.optimizer-state-not-reset",
        LOOP,
        "optimizer.state.clear()",
        "pass",
        "the client optimizer state not reset between clients",
        ROUND_LOOP,
    ),
    m(
        "loop.client-starts-from-previous-client",
        LOOP,
        "foreach.copy_([state[n] for n in self._global], list(self._global.values()))\n        for optimizer",
        "pass\n        for optimizer",
        "a client starts from the previous client's weights, not the global ones",
        ROUND_LOOP,
    ),
    m(
        "loop.global-not-loaded-after-round",
        LOOP,
        "foreach.copy_([state[n] for n in self._global], list(self._global.values()))\n        pl_module.log",
        "pass\n        pl_module.log",
        "after a round the model keeps the last client's weights",
        ROUND_LOOP,
    ),
    m(
        "loop.sizes-ignored",
        LOOP,
        "pl_module.federated_state(), int(self._train_sizes[k]), pl_module.client_logits(k)",
        "pl_module.federated_state(), 1, pl_module.client_logits(k)",
        "every client weighs the same in the average",
        ROUND_LOOP,
    ),
    m(
        "loop.wrong-clients-logits",
        LOOP,
        "pl_module.federated_state(), int(self._train_sizes[k]), pl_module.client_logits(k)",
        "pl_module.federated_state(), int(self._train_sizes[k]), pl_module.client_logits(0)",
        "p(c|k) taken from client 0's logits",
        ROUND_LOOP,
    ),
    m(
        "loop.fraction-floored",
        LOOP,
        "count = max(1, round(clients_per_round * num_clients))",
        "count = max(1, int(clients_per_round * num_clients))",
        "a fraction of clients rounded down",
        ROUND_LOOP,
    ),
    m(
        "loop.same-sample-every-round",
        LOOP,
        "seeded_generator(seed, Stream.SETUP, round_idx)",
        "seeded_generator(seed, Stream.SETUP, 0)",
        "the same clients sampled every round",
        ROUND_LOOP,
    ),
    m(
        "loop.local-seed-ignores-round",
        LOOP,
        "seed_local_training(self.seed, self.round, client_id)",
        "seed_local_training(self.seed, 0, client_id)",
        "a client's router noise and dropout repeat every round",
        ROUND_LOOP + ("tests/test_seeding.py",),
    ),
    m(
        "loop.local-epochs-ignored",
        LOOP,
        "self._loader.local_epochs = self.local_epochs",
        "self._loader.local_epochs = 1",
        "local_epochs ignored",
        ROUND_LOOP,
    ),
    m(
        "loop.round-not-advanced",
        LOOP,
        "self.round += 1",
        "self.round += 0",
        "the round counter never advances (same sample, wrong resume)",
        ROUND_LOOP,
    ),
    m(
        "loop.buffers-trainable",
        LOOP,
        "{n for n, t in state.items() if isinstance(t, torch.nn.Parameter)}",
        "set(state)",
        "buffers handed to the server optimizer as parameters",
        ROUND_LOOP + AGGREGATION,
    ),
    # --- the module: client optimizer, evaluation logging -------------------------------------------------------
    m(
        "module.adaptor-lr-ignored",
        MODULE_PY,
        '"lr": opt.adaptor_lr or opt.lr}',
        '"lr": opt.lr}',
        "the client adaptor lr ignored",
        MODULE,
    ),
    m(
        "module.router-weight-decay",
        MODULE_PY,
        'groups[-1]["weight_decay"] = 0.0',
        'groups[-1]["weight_decay"] = opt.weight_decay',
        "weight decay on the router (unsampled clients' mixtures decay)",
        MODULE,
    ),
    m(
        "module.adam-is-sgd",
        MODULE_PY,
        "return torch.optim.Adam(groups, lr=opt.lr, weight_decay=opt.weight_decay)",
        "return torch.optim.SGD(groups, lr=opt.lr, weight_decay=opt.weight_decay)",
        "optimizer.name=adam trains with SGD",
        MODULE,
    ),
    m(
        "module.momentum-ignored",
        MODULE_PY,
        "torch.optim.SGD(groups, lr=opt.lr, momentum=opt.momentum, weight_decay",
        "torch.optim.SGD(groups, lr=opt.lr, weight_decay",
        "client momentum ignored",
        MODULE,
    ),
    m(
        "module.always-precondition",
        MODULE_PY,
        "if self.precondition:",
        "if True:",
        "gradients preconditioned even with precondition=false",
        MODULE,
    ),
    m(
        "module.routing-ari-argmin",
        MODULE_PY,
        "mixtures.argmax(-1).cpu()",
        "mixtures.argmin(-1).cpu()",
        "the logged routing ARI uses the argmin mixture",
        MODULE,
    ),
    m(
        "module.worst-direction-fixed",
        MODULE_PY,
        "higher_is_better=name in self.higher_is_better",
        "higher_is_better=True",
        "every metric's worst client is its minimum (loss, MSE too)",
        MODULE,
    ),
    m(
        "module.entropy-max",
        MODULE_PY,
        "mixtures.clamp_min(1e-12).log()).sum(-1).mean()",
        "mixtures.clamp_min(1e-12).log()).sum(-1).max()",
        "logged router entropy is the max, not the mean",
        MODULE,
    ),
    m(
        "module.mixtures-without-temperature",
        PERSONALIZED,
        "torch.softmax(self.router.logits.detach() / self.router.temperature, dim=-1)",
        "torch.softmax(self.router.logits.detach(), dim=-1)",
        "reported mixtures ignore the temperature",
        MODULE,
    ),
    m(
        "module.entropy-penalty-subtracted",
        MODULE_PY,
        "loss = loss + penalty",
        "loss = loss - penalty",
        "the entropy penalty enters the loss with the wrong sign",
        ("tests/test_module.py", *MODULE),
    ),
    # --- metrics -------------------------------------------------------------------------------------------------
    m(
        "metrics.worst-direction",
        METRICS_PY,
        "float(m.min() if higher_is_better else m.max())",
        "float(m.max() if higher_is_better else m.min())",
        "the worst client is the best one",
        METRICS,
    ),
    m(
        "metrics.mean-unweighted",
        METRICS_PY,
        '"mean": float((m * n).sum() / n.sum()),',
        '"mean": float(m.mean()),',
        "the paper's number not weighted by samples",
        METRICS,
    ),
    m(
        "metrics.unweighted-weighted",
        METRICS_PY,
        '"unweighted": float(m.mean()),',
        '"unweighted": float((m * n).sum() / n.sum()),',
        "the unweighted mean weighted by samples",
        METRICS,
    ),
    m(
        "metrics.cluster-unweighted",
        METRICS_PY,
        "float((m[mask] * n[mask]).sum() / n[mask].sum())",
        "float(m[mask].mean())",
        "per-cluster means not weighted by samples",
        METRICS,
    ),
    m(
        "metrics.unseen-clients-counted",
        METRICS_PY,
        "seen = counts > 0",
        "seen = counts >= 0",
        "clients without samples enter the summaries",
        METRICS,
    ),
    m(
        "metrics.ari-expected-pairs",
        METRICS_PY,
        "rows * cols / (n * (n - 1) / 2)",
        "rows * cols / (n * (n - 1))",
        "ARI expected index with the wrong number of pairs",
        METRICS,
    ),
    m(
        "metrics.ari-max-index",
        METRICS_PY,
        "maximum = (rows + cols) / 2",
        "maximum = max(rows, cols)",
        "ARI maximum index wrong",
        METRICS,
    ),
    m(
        "metrics.ari-pairs",
        METRICS_PY,
        "return (x * (x - 1) / 2).sum()",
        "return (x * x / 2).sum()",
        "pairs counted with self-pairs",
        METRICS,
    ),
    m(
        "metrics.per-client-values-misplaced",
        METRICS_PY,
        "self.total.index_add_(0, client_ids, values)",
        "self.total.index_add_(0, client_ids.flip(0), values)",
        "a batch's scores credited to the wrong clients",
        METRICS,
    ),
    # --- methods -------------------------------------------------------------------------------------------------
    m(
        "methods.local-adaptor-not-loaded",
        METHODS_PY,
        "self.client_states.load(client_id, self.private_tensors())\n\n    def on_client_end",
        "pass\n\n    def on_client_end",
        "Local Adaptor: a client trains the previous client's adaptor",
        METHODS,
    ),
    m(
        "methods.local-adaptor-averaged",
        METHODS_PY,
        "return {n: t for n, t in super().federated_state().items() if n not in private}",
        "return dict(super().federated_state())",
        "Local Adaptor: the private adaptor is averaged",
        METHODS,
    ),
    m(
        "methods.local-adaptor-router-trains",
        METHODS_PY,
        "self.model.router.logits.requires_grad_(False)",
        "self.model.router.logits.requires_grad_(True)",
        "Local Adaptor: the one-adaptor router trains (its mixture stays 1; a test checks it is frozen)",
        METHODS,
    ),
    m(
        "methods.fedprox-half-missing",
        METHODS_PY,
        "return 0.5 * self.mu * squared_distance(",
        "return self.mu * squared_distance(",
        "FedProx term without the 1/2",
        METHODS,
    ),
    m(
        "methods.fedprox-anchor-live",
        MODULE_PY,
        "self._client_start = {n: t.detach().clone() for n, t",
        "self._client_start = {n: t for n, t",
        "a local penalty (FedProx's) anchored to the live weights (term always 0)",
        METHODS,
    ),
    m(
        "methods.ditto-lam-half-missing",
        METHODS_PY,
        "personal_loss + 0.5 * self.lam * sum(",
        "personal_loss + self.lam * sum(",
        "Ditto's pull without the 1/2",
        METHODS,
    ),
    m(
        "methods.ditto-wrong-personal-model",
        METHODS_PY,
        "functional_call(self.personal, self.client_states.client(client_id), (x,))",
        "functional_call(self.personal, self.client_states.client(0), (x,))",
        "Ditto evaluates every client with client 0's personal model",
        METHODS,
    ),
    m(
        "methods.per-client-outputs-misplaced",
        METHODS_PY,
        "out.index_copy_(0, idx, part)",
        "out.index_copy_(0, idx.flip(0), part)",
        "per-client outputs put back in the wrong order",
        METHODS,
    ),
    m(
        "methods.finetune-lr-ignored",
        METHODS_PY,
        "lr = self.finetune_lr if self.finetune_lr is not None else opt.lr",
        "lr = opt.lr",
        "fine-tuning ignores finetune_lr",
        METHODS,
    ),
    m(
        "methods.finetune-one-epoch",
        METHODS_PY,
        "range(self.finetune_epochs if n else 0)",
        "range(1 if n else 0)",
        "fine-tuning always one epoch",
        METHODS,
    ),
    m(
        "ensemble.one-mixture-mean",
        ENSEMBLE,
        'return torch.einsum("c...,c->...", outs, mixture.to(outs.dtype))',
        "return outs.mean(0)",
        "Ensemble ignores a client's mixture (plain mean of the members)",
        METHODS,
    ),
    m(
        "ensemble.per-sample-mixture-reversed",
        ENSEMBLE,
        'torch.einsum("cb...,bc->b...", outs, mixture.to(outs.dtype))',
        'torch.einsum("cb...,bc->b...", outs, mixture.flip(0).to(outs.dtype))',
        "Ensemble evaluation: each sample mixed with another sample's mixture",
        METHODS,
    ),
    # several local batches in one Lightning step (federated.lightning_step), the seeding, the clustered start
    m(
        "runs.no-precondition",
        RUNS_PY,
        "        pl_module.on_before_optimizer_step(optimizer)\n",
        "",
        "earlier batches of a run skip the module's on_before_optimizer_step (FLoRAL's preconditioning)",
        BATCH_RUNS,
    ),
    m(
        "runs.no-zero-grad",
        RUNS_PY,
        "        optimizer.zero_grad()\n",
        "",
        "earlier batches of a run accumulate gradients across steps",
        BATCH_RUNS,
    ),
    m(
        "runs.no-client-switch",
        LOOP,
        "        if client_id == self._active_client:\n            return",
        "        if self._active_client is not None and client_id != self._active_client:\n            return",
        "a round in one Lightning step trains every client on as the first one",
        BATCH_RUNS,
    ),
    m(
        "runs.client-groups-whole-round",
        DATA_FED,
        'if pending and per == "client" and',
        'if pending and per == "none" and',
        "per-client runs hold the whole round",
        BATCH_RUNS,
    ),
    m(
        "seeding.cpu-unseeded",
        SEEDING,
        "    torch.default_generator.manual_seed(seed)\n",
        "",
        "the per-client seed leaves the CPU generator as it was (router noise depends on who trained before)",
        ("tests/test_seeding.py", "tests/test_batch_runs.py"),
    ),
    m(
        "router_init.first-gradient-only",
        ROUTER_INIT,
        "for step in range(local_steps):",
        "for step in range(1):",
        "a client's update is its first gradient whatever local_steps",
        ROUTER_INIT_TESTS,
    ),
    m(
        "router_init.module-overwrites-set-logits",
        MODULE_PY,
        " or bool(router.logits.detach().any()):",
        ":",
        "router.init=clustered overwrites logits a callback or the user already set",
        ROUTER_INIT_TESTS,
    ),
    m(
        "router_init.logit-ignored",
        ROUTER_INIT,
        "], float(logit))",
        "], 1.0)",
        "the assigned adaptor's logit is 1 whatever logit says",
        ROUTER_INIT_TESTS,
    ),
    m(
        "router_init.kmeans-centres-unnormalised",
        ROUTER_INIT,
        "weights[:, c] = members.to(gram.dtype) / norm.clamp_min(1e-12)",
        "weights[:, c] = members.to(gram.dtype)",
        "k-means centres are the sums of their rows, not the normalised sums (big groups attract)",
        ROUTER_INIT_TESTS,
    ),
    # --- the vectorised round (federated.vectorise) ------------------------------------------------------------
    m(
        "vectorised.local-penalty-dropped",
        VECTORISED_PY,
        "local = None if start is None else self.module.local_penalty(params, start)",
        "local = None",
        "the vectorised round leaves out the module's local penalty (FedProx trains as FedAvg)",
        VECTORISED,
    ),
    m(
        "vectorised.local-penalty-not-logged",
        VECTORISED_PY,
        "penalty_sum += local.detach().sum() * rows",
        "penalty_sum += 0 * rows",
        "the vectorised round logs train/local_penalty as 0",
        VECTORISED,
    ),
    m(
        "vectorised.no-precondition",
        VECTORISED_PY,
        "self._precondition(leaves, grads)",
        "pass",
        "the vectorised round skips FLoRAL's preconditioning",
        VECTORISED,
    ),
    m(
        "vectorised.momentum-unused",
        VECTORISED_PY,
        'g = state[n]["momentum_buffer"].mul_(group["momentum"]).add_(g)',
        'state[n]["momentum_buffer"].mul_(group["momentum"]).add_(g)',
        "the vectorised SGD step keeps a momentum buffer but steps with the plain gradient",
        VECTORISED,
    ),
    m(
        "vectorised.noise-shared",
        VECTORISED_PY,
        "stream_seed(self.seed, Stream.LOCAL_TRAINING, round_idx, k)",
        "stream_seed(self.seed, Stream.LOCAL_TRAINING, round_idx, 0)",
        "every client of a vectorised round draws client 0's router noise",
        VECTORISED,
    ),
    m(
        "vectorised.router-frozen",
        VECTORISED_PY,
        'trained["router"] = theta',
        "pass",
        "the vectorised round does not train the router rows",
        VECTORISED,
    ),
    # --- the run report ---------------------------------------------------------------------------------------
    m(
        "report.figure-every-evaluation",
        REPORT_PY,
        "return every is None or round_idx % every == 0 or last",
        "return True",
        "report.figure_every_n_rounds is ignored (the figure is drawn at every evaluation)",
        ("tests/test_run_report.py::test_the_figure_is_drawn_for_a_logger_at_the_rounds_asked_for",),
    ),
]


@dataclass
class Outcome:
    id: str
    module: str
    status: str  # killed | survived | equivalent (survived, as expected) | stale | not-run
    seconds: float
    bug: str
    detail: str = ""
    equivalent: str | None = None
    tests: list[str] = field(default_factory=list)


def copy_repo(into: Path) -> Path:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, into / name)
    return into


def pytest_args(tests: tuple[str, ...]) -> list[str]:
    return ["-x", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests]


#: imported once by the runner, so that each forked test run starts warm (importing torch and Lightning costs
#: seconds per run); the package under test is never imported here, each child imports its mutated copy
WARM_IMPORTS = ("numpy", "torch", "torchmetrics", "lightning", "hypothesis", "pytest")


def run_tests(workdir: Path, tests: tuple[str, ...], timeout: float) -> tuple[bool, str, bool]:
    """(passed, last output line, timed out) of the selected tests in ``workdir``, run by pytest in a forked
    child of this process (a fresh interpreter where ``fork`` is missing)."""
    log = workdir / ".mutate-output.txt"
    env = {"PYTHONPATH": str(workdir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["FLORAL_DATA_DIR"] = os.environ.get("FLORAL_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    if not hasattr(os, "fork"):
        command = [sys.executable, "-m", "pytest", *pytest_args(tests)]
        try:
            result = subprocess.run(command, cwd=workdir, env=os.environ | env, capture_output=True, text=True,
                                    timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:.0f} s", True
        log.write_text(result.stdout + result.stderr)
        returncode = result.returncode
    else:
        pid = os.fork()
        if pid == 0:  # the child: pytest on the mutated copy, output to the log, exit with pytest's code
            code = 3
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.chdir(workdir)
                os.environ.update(env)
                sys.path.insert(0, str(workdir))
                import pytest

                code = int(pytest.main(pytest_args(tests)))
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return False, f"timed out after {timeout:.0f} s", True
            time.sleep(0.1)
        returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return returncode == 0, (failed or lines or [""])[-1][:200], False


def module_of(mutant: Mutant) -> str:
    return mutant.id.split(".")[0]


def applies(mutant: Mutant) -> str | None:
    """None when the mutant applies to the current source, else why it is stale."""
    text = (ROOT / mutant.file).read_text()
    count = text.count(mutant.find)
    if count != 1:
        return f"snippet found {count} times in {mutant.file}"
    return None


def run_mutant(mutant: Mutant, workdir: Path, timeout: float) -> Outcome:
    outcome = Outcome(mutant.id, module_of(mutant), "", 0.0, mutant.bug, equivalent=mutant.equivalent,
                      tests=list(mutant.tests))  # fmt: skip
    path = workdir / mutant.file
    original = path.read_text()
    if original.count(mutant.find) != 1:
        outcome.status, outcome.detail = "stale", f"snippet found {original.count(mutant.find)} times"
        return outcome
    start = time.perf_counter()
    try:
        path.write_text(original.replace(mutant.find, mutant.replace))
        passed, detail, timed_out = run_tests(workdir, mutant.tests, timeout)
    finally:
        path.write_text(original)
    outcome.seconds = round(time.perf_counter() - start, 1)
    outcome.detail = detail
    if passed:
        outcome.status = "equivalent" if mutant.equivalent else "survived"
    else:
        outcome.status = "killed"
    return outcome


def baseline(workdir: Path, selections: list[tuple[str, ...]]) -> float:
    """Every selected test file must pass unmutated (one run over their union); returns its time."""
    files = tuple(dict.fromkeys(f for tests in selections for f in tests))
    start = time.perf_counter()
    passed, detail, _ = run_tests(workdir, files, timeout=1800)
    if not passed:
        raise SystemExit(f"the unmutated tests fail ({' '.join(files)}): {detail}")
    return time.perf_counter() - start


def score(outcomes: list[Outcome]) -> dict[str, dict]:
    """killed / (killed + survived) per module and overall (equivalent and stale mutants left out)."""
    table: dict[str, dict] = {}
    for o in outcomes:
        for key in (o.module, "all"):
            row = table.setdefault(key, {"killed": 0, "survived": 0, "equivalent": 0, "stale": 0, "not-run": 0})
            row[o.status] += 1
    for row in table.values():
        scored = row["killed"] + row["survived"]
        row["score"] = round(100.0 * row["killed"] / scored, 1) if scored else None
    return table


def write_json_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(args: argparse.Namespace) -> str:
    return "nice -n 10 python tools/mutate.py" + (f" --only {args.only}" if args.only else "")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def report(outcomes: list[Outcome]) -> dict[str, dict]:
    """Print the per-mutant and per-module tables; return the scores."""
    scores = score(outcomes)
    print(f"| {'mutant':50s} | status     | seconds | bug |")
    print(f"|{'-' * 52}|------------|--------:|-----|")
    for o in outcomes:
        print(f"| {o.id:50s} | {o.status:10s} | {o.seconds:7.1f} | {o.bug} |")
    print()
    print("| module | killed | survived | equivalent | stale | not run | score |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in sorted(scores.items(), key=lambda item: item[0] == "all"):  # the total last
        s = "-" if row["score"] is None else f"{row['score']:.1f} %"
        counts = " | ".join(str(row[k]) for k in ("killed", "survived", "equivalent", "stale", "not-run"))
        print(f"| {name} | {counts} | {s} |")
    for o in outcomes:
        if o.status == "survived":
            print(f"SURVIVED {o.id}: {o.bug}")
    return scores


def merge(paths: list[str], out: Path) -> int:
    """One JSON from several partial runs: each mutant's outcome from the last file that ran it."""
    order = {mu.id: i for i, mu in enumerate(MUTANTS)}
    by_id: dict[str, Outcome] = {}
    runs: list[dict] = []
    machine = ""
    for path in paths:
        if path.endswith(".log"):  # the progress lines of an interrupted run: "status seconds id"
            runs.append({"command": f"an interrupted run, outcomes read from its progress log {Path(path).name}"})
            for line in Path(path).read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[2] in order and parts[1].endswith("s"):
                    mu = MUTANTS[order[parts[2]]]
                    by_id[mu.id] = Outcome(mu.id, module_of(mu), parts[0], float(parts[1][:-1]), mu.bug,
                                           equivalent=mu.equivalent, tests=list(mu.tests))  # fmt: skip
            continue
        data = json.loads(Path(path).read_text())
        runs += data.get("runs", [])
        machine = data.get("machine", machine)
        for o in data["mutants"]:
            if o["id"] in order:
                by_id[o["id"]] = Outcome(**o)
    for mu in MUTANTS:
        if mu.id not in by_id:
            by_id[mu.id] = Outcome(mu.id, module_of(mu), "not-run", 0.0, mu.bug, "in none of the merged runs",
                                   mu.equivalent, list(mu.tests))  # fmt: skip
    outcomes = sorted(by_id.values(), key=lambda o: order[o.id])
    scores = report(outcomes)
    write_json_atomically(
        out, {"machine": machine, "runs": runs, "scores": scores, "mutants": [asdict(o) for o in outcomes]}
    )
    print(f"\nwrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run the mutants whose id contains one of these (comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the mutants and whether they apply; run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run side by side (each in its own copy)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per mutant (default: 2x baseline + 60)")
    parser.add_argument("--out", default=str(ROOT / "tools" / "mutation.json"), help="where the JSON goes")
    parser.add_argument("--merge", nargs="+", default=None, help="combine these JSON outputs into --out; run nothing")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))

    ids = [mu.id for mu in MUTANTS]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise SystemExit(f"duplicate mutant ids: {duplicates}")
    patterns = None if args.only is None else [p for p in args.only.split(",") if p]
    chosen = [mu for mu in MUTANTS if patterns is None or any(p in mu.id for p in patterns)]
    if not chosen:
        raise SystemExit(f"--only {args.only!r} matches no mutant id")
    if args.list:
        for mu in chosen:
            stale = applies(mu)
            flag = f"STALE ({stale})" if stale else ("equivalent" if mu.equivalent else "ok")
            print(f"{mu.id:50s} {flag:12s} {mu.bug}")
        return 0

    started, commit, date = time.perf_counter(), git_commit(), now()  # what the copy is taken from
    if hasattr(os, "fork"):
        for name in WARM_IMPORTS:
            importlib.import_module(name)
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        workdirs = [copy_repo(Path(tmp) / f"w{j}") for j in range(max(1, args.jobs))]
        runnable = [mu for mu in chosen if applies(mu) is None]
        seconds = baseline(workdirs[0], [mu.tests for mu in runnable])
        print(f"baseline: the selected tests pass unmutated ({seconds:.0f} s)", flush=True)
        outcomes: list[Outcome] = []
        for mu in chosen:
            reason = applies(mu)
            if reason is not None:
                outcomes.append(Outcome(mu.id, module_of(mu), "stale", 0.0, mu.bug, reason, mu.equivalent))
        free = list(workdirs)

        def work(mu: Mutant) -> Outcome:
            workdir = free.pop()
            try:
                timeout = args.timeout or 2 * seconds + 60
                return run_mutant(mu, workdir, timeout)
            finally:
                free.append(workdir)

        with ThreadPoolExecutor(max_workers=len(workdirs)) as pool:
            for outcome in pool.map(work, runnable):
                outcomes.append(outcome)
                print(f"{outcome.status:10s} {outcome.seconds:6.1f}s  {outcome.id}", flush=True)

    order = {mu.id: i for i, mu in enumerate(MUTANTS)}
    runs = [{"command": command_line(args), "commit": commit, "date": date, "mutants": len(outcomes)}]
    out = Path(args.out)
    outcomes.sort(key=lambda o: order[o.id])
    print()
    scores = report(outcomes)
    runs[-1]["seconds"] = round(time.perf_counter() - started, 1)
    write_json_atomically(
        out,
        {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, jobs={args.jobs}",
            "runs": runs,
            "scores": scores,
            "mutants": [asdict(o) for o in outcomes],
        },
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
