"""FloralConv / FloralConvTranspose: identity at init, exact agreement of the three paths, merging, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from floral_lightning.layers.conv import CONV_SPLITS, FloralConv, FloralConvTranspose, kernel_sides
from floral_lightning.layers.rank import INIT_STRATEGIES

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
# torch warns that even kernels with padding="same" copy the input; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def conv_configs(draw) -> dict:
    """A small conv or transposed conv with random geometry, an input for it and a wrapper config."""
    transposed = draw(st.booleans())
    n = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2]))
    depthwise = draw(st.booleans())
    in_channels = groups if depthwise else groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    kwargs = dict(kernel_size=kernel, stride=stride, dilation=dilation, groups=groups, bias=draw(st.booleans()))
    if transposed:
        kwargs["padding"] = tuple(draw(st.integers(0, 2)) for _ in range(n))
        kwargs["output_padding"] = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
    else:
        choices = ["ints", "valid"] + (["same"] if all(s == 1 for s in stride) else [])
        mode = draw(st.sampled_from(choices))
        kwargs["padding"] = tuple(draw(st.integers(0, 2)) for _ in range(n)) if mode == "ints" else mode
    size = tuple(draw(st.integers(1, 5)) + (0 if transposed else d * (k - 1)) for k, d in zip(kernel, dilation))
    if transposed:  # the output must be non-empty
        for i in range(n):
            out = (size[i] - 1) * stride[i] - 2 * kwargs["padding"][i] + dilation[i] * (kernel[i] - 1)
            assume(out + kwargs["output_padding"][i] + 1 > 0)
    cls = (CONV_TRANSPOSES if transposed else CONVS)[n]
    return dict(
        cls=cls,
        in_channels=in_channels,
        out_channels=out_channels,
        kwargs=kwargs,
        input_shape=(2, in_channels, *size),
        split=draw(st.sampled_from(CONV_SPLITS)),
        num_adaptors=draw(st.integers(1, 3)),
        rank=groups * draw(st.integers(1, 2)),
        adaptor_bias=draw(st.booleans()),
        alpha=draw(st.sampled_from([1.0, 0.5])),
        seed=draw(st.integers(0, 2**16)),
    )


def build(cfg: dict, dtype=torch.float64, init: str = "uniform_in") -> tuple[FloralConv, torch.Tensor]:
    torch.manual_seed(cfg["seed"])
    base = cfg["cls"](cfg["in_channels"], cfg["out_channels"], **cfg["kwargs"]).to(dtype)
    wrapper_cls = FloralConvTranspose if cfg["cls"] in CONV_TRANSPOSES.values() else FloralConv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rank clipping is expected for tiny layers
        layer = wrapper_cls(
            base,
            cfg["num_adaptors"],
            rank=cfg["rank"],
            split=cfg["split"],
            init=init,
            bias=cfg["adaptor_bias"],
            alpha=cfg["alpha"],
        )
    return layer, torch.randn(cfg["input_shape"], dtype=dtype)


def randomise_(layer: FloralConv) -> None:
    with torch.no_grad():
        for p in (layer.adaptor_A, layer.adaptor_B, layer.adaptor_bias):
            if p is not None:
                p.normal_()
        if layer.base.bias is not None:
            layer.base.bias.normal_()


def run_path(layer: FloralConv, path: str, x: torch.Tensor, w: torch.Tensor, grad_out: torch.Tensor | None):
    """Output and gradients (base weight/bias, adaptor tensors, mixture) of one path."""
    layer.path = path
    w = w.detach().clone().requires_grad_(True)
    out = layer(x, mixture=w)
    if grad_out is None:
        return out, None
    params = [layer.base.weight, layer.base.bias, layer.adaptor_A, layer.adaptor_B, layer.adaptor_bias, w]
    params = [p for p in params if p is not None]
    return out, torch.autograd.grad(out, params, grad_out)


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * scale)


def brute_force_kernel(layer: FloralConv, c: int) -> torch.Tensor:
    """Adaptor c's composed kernel by broadcasting (materialises o*q*i*k: tiny layers only)."""
    g = layer.base.groups
    a, b = layer.adaptor_A[c], layer.adaptor_B[c]
    q = layer.rank // g
    blocks = []
    for j in range(g):
        if layer.transposed:  # a [in, q, k1], b [r, out/g, k2] -> [in/g, out/g, k]
            aj = a[j * a.shape[0] // g : (j + 1) * a.shape[0] // g]
            bj = b[j * q : (j + 1) * q]
            blocks.append((aj[:, :, None] * bj[None, :, :]).sum(1))
        else:  # a [r, in/g, k1], b [out, q, k2] -> [out/g, in/g, k]
            aj = a[j * q : (j + 1) * q]
            bj = b[j * b.shape[0] // g : (j + 1) * b.shape[0] // g]
            blocks.append((bj[:, :, None] * aj[None, :, :]).sum(1))
    return torch.cat(blocks)


# --- identity at init ---------------------------------------------------------------------------------------


@SETTINGS
@given(cfg=conv_configs(), init=st.sampled_from(INIT_STRATEGIES))
def test_init_equals_base_exactly(cfg, init):
    layer, x = build(cfg, dtype=torch.float32, init=init)
    expected = layer.base(x)
    c = cfg["num_adaptors"]
    w = torch.rand(c)
    for path, mixture in [("auto", w), ("merged", w), ("factorised", torch.rand(2, c)), ("naive", w)]:
        layer.path = path
        assert torch.equal(layer(x, mixture=mixture), expected), path
    assert torch.equal(layer.merged_module(w)(x), expected)


# --- the three paths agree, forward and backward -------------------------------------------------------------


@SETTINGS
@given(cfg=conv_configs())
def test_paths_agree_with_one_mixture(cfg):
    layer, x = build(cfg)
    randomise_(layer)
    w = torch.rand(cfg["num_adaptors"], dtype=x.dtype)
    ref_out, _ = run_path(layer, "naive", x, w, None)
    grad_out = torch.randn_like(ref_out)
    ref_out, ref_grads = run_path(layer, "naive", x, w, grad_out)
    for path in ("merged", "factorised"):
        out, grads = run_path(layer, path, x, w, grad_out)
        assert_close(out, ref_out)
        for g, ref in zip(grads, ref_grads):
            assert_close(g, ref)
    # merged_module folds the same mixture into a plain copy of the base
    merged = layer.merged_module(w)
    assert type(merged) is type(layer.base)
    assert_close(merged(x), ref_out)
    # the einsum composition equals the brute-force kernel composition
    dw, db = layer.delta_weight(w)
    brute = sum(layer.alpha * w[c] * brute_force_kernel(layer, c) for c in range(cfg["num_adaptors"]))
    assert_close(dw, brute)
    assert dw.shape == layer.base.weight.shape
    assert (db is None) == (layer.adaptor_bias is None)


@SETTINGS
@given(cfg=conv_configs())
def test_factorised_matches_naive_per_sample(cfg):
    layer, x = build(cfg)
    randomise_(layer)
    w = torch.rand(x.shape[0], cfg["num_adaptors"], dtype=x.dtype)
    ref_out, _ = run_path(layer, "naive", x, w, None)
    grad_out = torch.randn_like(ref_out)
    ref_out, ref_grads = run_path(layer, "naive", x, w, grad_out)
    out, grads = run_path(layer, "factorised", x, w, grad_out)
    assert_close(out, ref_out)
    for g, ref in zip(grads, ref_grads):
        assert_close(g, ref)
    # each sample gets its own mixture: sample i equals the merged layer of mixture w[i]
    for i in range(x.shape[0]):
        assert_close(out[i : i + 1], layer.merged_module(w[i])(x[i : i + 1]))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("split", CONV_SPLITS)
def test_padding_modes_are_exact(mode, split):
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), padding_mode=mode).double()
    layer = FloralConv(base, 2, rank=2, split=split)
    x = torch.randn(2, 4, 7, 8, dtype=torch.float64)
    w = torch.rand(2, dtype=torch.float64)
    assert torch.equal(layer(x, mixture=w), base(x))
    randomise_(layer)
    ref, _ = run_path(layer, "naive", x, w, None)
    for path in ("merged", "factorised"):
        assert_close(run_path(layer, path, x, w, None)[0], ref)
    assert_close(layer.merged_module(w)(x), ref)
    # the definition: base plus the mixed adaptors, each composed into a full kernel with the base's geometry
    delta = sum(w[c] * brute_force_kernel(layer, c) for c in range(2))
    bias = base.bias + w @ layer.adaptor_bias
    assert_close(base._conv_forward(x, base.weight + delta, bias), ref)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_same_padding_asymmetric_1d(mode):
    torch.manual_seed(0)
    # even kernel and dilation 3: 'same' pads 4 before and 5 after; a non-'zeros' mode pads the input first
    base = nn.Conv1d(3, 4, 4, padding="same", dilation=3, padding_mode=mode).double()
    layer = FloralConv(base, 2, rank=2, split="out")
    randomise_(layer)
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    w = torch.rand(2, dtype=torch.float64)
    ref, _ = run_path(layer, "naive", x, w, None)
    assert ref.shape == (2, 4, 11)
    assert_close(run_path(layer, "merged", x, w, None)[0], ref)
    assert_close(run_path(layer, "factorised", x, w, None)[0], ref)
    delta = sum(w[c] * brute_force_kernel(layer, c) for c in range(2))
    assert_close(base._conv_forward(x, base.weight + delta, base.bias + w @ layer.adaptor_bias), ref)


# --- splits, shapes and ranks -------------------------------------------------------------------------------


def test_kernel_sides():
    assert kernel_sides("balanced_2d", 2, 3, 8) == (1, 0)
    assert kernel_sides("balanced_2d", 1, 3, 8) == (0,)  # falls back to balanced: fewer channels on the input
    assert kernel_sides("balanced_2d", 3, 8, 3) == (1, 1, 1)
    assert kernel_sides("balanced", 2, 8, 8) == (0, 0)
    assert kernel_sides("in", 3, 8, 3) == (0, 0, 0)
    assert kernel_sides("out", 2, 3, 8) == (1, 1)


def test_balanced_2d_shapes_and_rank():
    layer = FloralConv(nn.Conv2d(16, 32, (3, 5)), 4, rank="full")
    # d_in = 16 * 5 (width on the first conv), d_out = 32 * 3 (height on the second)
    assert layer.rank == 80
    assert layer.adaptor_A.shape == (4, 80, 16, 1, 5)
    assert layer.adaptor_B.shape == (4, 32, 80, 3, 1)
    assert layer.adaptor_bias.shape == (4, 32)
    layer = FloralConv(nn.Conv2d(16, 32, 3), 2, rank="full", split="in")
    assert layer.rank == 32  # min(16 * 9, 32)
    assert layer.adaptor_A.shape == (2, 32, 16, 3, 3) and layer.adaptor_B.shape == (2, 32, 32, 1, 1)
    layer = FloralConv(nn.Conv2d(16, 32, 3, bias=False), 2, rank=0.5, split="out")
    d_in, d_out = 16, 32 * 9
    assert layer.rank == math.floor(0.5 * d_in * d_out / (d_in + d_out))
    assert layer.adaptor_bias is None


def test_grouped_ranks_are_multiples_of_groups():
    layer = FloralConv(nn.Conv2d(8, 8, 3, groups=4), 2, rank="full", split="in")
    assert layer.rank == 8  # per group min(2 * 9, 2) = 2, times 4 groups
    assert layer.adaptor_A.shape == (2, 8, 2, 3, 3) and layer.adaptor_B.shape == (2, 8, 2, 1, 1)
    depthwise = FloralConv(nn.Conv2d(6, 6, 3, groups=6), 1, rank=0.9)
    assert depthwise.rank % 6 == 0 and depthwise.rank >= 6
    transposed = FloralConvTranspose(nn.ConvTranspose2d(4, 6, 3, groups=2), 3, rank=4)
    assert transposed.adaptor_A.shape == (3, 4, 2, 1, 3)  # [C, in, r/g, *k1]
    assert transposed.adaptor_B.shape == (3, 4, 3, 3, 1)  # [C, r, out/g, *k2]


def test_errors():
    with pytest.raises(ValueError, match=r"conv_split='diagonal'.*balanced_2d"):
        FloralConv(nn.Conv2d(4, 4, 3), 2, rank=2, split="diagonal")
    with pytest.raises(ValueError, match=r"rank=3 for enc\.conv1.*groups=2"):
        FloralConv(nn.Conv2d(4, 4, 3, groups=2), 2, rank=3, name="enc.conv1")
    with pytest.raises(ValueError, match=r"rank=2 .*groups=4"):
        FloralConvTranspose(nn.ConvTranspose1d(4, 4, 3, groups=4), 2, rank=2)
    with pytest.raises(TypeError):
        FloralConv(nn.ConvTranspose2d(4, 4, 3), 2, rank=2)
    with pytest.raises(TypeError):
        FloralConv(nn.Conv2d(4, 4, 3), 2, rank=True)
    with pytest.raises(ValueError, match="init="):
        FloralConv(nn.Conv2d(4, 4, 3), 2, rank=2, init="zeros")


# --- preconditioning ------------------------------------------------------------------------------------------


def test_precondition_divides_by_other_factor_gram_norm():
    torch.manual_seed(0)
    layer = FloralConv(nn.Conv2d(3, 5, 3).double(), 2, rank=2)
    randomise_(layer)
    grad_a, grad_b = torch.randn_like(layer.adaptor_A), torch.randn_like(layer.adaptor_B)
    layer.adaptor_A.grad, layer.adaptor_B.grad = grad_a.clone(), grad_b.clone()
    layer.precondition_gradients_(eps=1e-5)
    for c in range(2):
        b = layer.adaptor_B[c].reshape(5, -1)
        a = layer.adaptor_A[c].reshape(2, -1)
        norm_b = torch.linalg.matrix_norm(b.T @ b)
        norm_a = torch.linalg.matrix_norm(a @ a.T)
        assert_close(layer.adaptor_A.grad[c], grad_a[c] / (norm_b + 1e-5))
        assert_close(layer.adaptor_B.grad[c], grad_b[c] / (norm_a + 1e-5))


def test_eval_runs_of_one_client_take_the_merged_path_and_match_factorised(monkeypatch):
    """In eval mode a client-sorted batch of ids runs each client's run merged (convs); same outputs as the
    factorised path, and training mode (noisy router, rows of one client differ) never takes it."""
    from floral_lightning import FloralModel

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    model = FloralModel(base, num_clients=6, num_adaptors=3, rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("adaptor_B") or name.startswith("router."):
                p.normal_()
    ids = torch.tensor([4, 4, 4, 4, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    x = torch.randn(len(ids), 3, 6, 6)
    calls = []
    original = FloralConv.forward_runs
    monkeypatch.setattr(FloralConv, "forward_runs", lambda self, *a: calls.append(a[2]) or original(self, *a))

    model.eval()
    runs = model(x, ids)
    assert calls == [[4, 5, 7]]
    model.set_path("factorised")
    torch.testing.assert_close(runs, model(x, ids))
    per_client = torch.cat([model(x[ids == k], int(k)) for k in (4, 1, 0)])
    torch.testing.assert_close(runs, per_client)

    model.set_path("auto")
    model(x[:6], ids[:6])  # 2 runs for 6 samples: shorter than merge_runs_from, factorised
    model.train()
    model(x, ids)
    assert len(calls) == 1
