"""The CUDA path, where torch sees a GPU (skipped elsewhere, CI included).

The rest of the suite also runs on a GPU machine: its scripts take --device auto, so the tiny
pipeline, the same-seed and the resume tests then train on CUDA. Here: the kernel's three CUDA
layouts against the float64 reference, the bf16 path the gpu preset trains in, and the model on
CUDA against the same model on CPU.
"""

import os
import random
import warnings

import pytest
import torch

import common
import moe_kernel
from model import GPT, GPTConfig
from moe_kernel import moe_ffn, moe_ffn_reference
from test_moe_kernel import make_case, plan_kind, value_and_grads
from test_stages import restored_determinism_switches

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call of this process
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def to(case, device, dtype=None):
    return tuple(t.to(device, dtype if dtype and t.is_floating_point() else t.dtype) for t in case)


@pytest.fixture(params=["bmm", "loop", "grouped"])
def cuda_layout(request, monkeypatch):
    if request.param == "grouped" and not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("no F.grouped_mm in this torch")
    monkeypatch.setattr(moe_kernel, "_grouped_mm_failed", set())  # a failure stays inside the test
    monkeypatch.setattr(moe_kernel, "PAD_SLACK", 0.0 if request.param == "loop" else 1e9)
    if request.param != "grouped":
        monkeypatch.setattr(moe_kernel, "_use_grouped_mm", lambda x, h: False)
    return request.param


@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (32, 4)])
def test_kernel_float32_on_cuda_matches_reference(E, k, cuda_layout):
    case = make_case(256, E, k, d=32, h=64, seed=E + k)  # 32 and 64: aligned for grouped_mm
    want = value_and_grads(moe_ffn_reference, *case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a grouped_mm fallback would warn: fail instead
        got = value_and_grads(moe_ffn, *to(case, "cuda", torch.float32))
        assert plan_kind(to(case, "cuda", torch.float32)) == cuda_layout
    for name, a, b in zip(["y", "dx", "dgate", "dw_in", "dw_out"], got, want):
        assert a.dtype == torch.float32
        err = (a.cpu().double() - b).abs().max().item()
        assert err < 1e-4, f"{name}: {err:.3g}"  # TF32 is off by default: plain float32 rounding


def test_kernel_bf16_autocast_on_cuda_uses_grouped_mm():
    """What the gpu preset trains with: fp32 weights, bf16 autocast, F.grouped_mm."""
    case = make_case(1024, 16, 2, d=64, h=128, seed=3)
    x, idx, w, w_in, w_out, dy = to(case, "cuda", torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, w_in, w_out)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe_ffn(x, idx, w, w_in, w_out)
        grads = torch.autograd.grad(y.float(), leaves, dy)
    if hasattr(torch.nn.functional, "grouped_mm"):
        assert y.grad_fn.plan[0] == "grouped"
    assert y.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads)
    want = value_and_grads(moe_ffn_reference, *case)
    for name, a, b in zip(["y", "dx", "dgate", "dw_in", "dw_out"], [y] + list(grads), want):
        rel = (a.cpu().double() - b).norm() / b.norm()
        assert rel < 2e-2, f"{name}: relative error {rel:.3g}"  # bf16 has an 8-bit mantissa


def small(device, n_expert=8, top_k=2):
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=2, n_embd=32, n_expert=n_expert, top_k=top_k)
    return GPT(cfg).to(device)


def test_model_on_cuda_matches_cpu():
    cpu, gpu = small("cpu"), small("cuda")
    idx = torch.randint(0, 96, (4, 40), generator=torch.Generator().manual_seed(0))
    tgt = torch.roll(idx, -1, 1)
    lc, loss_c = cpu(idx, tgt)
    lg, loss_g = gpu(idx.cuda(), tgt.cuda())
    assert (lc - lg.cpu()).abs().max() < 1e-4
    loss_c.backward()
    loss_g.backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        assert (a.grad - b.grad.cpu()).abs().max() < 1e-4, name


def test_kv_cache_generation_on_cuda():
    m = small("cuda").eval()
    rng = random.Random(1)
    prompts = [[rng.randrange(96) for _ in range(rng.randint(1, 12))] for _ in range(6)]
    got = m.generate(prompts, 20, temperature=0, eos_id=7)
    assert m.generate(prompts, 20, temperature=0, eos_id=7, use_cache=False) == got
    g = lambda: torch.Generator(device="cuda").manual_seed(3)
    assert m.generate(prompts, 20, temperature=1.0, generator=g()) == m.generate(prompts, 20, temperature=1.0,
                                                                                 generator=g())


def test_training_steps_repeat_bit_for_bit_on_cuda():
    """Same seed, same GPU: same weights, in the deterministic mode every script sets."""
    with restored_determinism_switches():
        common.deterministic_cuda()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*non-?deterministic.*")  # name the op that breaks it
            _repeat_bit_for_bit()


def _repeat_bit_for_bit():

    def train():
        m = small("cuda")
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        g = torch.Generator(device="cuda").manual_seed(0)
        for _ in range(5):
            idx = torch.randint(0, 96, (8, 48), device="cuda", generator=g)
            with common.autocast(torch.device("cuda")):
                _, loss = m(idx, torch.roll(idx, -1, 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return m.state_dict()

    a, b = train(), train()
    for k in a:
        assert torch.equal(a[k], b[k]), k
