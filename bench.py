"""
Benchmarks. Not a test: it prints a table and optionally writes a JSON of results.

    python bench.py                       # auto device, kernel section
    python bench.py --device cpu --json out/bench.json --repeats 30

Sections (one function each, each returns a dict that main() merges):
  bench_kernel    forward+backward time of the MoE FFN kernel (moe_kernel.moe_ffn) against
                  a dense FFN with the same active parameters and against the per-expert
                  masked loop most codebases write.
  bench_kv_cache  batched sampling with the KV cache against re-running the full forward
                  for every new token (batch 64, 128 new tokens, the default teacher's shape).
  bench_training  training tokens per second (forward, backward, AdamW step) of the teacher
                  and of its MoE student on packed 128-token rows: the default shapes (E=8,
                  k=2, 8 rows) on CPU; on CUDA the gpu preset's (d=512, 8 layers, E=16, k=2,
                  64 rows, bf16 autocast, as the scripts train) with model FLOPs utilisation.

On CUDA the kernel section runs in float32 and in bf16 (the dtype the gpu preset trains in,
where F.grouped_mm is used), and everything runs in the deterministic mode the scripts use
(common.deterministic_cuda) unless --nondeterministic.
  peak memory     read from the checkpoints of a finished default run (--run, `make run`
                  writes it): every stage records its process's peak resident memory.

Timing method: after warmup, every repeat runs each contender once, in turn, so slow
drift of the machine (thermal, other processes) hits all of them alike; we report the
median over repeats, which ignores the occasional descheduled outlier.

CPU caveat: glibc hands big freed blocks back to the OS, and whether the next big
tensor is page-faulted in afresh (~0.5 ms per MB on our 2-core box) depends on the
heap's recent history, so the same contender can be 30% slower in one process than
in the next. --keep-freed-memory stops glibc from returning memory (mallopt), which
removes that cost for every contender and leaves the arithmetic.
"""

import argparse
import ctypes
import json
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

import common
import data
import stage1_cluster
import train_teacher
from model import GPT, GPTConfig, count_params
from moe_kernel import moe_ffn, moe_ffn_masked_loop

# (E, k, h at d=128) per routing setting; h shrinks as k grows so the active hidden
# width k*h = 4d is the same, i.e. the dense baseline does the same FLOPs for both
KERNEL_CONFIGS = [(8, 2, 256), (32, 4, 128)]
KERNEL_TARGETS = "targets: kernel/dense <= 1.2 (E8_k2), <= 1.5 (E32_k4); kernel/masked <= 0.67 (E32_k4)"


def keep_freed_memory():
    """glibc only: keep freed blocks (up to 32 MB each) in the heap instead of unmapping them."""
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024) and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30)
    return bool(ok)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns, device, repeats, warmup=3):
    """fns: dict name -> zero-arg callable. Returns dict name -> median milliseconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def random_routing(N, E, k, device, generator=None):
    """Top-k of a softmax over random logits: roughly balanced load, renormalised gates."""
    logits = torch.randn(N, E, device=device, generator=generator)
    probs = logits.softmax(-1)
    w, idx = probs.topk(k, dim=-1)
    return idx, w / w.sum(-1, keepdim=True)


def bench_kernel(device, repeats=20, sizes=((4096, 128),), configs=KERNEL_CONFIGS, dtype=torch.float32):
    """Forward+backward of dense FFN vs moe_ffn vs masked loop. The first (N, d) in sizes
    reports under keys like "E8_k2", the others under "E8_k2_N65536_d1024"; a dtype other
    than float32 adds its name ("E8_k2_bfloat16")."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g) * scale

    out = {"kernel_over_dense": {}, "kernel_over_masked_loop": {}, "times_ms": {}}
    for i, (N, d) in enumerate(sizes):
        for E, k, h in configs:
            h = h * d // 128  # same hidden/model ratio at every d
            key = f"E{E}_k{k}" + ("" if i == 0 else f"_N{N}_d{d}")
            key += "" if dtype == torch.float32 else "_" + str(dtype).split(".")[1]
            x = rand(N, d).requires_grad_()
            dy = rand(N, d)
            idx, gate = random_routing(N, E, k, device, g)
            gate = gate.to(dtype).requires_grad_()
            w_in = rand(E, d, h, scale=d ** -0.5).requires_grad_()
            w_out = rand(E, h, d, scale=h ** -0.5).requires_grad_()
            # dense FFN of equal *active* parameters: each token sees k*h hidden units
            w1 = rand(d, k * h, scale=d ** -0.5).requires_grad_()
            w2 = rand(k * h, d, scale=(k * h) ** -0.5).requires_grad_()

            def dense():
                y = F.gelu(x @ w1) @ w2
                torch.autograd.grad(y, (x, w1, w2), dy)

            def kernel():
                y = moe_ffn(x, idx, gate, w_in, w_out)
                torch.autograd.grad(y, (x, gate, w_in, w_out), dy)

            def masked_loop():
                y = moe_ffn_masked_loop(x, idx, gate, w_in, w_out)
                torch.autograd.grad(y, (x, gate, w_in, w_out), dy)

            t = interleaved_medians({"dense": dense, "kernel": kernel, "masked_loop": masked_loop},
                                    device, repeats)
            out["times_ms"][key] = {name: round(v, 3) for name, v in t.items()}
            out["kernel_over_dense"][key] = round(t["kernel"] / t["dense"], 3)
            out["kernel_over_masked_loop"][key] = round(t["kernel"] / t["masked_loop"], 3)

    print(f"MoE FFN forward+backward, {dtype}, median of {repeats} interleaved repeats (ms)")
    print(f"{'config':<24}{'dense':>10}{'kernel':>10}{'masked':>10}{'k/dense':>10}{'k/masked':>10}")
    for key, t in out["times_ms"].items():
        print(f"{key:<24}{t['dense']:>10.2f}{t['kernel']:>10.2f}{t['masked_loop']:>10.2f}"
              f"{out['kernel_over_dense'][key]:>10.3f}{out['kernel_over_masked_loop'][key]:>10.3f}")
    print(KERNEL_TARGETS)
    return out


def default_model(device, n_expert=1, top_k=1, block_size=128, preset="default"):
    """A model of a preset teacher's shape (train_teacher.PRESETS), random weights."""
    torch.manual_seed(0)
    shape = {k: train_teacher.PRESETS[preset][k] for k in ("n_layer", "n_head", "n_embd")}
    cfg = GPTConfig(block_size=block_size, vocab_size=data.vocab_size_padded(data.get_tokenizer()),
                    n_expert=n_expert, top_k=top_k, **shape)
    return GPT(cfg).to(device)


def bench_kv_cache(device, batch=64, prompt_len=16, new_tokens=128, repeats=2):
    """Greedy generation of `new_tokens` for `batch` prompts, with and without the KV cache.
    No end token, so both paths produce every token (block_size is raised to fit them)."""
    model = default_model(device, block_size=prompt_len + new_tokens).eval()
    g = random.Random(0)
    prompts = [[g.randrange(256) for _ in range(prompt_len)] for _ in range(batch)]
    t = interleaved_medians({
        "cache": lambda: model.generate(prompts, new_tokens, temperature=0),
        "no_cache": lambda: model.generate(prompts, new_tokens, temperature=0, use_cache=False),
    }, torch.device(device), repeats, warmup=1)
    out = {"kv_cache_speedup": round(t["no_cache"] / t["cache"], 2),
           "kv_cache_ms": {k: round(v, 1) for k, v in t.items()},
           "generate_tokens_per_s": round(batch * new_tokens / (t["cache"] / 1e3))}
    print(f"KV cache, batch {batch}, {new_tokens} new tokens: {t['cache']:.0f} ms with, "
          f"{t['no_cache']:.0f} ms without -> {out['kv_cache_speedup']:.1f}x (target >= 5x)")
    return out


def train_flops_per_token(model, T):
    """Forward + backward FLOPs per token, nanoGPT's estimate (PaLM appendix B): 6 per active
    weight (matmuls) plus attention's 12 * n_layer * n_embd * T."""
    c = model.config
    return 6 * count_params(model)[0] + 12 * c.n_layer * c.n_embd * T


def bench_training(device, rows=8, steps=10, preset="default", peak_tflops=None):
    """Tokens per second of full training steps on packed rows, teacher and student (Stage I's
    E and k for the preset), under common.autocast like the scripts. With peak_tflops, also
    the model FLOPs utilisation (MFU) against that peak."""
    enc = data.get_tokenizer()
    train = data.split_rows(n_train=2000, n_val=10, n_test=10)["train"]
    out = {"train_preset": preset, "train_rows": rows}
    student = (stage1_cluster.PRESETS[preset]["n_expert"], stage1_cluster.PRESETS[preset]["top_k"])
    for name, (E, k) in {"teacher": (1, 1), "student": student}.items():
        model = default_model(device, E, k, preset=preset)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        rng = random.Random(0)
        draw = lambda: data.encode_example(enc, train[rng.randrange(len(train))])
        batches = [common.pack_batch(draw, rows, model.config.block_size, device) for _ in range(steps + 2)]

        def step(b):
            idx, targets, pos, mask, _ = b
            with common.autocast(torch.device(device)):
                _, loss = model(idx, targets, pos=pos, attn_mask=mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for b in batches[:2]:  # warmup
            step(b)
        _sync(torch.device(device))
        t0 = time.perf_counter()
        for b in batches[2:]:
            step(b)
        _sync(torch.device(device))
        tps = steps * rows * model.config.block_size / (time.perf_counter() - t0)
        out[f"train_tokens_per_s_{name}"] = round(tps)
        if peak_tflops:
            mfu = tps * train_flops_per_token(model, model.config.block_size) / (peak_tflops * 1e12)
            out[f"train_mfu_{name}"] = round(mfu, 4)
    mfu = (f" (MFU {out['train_mfu_teacher']:.1%} / {out['train_mfu_student']:.1%} of {peak_tflops:g} TFLOP/s)"
           if peak_tflops else "")
    print(f"training tokens/s, {preset} shapes ({rows} rows x 128): teacher {out['train_tokens_per_s_teacher']:,}, "
          f"student E{student[0]} k{student[1]} {out['train_tokens_per_s_student']:,}{mfu}")
    return out


def pipeline_peak_memory(run_dir):
    """Largest peak resident memory (MiB) any stage of a finished run recorded, per stage."""
    per = {}
    for stage in ("teacher", "stage1", "stage2", "stage3", "stage4"):
        path = os.path.join(run_dir, f"{stage}.pt")
        if os.path.exists(path):
            m = torch.load(path, map_location="cpu", weights_only=True)["metrics"]
            if "peak_mem_mib" in m:
                per[stage] = m["peak_mem_mib"]
    if not per:
        print(f"peak memory: no checkpoints with peak_mem_mib in {run_dir} (run `make run` first)")
        return {"peak_memory_mib": None}
    peak = max(per.values())
    print(f"peak memory of the pipeline in {run_dir}: {peak:.0f} MiB ({max(per, key=per.get)}; target <= 4096)")
    return {"peak_memory_mib": peak, "peak_memory_mib_per_stage": per}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--json", default=None, help="write the results dict here")
    p.add_argument("--repeats", type=int, default=20, help="interleaved repeats of the kernel timings")
    p.add_argument("--run", default="out/default", help="a finished default run, for its peak memory")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc mallopt so big tensors are not page-faulted in afresh (see docstring)")
    p.add_argument("--sizes", default=None,
                   help="comma list of N:d for the kernel section; the first one gets the plain "
                        "E*_k* keys (default 4096:128, plus 65536:1024 on cuda)")
    p.add_argument("--nondeterministic", action="store_true",
                   help="on CUDA, time without the deterministic mode the scripts run in")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak for MFU (989: H100 / H200 SXM)")
    args = p.parse_args()

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.sizes:
        sizes = [tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")]
    else:
        sizes = [(4096, 128)] + ([(65536, 1024)] if device == "cuda" else [])

    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "keep_freed_memory": args.keep_freed_memory and keep_freed_memory(),
    }
    cuda = device == "cuda"
    if cuda and not args.nondeterministic:
        common.deterministic_cuda()
    results["deterministic"] = cuda and not args.nondeterministic
    results.update(bench_kernel(device, repeats=args.repeats, sizes=sizes))
    if cuda:
        for key, v in bench_kernel(device, repeats=args.repeats, sizes=sizes, dtype=torch.bfloat16).items():
            results[key].update(v)
    results.update(bench_kv_cache(device))
    if cuda:
        results.update(bench_training(device, rows=64, preset="gpu", peak_tflops=args.peak_tflops))
    else:
        results.update(bench_training(device))
    results.update(pipeline_peak_memory(args.run))

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
