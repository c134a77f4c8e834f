"""Correctness of moe_kernel.moe_ffn against the per-token reference (float64)."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import moe_kernel  # noqa: E402
from moe_kernel import moe_ffn, moe_ffn_masked_loop, moe_ffn_reference  # noqa: E402

TOL = 1e-6


def make_case(N, E, k, d=8, h=12, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype)
    # k distinct experts per token, uniformly at random
    idx = torch.rand(N, E, generator=g).argsort(dim=1)[:, :k].contiguous()
    w = torch.rand(N, k, generator=g, dtype=dtype) + 0.1
    w_in = torch.randn(E, d, h, generator=g, dtype=dtype) / d ** 0.5
    w_out = torch.randn(E, h, d, generator=g, dtype=dtype) / h ** 0.5
    dy = torch.randn(N, d, generator=g, dtype=dtype)
    return x, idx, w, w_in, w_out, dy


def value_and_grads(fn, x, idx, w, w_in, w_out, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, w_in, w_out)]
    y = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3])
    grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    return [y.detach()] + [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]


def plan_kind(case):
    x, idx, w, w_in, w_out, _ = case
    return moe_ffn(x, idx, w, w_in, w_out.detach().clone().requires_grad_()).grad_fn.plan[0]


def assert_matches_reference(fn, case, tol=TOL):
    got = value_and_grads(fn, *case)
    want = value_and_grads(moe_ffn_reference, *case)
    for name, a, b in zip(["y", "dx", "dtopk_weight", "dw_in", "dw_out"], got, want):
        assert a.shape == b.shape, name
        err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
        assert err <= tol, f"{name}: max abs diff {err:.3g}"


@pytest.fixture(params=["bmm", "loop"])
def layout(request, monkeypatch):
    # PAD_SLACK decides between the padded-bmm and the per-expert-loop layouts
    monkeypatch.setattr(moe_kernel, "PAD_SLACK", 1e9 if request.param == "bmm" else 0.0)
    return request.param


@pytest.mark.parametrize("E,k", [(1, 1), (4, 1), (8, 2), (32, 4), (5, 5)])
def test_matches_reference(E, k, layout):
    case = make_case(48, E, k, seed=E * 10 + k)
    assert plan_kind(case) == layout
    assert_matches_reference(moe_ffn, case)


@pytest.mark.parametrize("N,E,k", [(3, 16, 2), (1, 8, 1), (2, 64, 3)])
def test_experts_without_tokens(N, E, k, layout):
    case = make_case(N, E, k, seed=N)
    assert len(torch.unique(case[1])) < E  # some experts really get nothing
    assert_matches_reference(moe_ffn, case)
    dw_in = value_and_grads(moe_ffn, *case)[3]
    unused = torch.ones(E, dtype=torch.bool)
    unused[case[1].unique()] = False
    assert (dw_in[unused] == 0).all()


def test_skewed_routing_uses_loop_and_is_exact():
    # every token picks expert 0 first: padding to the largest block would be huge
    x, idx, w, w_in, w_out, dy = make_case(40, 8, 2, seed=3)
    idx[:, 0] = 0
    idx[:, 1] = torch.randint(1, 8, (40,), generator=torch.Generator().manual_seed(1))
    case = (x, idx, w, w_in, w_out, dy)
    assert plan_kind(case) == "loop"
    assert_matches_reference(moe_ffn, case)


def test_grouped_mm_path_float32(monkeypatch):
    # the CUDA path (F.grouped_mm) also runs on CPU for float32 with aligned shapes
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("no F.grouped_mm in this torch")
    monkeypatch.setattr(moe_kernel, "_use_grouped_mm", lambda x, h: True)
    case64 = make_case(40, 6, 2, d=8, h=16, seed=5)
    case32 = tuple(t.float() if t.is_floating_point() else t for t in case64)
    assert plan_kind(case32) == "grouped"
    got = value_and_grads(moe_ffn, *case32)
    want = value_and_grads(moe_ffn_reference, *case64)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert (a.double() - b).abs().max().item() < 1e-4


def test_empty_batch(layout):
    x, idx, w, w_in, w_out, dy = make_case(0, 4, 2)
    y, dx, dw, dw_in, dw_out = value_and_grads(moe_ffn, x, idx, w, w_in, w_out, dy)
    assert y.shape == (0, 8) and dx.shape == (0, 8) and dw.shape == (0, 2)
    assert (dw_in == 0).all() and (dw_out == 0).all()


def test_masked_loop_matches_reference():
    for E, k in [(1, 1), (8, 2), (5, 5)]:
        assert_matches_reference(moe_ffn_masked_loop, make_case(24, E, k, seed=E))


def test_gradcheck(layout):
    x, idx, w, w_in, w_out, _ = make_case(6, 4, 2, d=3, h=5, seed=7)
    inputs = [t.requires_grad_() for t in (x, w, w_in, w_out)]
    f = lambda x, w, w_in, w_out: moe_ffn(x, idx, w, w_in, w_out)  # noqa: E731
    assert torch.autograd.gradcheck(f, inputs)


def test_interleaved_calls_do_not_share_state(layout):
    # two forwards before either backward, backwards in reverse order: scratch
    # buffers reused across calls must never hold anything a backward still needs
    c1, c2 = make_case(30, 8, 2, seed=11), make_case(50, 8, 2, seed=12)
    leaves = [[t.detach().clone().requires_grad_() for t in (c[0], c[2], c[3], c[4])] for c in (c1, c2)]
    ys = [moe_ffn(l[0], c[1], l[1], l[2], l[3]) for l, c in zip(leaves, (c1, c2))]
    grads2 = torch.autograd.grad(ys[1], leaves[1], c2[5])
    grads1 = torch.autograd.grad(ys[0], leaves[0], c1[5])
    for c, grads in ((c1, grads1), (c2, grads2)):
        want = value_and_grads(moe_ffn_reference, *c)[1:]
        for a, b in zip(grads, want):
            assert (a - b).abs().max().item() <= TOL


def test_partial_requires_grad_and_mixed_dtypes():
    x, idx, w, w_in, w_out, dy = make_case(20, 4, 2, seed=2)
    # gate weights are constants; x arrives in float32 while the weights are float64
    x32 = x.float().requires_grad_()
    w_in_, w_out_ = w_in.clone().requires_grad_(), w_out.clone().requires_grad_()
    y = moe_ffn(x32, idx, w, w_in_, w_out_)
    assert y.dtype == torch.float64
    dx, dw_in = torch.autograd.grad(y, (x32, w_in_), dy)
    assert dx.dtype == torch.float32
    want = value_and_grads(moe_ffn_reference, x32.detach().double(), idx, w, w_in, w_out, dy)
    assert (y - want[0]).abs().max() < 1e-6
    assert (dx.double() - want[1]).abs().max() < 1e-5
    assert (dw_in - want[3]).abs().max() < 1e-6


def test_autocast_bf16():
    x, idx, w, w_in, w_out, dy = make_case(32, 4, 2, d=16, h=16, dtype=torch.float32)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_ffn(x, idx, w, w_in, w_out)
    assert y.dtype == torch.bfloat16
    (dx,) = torch.autograd.grad(y.float(), x, dy)
    assert dx.dtype == torch.float32
    ref = moe_ffn_reference(x.detach(), idx, w, w_in, w_out)
    assert (y.float() - ref).abs().max() < 0.05


def test_leading_dims_are_flattened():
    x, idx, w, w_in, w_out, _ = make_case(12, 4, 2, seed=4)
    y = moe_ffn(x.view(3, 4, -1), idx.view(3, 4, 2), w.view(3, 4, 2), w_in, w_out)
    assert y.shape == (3, 4, x.shape[1])
    assert (y.view_as(x) - moe_ffn(x, idx, w, w_in, w_out)).abs().max() == 0


def test_backward_twice_with_retain_graph(layout):
    # backward must not modify anything it saved (it writes only into scratch)
    x, idx, w, w_in, w_out, dy = make_case(20, 4, 2, seed=9)
    leaves = [t.requires_grad_() for t in (x, w, w_in, w_out)]
    y = moe_ffn(x, idx, w, w_in, w_out)
    first = torch.autograd.grad(y, leaves, dy, retain_graph=True)
    second = torch.autograd.grad(y, leaves, dy)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
