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


def test_gpu_check_compares_runs_number_for_number():
    """gpu_check's determinism verdict: equal checkpoints give no difference; one changed weight,
    accuracy or curve is named."""
    import gpu_check
    a = dict(model={"w": torch.ones(3), "v": torch.zeros(2)},
             metrics=dict(acc=0.5, router_shift=1e-3, kl_to_teacher=0.01, train_acc_curve=[0.1, 0.2],
                          router_shift_curve=[(1, 1e-3)]))
    b = dict(model={k: t.clone() for k, t in a["model"].items()}, metrics=dict(a["metrics"]))
    assert gpu_check.compare_runs(a, b) == []
    b["model"]["w"][1] += 1e-7
    b["metrics"]["acc"] = 0.51
    b["metrics"]["train_acc_curve"] = [0.1, 0.3]
    assert gpu_check.compare_runs(a, b) == ["weight w", "metric acc: 0.5 vs 0.51", "curve train_acc_curve"]


def test_gpu_check_summary_reads_as_markdown_tables():
    import gpu_check
    s = dict(dry_run=True, device="cpu", torch="x", when="now", limit=540, seconds=1.0, preset="tiny",
             kernel={"E8_k2_bfloat16": dict(dense=1.0, kernel=1.25, ratio=1.25, target="<= 1.3")},
             pipeline={"teacher": dict(seconds=2.0, acc=0.5, result="ok"), "stage1": dict(seconds=1.0, acc=None,
                                                                                      result="timed out")},
             determinism=dict(steps=2, seconds=3.0, diffs=["weight w"], result="1 differences"))
    md = gpu_check.markdown(s)
    assert "| E8_k2_bfloat16 | 1.00 | 1.25 | 1.250 | <= 1.3 |" in md
    assert "| teacher | 2.0 | 50.0 | ok |" in md and "| stage1 | 1.0 |  | timed out |" in md
    assert "1 differences: weight w" in md
