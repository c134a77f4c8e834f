"""
The GPU check: one prepared script for a lent GPU, so the lend is spent measuring, not debugging.

    python gpu_check.py --out out/gpu_check            # on the GPU machine: at most ~10 min on one H200
    python gpu_check.py --dry-run --out out/gpu_dry    # on CPU first: tiny shapes, the same steps, ~2 min

In order, each step under its own time limit so one slow step cannot eat the others' time:
1. the CUDA tests (tests/test_cuda.py; they skip without a GPU, so a dry run only collects them);
2. the kernel benchmark (bench.bench_kernel) at N = 65,536, d = 1,024 in float32 and bf16,
   forward + backward against the dense FFN of equal active parameters (targets: bf16 within
   1.3x for E8 k2 and 1.5x for E32 k4);
3. the whole gpu-preset pipeline, teacher -> I -> II -> III -> IV -> table, as `make run` runs
   it, with each stage's wall time and test accuracy;
4. Stage III twice more, 10 steps each, from the same Stage II checkpoint and seed, compared
   number for number (every weight tensor, the test accuracy, the reward and router-shift
   curves): the deterministic mode's promise (common.deterministic_cuda);
5. one JSON (summary.json) and one Markdown summary (summary.md) in --out, written after every
   step, so a run cut short by the lend still leaves what it measured.

The dry run swaps the gpu preset for the tiny one with a few steps a stage, the kernel shape for
N = 2,048, d = 64, and the device for the CPU: every code path but CUDA itself runs.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import common

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = [  # (name, script, input checkpoint)
    ("teacher", "train_teacher.py", None),
    ("stage1", "stage1_cluster.py", "teacher"),
    ("stage2", "stage2_distill.py", "stage1"),
    ("stage3", "stage3_prgrpo.py", "stage2"),
    ("stage4", "stage4_balance.py", "stage3"),
]
# the dry run's budget: enough steps for every stage to take its resume, logging and eval paths
DRY_STEPS = {"teacher": 4, "stage1": 2, "stage2": 2, "stage3": 2, "stage4": 1}
DET_STEPS = {False: 10, True: 2}  # steps of each of the two Stage III runs compared (gpu, dry run)

parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="out/gpu_check", help="folder for the checkpoints, logs and the two summaries")
parser.add_argument("--dry-run", action="store_true", help="tiny preset and shapes on the CPU: check the script, not the GPU")
parser.add_argument("--limit", type=int, default=540, help="seconds for the whole check; each step gets what is left")
parser.add_argument("--repeats", type=int, default=10, help="interleaved repeats of each kernel timing")


def run_step(cmd, log, timeout):
    """Run cmd with its output in log; (returncode or None if it timed out, seconds)."""
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=max(1, timeout), cwd=HERE).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, round(time.time() - t0, 1)


def compare_runs(a, b):
    """Number-for-number comparison of two checkpoints (dicts as torch.load gives them) and their
    logs (lists of JSON records): [] when equal, else what differs, first differences first."""
    diffs = [f"weight {k}" for k in a["model"] if k not in b["model"] or not torch.equal(a["model"][k], b["model"][k])]
    diffs += [f"metric {k}: {a['metrics'][k]} vs {b['metrics'].get(k)}" for k in ("acc", "router_shift", "kl_to_teacher")
              if a["metrics"].get(k) != b["metrics"].get(k)]
    for k in ("train_acc_curve", "router_shift_curve"):
        if a["metrics"].get(k) != b["metrics"].get(k):
            diffs.append(f"curve {k}")
    return diffs


def markdown(s):
    """The summary as Markdown: one table per section, in the order the steps ran."""
    L = [f"# GPU check ({'dry run, CPU' if s['dry_run'] else s['device']})", "",
         f"torch {s['torch']}; {s['when']}; total {s.get('seconds', '-')} s of a {s['limit']} s limit.", ""]
    if "cuda_tests" in s:
        t = s["cuda_tests"]
        L += ["## CUDA tests", "", f"`{t['command']}`: {t['result']} ({t['seconds']} s)", ""]
    if "kernel" in s:
        L += ["## Kernel, forward + backward", "", "| shape | dense ms | kernel ms | kernel / dense | target |",
              "|---|---|---|---|---|"]
        for key, v in s["kernel"].items():
            L.append(f"| {key} | {v['dense']:.2f} | {v['kernel']:.2f} | {v['ratio']:.3f} | {v.get('target', '')} |")
        L.append("")
    if "pipeline" in s:
        L += ["## Pipeline (preset " + s["preset"] + ")", "", "| stage | wall s | test acc | result |", "|---|---|---|---|"]
        for name, v in s["pipeline"].items():
            acc = "" if v.get("acc") is None else f"{100 * v['acc']:.1f}"
            L.append(f"| {name} | {v['seconds']} | {acc} | {v['result']} |")
        L.append("")
    if s.get("table"):
        L += ["```", s["table"].strip(), "```", ""]
    if "determinism" in s:
        d = s["determinism"]
        L += [f"## Stage III twice from one seed ({d['steps']} steps each, {d['seconds']} s)", "", f"{d['result']}" + (": " + "; ".join(d["diffs"][:10]) if d["diffs"] else ""), ""]
    return "\n".join(L) + "\n"


def main():
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise common.UserError("no CUDA device: run with --dry-run to check the script on the CPU")
    args.out = os.path.abspath(args.out)  # the steps run from the repository's folder
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    left = lambda: args.limit - (time.time() - t_start)
    s = dict(dry_run=dry, device="cpu" if dry else torch.cuda.get_device_name(), torch=torch.__version__,
             when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), limit=args.limit,
             preset="tiny" if dry else "gpu")

    def save():
        s["seconds"] = round(time.time() - t_start, 1)
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(s, f, indent=1)
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            f.write(markdown(s))

    # 1. CUDA tests
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_cuda.py"] + (["--collect-only"] if dry else [])
    rc, sec = run_step(cmd, os.path.join(args.out, "cuda_tests.log"), min(120, left()))
    tail = open(os.path.join(args.out, "cuda_tests.log")).read().strip().splitlines()[-1:] or [""]
    s["cuda_tests"] = dict(command=" ".join(cmd[1:]), seconds=sec,
                           result="timed out" if rc is None else f"exit {rc}: {tail[0]}")
    save()

    # 2. kernel benchmark in float32 and bf16 at the large shape
    import bench
    device = "cpu" if dry else "cuda"
    if not dry:
        common.deterministic_cuda()
    size = (2048, 64) if dry else (65536, 1024)
    s["kernel"] = {}
    targets = {"E8_k2_bfloat16": "<= 1.3", "E32_k4_bfloat16": "<= 1.5"}
    for dtype in (torch.float32, torch.bfloat16):
        out = bench.bench_kernel(device, repeats=2 if dry else args.repeats, sizes=(size,), dtype=dtype)
        for key, t in out["times_ms"].items():
            s["kernel"][key] = dict(dense=t["dense"], kernel=t["kernel"], ratio=out["kernel_over_dense"][key],
                                    target=targets.get(key, ""))
    save()

    # 3. the pipeline, stage by stage
    run_dir = os.path.join(args.out, "run")
    os.makedirs(run_dir, exist_ok=True)
    s["pipeline"], cmds = {}, {}
    flags = ["--preset", s["preset"], "--seed", "0", "--device", device]
    for name, script, inp in STAGES:
        cmd = [sys.executable, script, *flags, "--out", os.path.join(run_dir, f"{name}.pt")]
        if inp:
            cmd += ["--in", os.path.join(run_dir, f"{inp}.pt")]
        if dry:
            cmd += ["--steps", str(DRY_STEPS[name]), "--n-test", "8"]
        cmds[name] = cmd
        rc, sec = run_step(cmd, os.path.join(run_dir, f"{name}.log"), left() - 30)
        ckpt = os.path.join(run_dir, f"{name}.pt")
        acc = common.load_checkpoint(ckpt)["metrics"]["acc"] if rc == 0 and os.path.exists(ckpt) else None
        s["pipeline"][name] = dict(seconds=sec, acc=acc, command=" ".join(cmd[1:]),
                                   result="ok" if rc == 0 else "timed out" if rc is None else f"exit {rc}")
        save()
        if rc != 0:
            break

    # the results table of the run, as make run ends
    rc, _ = run_step([sys.executable, "eval_math.py", "--table", run_dir], os.path.join(run_dir, "table.txt"), 60)
    s["table"] = open(os.path.join(run_dir, "table.txt")).read() if rc == 0 else None

    # 4. two short Stage III runs from the same Stage II checkpoint and seed, compared
    stage2 = os.path.join(run_dir, "stage2.pt")
    if os.path.exists(stage2) and left() > 30:
        runs, t0 = [], time.time()
        for tag in ("a", "b"):
            out = os.path.join(run_dir, f"stage3_{tag}.pt")
            cmd = [sys.executable, "stage3_prgrpo.py", *flags, "--in", stage2, "--out", out, "--steps", str(DET_STEPS[dry]),
                   "--n-test", "8" if dry else "100", "--log", os.path.join(run_dir, f"stage3_{tag}.jsonl")]
            rc, _ = run_step(cmd, os.path.join(run_dir, f"stage3_{tag}.log"), (left() - 10) / (2 if tag == "a" else 1))
            runs.append(out if rc == 0 else "timed out" if rc is None else f"exit {rc}")
        if all(r.endswith(".pt") for r in runs):
            diffs = compare_runs(*(common.load_checkpoint(r) for r in runs))
            result = "the same, number for number" if not diffs else f"{len(diffs)} differences"
        else:
            diffs, result = [], "not compared: " + ", ".join(r for r in runs if not r.endswith(".pt"))
        s["determinism"] = dict(steps=DET_STEPS[dry], seconds=round(time.time() - t0, 1), diffs=diffs, result=result)
    save()
    print(markdown(s))
    print(f"wrote {os.path.join(args.out, 'summary.json')} and summary.md")


if __name__ == "__main__":
    common.run(main)
