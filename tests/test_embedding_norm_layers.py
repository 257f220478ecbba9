"""FloralEmbedding / FloralNorm: identity at init, agreement of the three paths (forward, gradients, running
statistics), merging, adaptor tensor layout, and the embedding's padding_idx / max_norm / sparse semantics."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from floral_lightning.layers import FloralEmbedding, FloralNorm

SETTINGS = settings(max_examples=20, deadline=None)
PATHS = ("merged", "factorised", "naive")


# --- helpers ---------------------------------------------------------------------------------------------
def adaptor_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {**dict(layer.named_parameters()), **dict(layer.named_buffers())}
    return {n: t for n, t in tensors.items() if not n.startswith("base.")}


def randomise_(module: nn.Module, adaptors_only: bool = False) -> None:
    """Random parameters, and random running statistics (variance > 0) for norms."""
    with torch.no_grad():
        for name, t in {**dict(module.named_parameters()), **dict(module.named_buffers())}.items():
            if adaptors_only and name.startswith("base."):
                continue
            if "running_var" in name:
                t.uniform_(0.5, 2.0)
            elif "num_batches_tracked" in name:
                t.copy_(torch.randint_like(t, 0, 5))
            elif t.is_floating_point():
                t.normal_()


def run(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, path: str, proj: torch.Tensor):
    """Forward ``layer`` (a copy) on one path; returns output, gradients (incl. the mixture's) and buffers."""
    layer = copy.deepcopy(layer)
    layer.path = path
    mix = w.clone().requires_grad_(True)
    out = layer(x, mixture=mix)
    (out * proj).sum().backward()
    grads = {n: p.grad.to_dense() for n, p in layer.named_parameters() if p.grad is not None}
    grads["mixture"] = mix.grad
    return out.detach(), grads, {n: b.clone() for n, b in layer.named_buffers()}


def assert_paths_agree(layer, x, w, paths):
    proj = torch.randn(run(layer, x, w, paths[0], 1.0)[0].shape, dtype=torch.float64)
    results = {p: run(layer, x, w, p, proj) for p in paths}
    ref_out, ref_grads, ref_bufs = results["naive"]
    for path in paths:
        out, grads, bufs = results[path]
        torch.testing.assert_close(out, ref_out, msg=f"{path}: output")
        assert grads.keys() == ref_grads.keys(), path
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], msg=f"{path}: grad of {name}")
        for name in ref_bufs:
            torch.testing.assert_close(bufs[name], ref_bufs[name], msg=f"{path}: buffer {name}")


# --- norms -------------------------------------------------------------------------------------------------
@st.composite
def norm_configs(draw) -> dict:
    """A small norm layer of any supported kind with random options, and an input shape for it."""
    kind = draw(st.sampled_from(["bn1d_flat", "bn1d", "bn2d", "bn3d", "in1d", "in2d", "in3d", "ln", "gn"]))
    batch = draw(st.integers(2, 4))
    feats = draw(st.integers(1, 4))
    spatial_dims = {"bn1d_flat": 0, "bn1d": 1, "bn2d": 2, "bn3d": 3, "in1d": 1, "in2d": 2, "in3d": 3}
    momentum = draw(st.sampled_from([0.1, 0.5, None]))
    if kind in spatial_dims:
        n = spatial_dims[kind]
        # instance norm in training needs more than one value per instance
        spatial = [draw(st.integers(2 if i == 0 and kind.startswith("in") else 1, 3)) for i in range(n)]
        kwargs = dict(affine=draw(st.booleans()), track_running_stats=draw(st.booleans()), momentum=momentum)
        cls = {
            "bn1d_flat": nn.BatchNorm1d,
            "bn1d": nn.BatchNorm1d,
            "bn2d": nn.BatchNorm2d,
            "bn3d": nn.BatchNorm3d,
            "in1d": nn.InstanceNorm1d,
            "in2d": nn.InstanceNorm2d,
            "in3d": nn.InstanceNorm3d,
        }[kind]
        module = cls(feats, **kwargs)
        shape = (batch, feats, *spatial)
    elif kind == "ln":
        shape = (batch, *[draw(st.integers(1, 3)) for _ in range(draw(st.integers(1, 3)))])
        normalized = shape[len(shape) - draw(st.integers(1, len(shape) - 1)) :]
        affine = draw(st.booleans())
        module = nn.LayerNorm(normalized, elementwise_affine=affine, bias=draw(st.booleans()) if affine else True)
    else:
        groups = draw(st.integers(1, 3))
        channels = groups * draw(st.integers(1, 2))
        module = nn.GroupNorm(groups, channels, affine=draw(st.booleans()))
        shape = (batch, channels, *[draw(st.integers(1, 3)) for _ in range(draw(st.integers(0, 2)))])
    return dict(
        module=module,
        shape=shape,
        num_adaptors=draw(st.integers(1, 3)),
        alpha=draw(st.sampled_from([1.0, 0.5])),
        train=draw(st.booleans()),
    )


def make_norm(cfg, dtype=torch.float32, randomise_base=True) -> FloralNorm:
    base = copy.deepcopy(cfg["module"]).to(dtype)
    if randomise_base:
        randomise_(base)
    # (a norm without parameters or buffers has no dtype to take: convert the wrapper as a whole)
    return FloralNorm(base, cfg["num_adaptors"], alpha=cfg["alpha"]).to(dtype).train(cfg["train"])


@SETTINGS
@given(cfg=norm_configs())
def test_norm_init_equals_base_exactly(cfg):
    torch.manual_seed(0)
    layer = make_norm(cfg)
    x = torch.randn(cfg["shape"])
    c, b = cfg["num_adaptors"], cfg["shape"][0]
    for mixture in (torch.rand(c), torch.rand(b, c)):
        for path in ("auto", "naive"):
            wrapped = copy.deepcopy(layer)
            wrapped.path = path
            base = copy.deepcopy(layer.base)
            assert torch.equal(wrapped(x, mixture=mixture), base(x))
            for (name, ours), theirs in zip(wrapped.base.named_buffers(), base.buffers()):
                assert torch.equal(ours, theirs), name


@SETTINGS
@given(cfg=norm_configs())
def test_norm_paths_agree(cfg):
    """Outputs, gradients (base, adaptors, mixture) and running statistics after the step agree."""
    torch.manual_seed(0)
    layer = make_norm(cfg, torch.float64)
    randomise_(layer, adaptors_only=True)
    x = torch.randn(cfg["shape"], dtype=torch.float64)
    c, b = cfg["num_adaptors"], cfg["shape"][0]
    assert_paths_agree(layer, x, torch.rand(c, dtype=torch.float64), PATHS)
    assert_paths_agree(layer, x, torch.rand(b, c, dtype=torch.float64), ("factorised", "naive"))


@SETTINGS
@given(cfg=norm_configs())
def test_norm_merged_module_equals_wrapper_in_eval(cfg):
    torch.manual_seed(0)
    layer = make_norm(cfg, torch.float64)
    randomise_(layer, adaptors_only=True)
    layer.eval()
    x = torch.randn(cfg["shape"], dtype=torch.float64)
    w = torch.rand(cfg["num_adaptors"], dtype=torch.float64)
    merged = layer.merged_module(w).eval()
    assert type(merged) is type(layer.base)
    with torch.no_grad():
        expected = layer(x, mixture=w)
        torch.testing.assert_close(merged(x), expected)
        torch.testing.assert_close(layer(x, mixture=w.expand(x.shape[0], -1)), expected)
        layer.path = "naive"
        torch.testing.assert_close(layer(x, mixture=w), expected)


@SETTINGS
@given(cfg=norm_configs())
def test_norm_adaptor_tensors_have_leading_dim_c(cfg):
    layer = make_norm(cfg)
    tensors = adaptor_tensors(layer)
    c = cfg["num_adaptors"]
    assert {"adaptor_weight", "adaptor_bias"} <= tensors.keys()
    stats = {"adaptor_running_mean", "adaptor_running_var", "adaptor_num_batches_tracked"}
    tracks = getattr(layer.base, "track_running_stats", False)
    assert (stats <= tensors.keys()) == tracks and (stats & tensors.keys()) <= (stats if tracks else set())
    for name, t in tensors.items():
        assert t.shape[0] == c, name
    assert layer.adaptor_weight.shape[1:] == tuple(layer.affine_shape)
    if tracks:
        assert layer.adaptor_num_batches_tracked.dtype == torch.long
        assert torch.equal(layer.adaptor_running_var, torch.ones(c, layer.base.num_features))


def test_norm_running_stats_follow_the_base_rules():
    """Training updates every adaptor's statistics with the batch's (cumulative average for momentum=None),
    as a fresh copy of the base would; eval then normalises each adaptor with its own."""
    torch.manual_seed(0)
    for momentum in (0.3, None):
        base = nn.BatchNorm2d(3, momentum=momentum)
        layer = FloralNorm(copy.deepcopy(base), 2).train()
        fresh = copy.deepcopy(base).train()
        for _ in range(3):
            x = torch.randn(4, 3, 2, 2) * 3 + 1
            layer(x, mixture=torch.tensor([0.3, 0.7]))
            fresh(x)
        for c in range(2):
            torch.testing.assert_close(layer.adaptor_running_mean[c], fresh.running_mean)
            torch.testing.assert_close(layer.adaptor_running_var[c], fresh.running_var)
        assert layer.adaptor_num_batches_tracked.tolist() == [3, 3]
        assert layer.base.num_batches_tracked.item() == 3
    # instance norm: momentum None means no update, and num_batches_tracked never moves (as in torch)
    layer = FloralNorm(nn.InstanceNorm1d(3, momentum=None, track_running_stats=True), 2).train()
    layer(torch.randn(4, 3, 5), mixture=torch.tensor([0.5, 0.5]))
    assert torch.equal(layer.adaptor_running_mean, torch.zeros(2, 3))
    assert torch.equal(layer.adaptor_num_batches_tracked, torch.zeros(2, dtype=torch.long))


def test_norm_eval_uses_each_adaptors_own_statistics():
    torch.manual_seed(0)
    layer = FloralNorm(nn.BatchNorm1d(3), 2, alpha=0.5).eval()
    randomise_(layer, adaptors_only=True)
    x = torch.randn(5, 3)
    w = torch.tensor([0.2, 0.9])
    expected = layer.base(x)
    for c in range(2):
        rm, rv = layer.adaptor_running_mean[c], layer.adaptor_running_var[c]
        norm_c = (x - rm) / torch.sqrt(rv + layer.base.eps) * layer.adaptor_weight[c] + layer.adaptor_bias[c]
        expected = expected + 0.5 * w[c] * norm_c
    torch.testing.assert_close(layer(x, mixture=w), expected)


def test_norm_unbatched_instance_input_and_errors():
    torch.manual_seed(0)
    layer = FloralNorm(nn.InstanceNorm1d(3, affine=True), 2)
    randomise_(layer, adaptors_only=True)
    x = torch.randn(3, 5)
    w = torch.tensor([0.4, 0.6])
    torch.testing.assert_close(layer(x, mixture=w), layer(x[None], mixture=w)[0])
    with pytest.raises(ValueError, match="unbatched"):
        layer(x, mixture=w[None].expand(3, -1))
    with pytest.raises(ValueError, match=r"InstanceNorm1d: expected 2D or 3D input \(got 4D input\)"):
        layer(torch.randn(2, 3, 4, 5), mixture=w)
    with pytest.raises(ValueError, match=r"BatchNorm2d: expected 4D input \(got 3D input\)"):
        FloralNorm(nn.BatchNorm2d(3), 2)(torch.randn(2, 3, 4), mixture=w)
    with pytest.raises(TypeError, match="uninitialised"):
        FloralNorm(nn.LazyBatchNorm1d(), 2)
    # no factors: preconditioning leaves the gradients alone
    layer(torch.randn(2, 3, 4), mixture=w).sum().backward()
    before = layer.adaptor_weight.grad.clone()
    layer.precondition_gradients_()
    assert torch.equal(layer.adaptor_weight.grad, before)


def test_norm_merged_module_creates_missing_affine():
    torch.manual_seed(0)
    for base in (
        nn.LayerNorm(4, elementwise_affine=False),
        nn.GroupNorm(2, 4, affine=False),
        nn.BatchNorm1d(4, affine=False),
    ):
        layer = FloralNorm(base, 2).eval()
        randomise_(layer, adaptors_only=True)
        merged = layer.merged_module(torch.tensor([0.3, 0.6])).eval()
        assert merged.weight is not None and merged.bias is not None
        assert base.weight is None  # the wrapper's base is untouched
        x = torch.randn(3, 2, 4) if isinstance(base, nn.LayerNorm) else torch.randn(3, 4, 2)
        torch.testing.assert_close(merged(x), layer(x, mixture=torch.tensor([0.3, 0.6])))


# --- embeddings --------------------------------------------------------------------------------------------
@st.composite
def embedding_configs(draw) -> dict:
    num = draw(st.integers(1, 12))
    padding_idx = draw(st.one_of(st.none(), st.integers(-num, num - 1)))
    sgbf = draw(st.booleans())
    kwargs = dict(
        padding_idx=padding_idx,
        max_norm=draw(st.sampled_from([None, 1.0, 3.0])),
        norm_type=draw(st.sampled_from([2.0, 1.0])),
        scale_grad_by_freq=sgbf,
        sparse=not sgbf and draw(st.booleans()),  # torch has no sparse gradients scaled by frequency
    )
    # index shapes both below and above num_embeddings, so both merged forms (table and lookup) are drawn
    shape = (draw(st.integers(1, 4)), *[draw(st.integers(1, 5)) for _ in range(draw(st.integers(0, 2)))])
    return dict(
        num=num,
        dim=draw(st.integers(1, 6)),
        kwargs=kwargs,
        shape=shape,
        rank=draw(st.integers(1, 4)),
        num_adaptors=draw(st.integers(1, 3)),
        alpha=draw(st.sampled_from([1.0, 0.5])),
        train=draw(st.booleans()),
    )


def make_embedding(cfg, dtype=torch.float32) -> FloralEmbedding:
    base = nn.Embedding(cfg["num"], cfg["dim"], **cfg["kwargs"]).to(dtype)
    rank = min(cfg["rank"], cfg["num"], cfg["dim"])
    return FloralEmbedding(base, cfg["num_adaptors"], rank=rank, alpha=cfg["alpha"]).train(cfg["train"])


@SETTINGS
@given(cfg=embedding_configs())
def test_embedding_init_equals_base_exactly(cfg):
    torch.manual_seed(0)
    layer = make_embedding(cfg)
    with torch.no_grad():
        layer.base.weight.mul_(2)  # so that max_norm renormalises some rows
    x = torch.randint(0, cfg["num"], cfg["shape"])
    c = cfg["num_adaptors"]
    for mixture in (torch.rand(c), torch.rand(x.shape[0], c)):
        for path in ("auto", "naive"):
            wrapped = copy.deepcopy(layer)
            wrapped.path = path
            base = copy.deepcopy(layer.base)
            assert torch.equal(wrapped(x, mixture=mixture), base(x))
            assert torch.equal(wrapped.base.weight, base.weight)  # same in-place max_norm renormalisation


@SETTINGS
@given(cfg=embedding_configs())
def test_embedding_paths_agree(cfg):
    torch.manual_seed(0)
    layer = make_embedding(cfg, torch.float64)
    randomise_(layer)
    x = torch.randint(0, cfg["num"], cfg["shape"])
    c = cfg["num_adaptors"]
    assert_paths_agree(layer, x, torch.rand(c, dtype=torch.float64), PATHS)
    assert_paths_agree(layer, x, torch.rand(x.shape[0], c, dtype=torch.float64), ("factorised", "naive"))


@pytest.mark.parametrize("size", [3, 40])  # fewer indices than rows: lookup form; more: merged into the table
def test_embedding_both_merged_forms_agree_with_naive(size):
    torch.manual_seed(0)
    layer = FloralEmbedding(nn.Embedding(10, 5, padding_idx=2).double(), 3, rank=2, alpha=0.7)
    randomise_(layer)
    x = torch.randint(0, 10, (size,))
    x[0] = 2
    assert layer._use_table(x) == (size >= 10)
    assert_paths_agree(layer, x, torch.rand(3, dtype=torch.float64), ("merged", "naive"))


@SETTINGS
@given(cfg=embedding_configs())
def test_embedding_merged_module_equals_wrapper(cfg):
    torch.manual_seed(0)
    layer = make_embedding(cfg, torch.float64).eval()
    randomise_(layer)
    x = torch.randint(0, cfg["num"], cfg["shape"])
    w = torch.rand(cfg["num_adaptors"], dtype=torch.float64)
    merged = layer.merged_module(w)
    assert type(merged) is nn.Embedding and merged.max_norm is None
    assert merged.padding_idx == layer.base.padding_idx
    with torch.no_grad():
        torch.testing.assert_close(merged(x), layer(x, mixture=w))


@SETTINGS
@given(cfg=embedding_configs())
def test_embedding_adaptor_tensors_have_leading_dim_c(cfg):
    layer = make_embedding(cfg)
    tensors = adaptor_tensors(layer)
    c, r = cfg["num_adaptors"], layer.rank
    assert tensors.keys() == {"adaptor_A", "adaptor_B"}
    assert layer.adaptor_A.shape == (c, cfg["num"], r)
    assert layer.adaptor_B.shape == (c, cfg["dim"], r)
    assert torch.equal(layer.adaptor_B, torch.zeros_like(layer.adaptor_B))


def test_embedding_padding_positions_output_the_base_padding_vector():
    """Adaptors contribute nothing at padding positions and get no gradient from them."""
    torch.manual_seed(0)
    layer = FloralEmbedding(nn.Embedding(6, 4, padding_idx=1), 2, rank=2)
    assert torch.equal(layer.adaptor_A[:, 1], torch.zeros(2, 2))  # the padding row starts at zero
    randomise_(layer)  # ... and is masked even when it is not
    x = torch.tensor([[1, 3, 1, 0], [1, 1, 1, 1]])
    for path in PATHS:
        layer.path = path
        layer.zero_grad()
        w = torch.tensor([0.4, 0.9]) if path == "merged" else torch.rand(2, 2)
        out = layer(x, mixture=w)
        assert torch.equal(out[x == 1], layer.base.weight[1].expand(6, 4)), path
        assert not torch.equal(out[0, 1], layer.base.weight[3])
        out[1].sum().backward()  # only padding positions
        assert torch.count_nonzero(layer.adaptor_A.grad) == 0, path
        assert torch.count_nonzero(layer.adaptor_B.grad) == 0, path
        assert torch.count_nonzero(layer.base.weight.grad) == 0, path


def test_embedding_max_norm_constrains_the_base_table_only():
    torch.manual_seed(0)
    base = nn.Embedding(5, 3, max_norm=1.0)
    with torch.no_grad():
        base.weight.mul_(10)
    layer = FloralEmbedding(base, 2, rank=2)
    with torch.no_grad():
        layer.adaptor_B.normal_()
    x = torch.tensor([0, 2])
    w = torch.tensor([0.5, 0.5])
    merged = layer.merged_module(w)  # renormalises every row of its copy, not the wrapper's table
    assert (base.weight.norm(dim=1) > 1.0).all()
    out = layer(x, mixture=w)
    norms = base.weight.norm(dim=1)
    assert (norms[x] <= 1.0).all() and (norms[[1, 3, 4]] > 1.0).all()  # looked-up rows renormalised in place
    torch.testing.assert_close(out, base.weight[x] + layer.delta_weight(w)[x])
    assert (out.norm(dim=1) > 1.0).any()  # the adaptor delta is not norm-constrained
    torch.testing.assert_close(merged(x), out)


def test_embedding_sparse_base_gradient_and_preconditioning():
    torch.manual_seed(0)
    layer = FloralEmbedding(nn.Embedding(7, 4, sparse=True), 2, rank=3)
    randomise_(layer)
    layer(torch.tensor([[0, 5, 5]]), mixture=torch.tensor([0.3, 0.7])).pow(2).sum().backward()
    assert layer.base.weight.grad.is_sparse and not layer.adaptor_A.grad.is_sparse
    a, b = layer.adaptor_A.detach(), layer.adaptor_B.detach()
    ga, gb = layer.adaptor_A.grad.clone(), layer.adaptor_B.grad.clone()
    layer.precondition_gradients_(eps=1e-5)
    for c in range(2):
        gram_b = torch.linalg.matrix_norm(b[c].T @ b[c])
        gram_a = torch.linalg.matrix_norm(a[c].T @ a[c])
        torch.testing.assert_close(layer.adaptor_A.grad[c], ga[c] / (gram_b + 1e-5))
        torch.testing.assert_close(layer.adaptor_B.grad[c], gb[c] / (gram_a + 1e-5))


def test_embedding_rank_and_init():
    layer = FloralEmbedding(nn.Embedding(100, 20), 3, rank=0.1)
    assert layer.rank == int(0.1 * 100 * 20 / 120)
    assert abs(layer.adaptor_A.std().item() - 1.0) < 0.1
