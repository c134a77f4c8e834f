"""bench.py's sections run and report what they claim (on CPU, small sizes; bench.py is not a test,
but its CUDA-only branches must not be first exercised on a lent GPU)."""

import torch

import bench
from model import count_params


def test_kernel_section_keys_per_dtype():
    fp32 = bench.bench_kernel("cpu", repeats=1, sizes=((64, 16), (32, 16)), configs=[(4, 2, 8)])
    assert set(fp32["times_ms"]) == {"E4_k2", "E4_k2_N32_d16"}
    bf16 = bench.bench_kernel("cpu", repeats=1, sizes=((64, 16),), configs=[(4, 2, 8)], dtype=torch.bfloat16)
    assert set(bf16["kernel_over_dense"]) == {"E4_k2_bfloat16"}
    assert all(v > 0 for v in bf16["times_ms"]["E4_k2_bfloat16"].values())


def test_flops_per_token_counts_active_weights_and_attention():
    dense = bench.default_model("cpu", preset="tiny")
    moe = bench.default_model("cpu", 8, 2, preset="tiny")
    c = dense.config
    attn = 12 * c.n_layer * c.n_embd * 128
    assert bench.train_flops_per_token(dense, 128) == 6 * count_params(dense)[0] + attn
    # equal active cost: the student adds only its routers (n_embd x E per layer)
    router = c.n_layer * c.n_embd * 8
    assert bench.train_flops_per_token(moe, 128) - bench.train_flops_per_token(dense, 128) == 6 * router


def test_training_section_reports_tokens_and_mfu():
    out = bench.bench_training("cpu", rows=2, steps=1, preset="tiny", peak_tflops=1.0)
    for name in ("teacher", "student"):
        assert out[f"train_tokens_per_s_{name}"] > 0
        assert 0 < out[f"train_mfu_{name}"] < 1
