"""
What every stage needs and nothing more: the device, seeds, checkpoint I/O, JSON-lines logs,
padded batches with a completion-only loss mask, errors a user can cause, and data parallelism
under torchrun.

Checkpoint contract (other tools read it): a dict of plain tensors and plain Python values,
    {"model": state_dict, "config": GPTConfig as dict, "stage": str, "args": dict,
     "metrics": dict, "tokenizer": dict, ...stage extras (e.g. "clusters")}
written atomically (temp file in the same folder, then os.replace) and read only with
torch.load(..., weights_only=True), so a checkpoint can never run code on load.
"""

import argparse
import contextlib
import glob
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from model import GPT, GPTConfig


class UserError(Exception):
    """A problem the user can fix (a path, a checkpoint of the wrong kind, a bad line)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, a bad choice) end like every other user
    error: one line naming the problem and exit 2, without the usage block."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run(main):
    """Run main(); a UserError ends with one line on stderr and exit status 2, no traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def pick_device(name="auto"):
    if name != "auto" and name.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: expected auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))  # one GPU per torchrun process
    return torch.device(name)


def add_run_args(parser, seed_help="seed"):
    """The flags every script shares, read by setup() and maybe_resume()."""
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--resume", action="store_true", help="continue from <out>.resume.pt if present")
    parser.add_argument("--log", help="JSON-lines metrics log (default: next to --out)")
    parser.add_argument("--n-test", type=int, help="test problems graded at the end (preset if unset)")
    parser.add_argument("--nondeterministic", action="store_true",
                        help="on CUDA, allow kernels that sum in arrival order: faster, not bit-reproducible")


def setup(args, presets, stage, limits=None):
    """What every script does first: fill unset arguments from the preset, check every argument
    (check_args, with the script's `limits`) before anything is loaded, pick the device, seed
    everything. Returns (device, path of the run's JSON-lines log)."""
    for k, v in presets[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if getattr(args, "n_test", 1) < 1:
        raise UserError(f"--n-test {args.n_test}: every stage grades at least one test problem")
    log = args.log or os.path.join(os.path.dirname(os.path.abspath(args.out)), f"{stage}.jsonl")
    check_args(args, dict(RUN_LIMITS, **(limits or {})), log)
    device = pick_device(args.device)
    if device.type == "cuda" and not getattr(args, "nondeterministic", False):
        deterministic_cuda()
    init_distributed(device)
    seed_all(args.seed)  # the same on every rank: models start identical, batches are drawn alike
    return device, log


# ----------------------------------------------------------------------------- argument checks
# A bad value is refused before any work starts, with one line naming the flag and what it
# may be: --steps 0 would otherwise write a teacher of NaN loss, --eval-every 0 divide by zero
# an hour in, --out equal to --in overwrite the input.

RUN_LIMITS = dict(seed=(0, 2 ** 32 - 1), data_seed=(0, 2 ** 32 - 1))  # numpy seeds are 32-bit
FREE_FLOOR = 16 * 2 ** 20  # bytes an output folder must have free: a few checkpoints of the tiny preset


def check_args(args, limits, log):
    """limits: dest -> (lowest, highest), either None for open; an unset (None) argument is not
    checked. Then the output: different from every input, in a folder that is (or can be made)
    writable with room. Raises UserError naming the first bad flag."""
    for dest, (lo, hi) in limits.items():
        v = getattr(args, dest, None)
        if v is None:
            continue
        flag = "--" + dest.replace("_", "-")
        if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            allowed = (f"between {lo} and {hi}" if lo is not None and hi is not None else
                       f"at least {lo}" if lo is not None else f"at most {hi}")
            raise UserError(f"{flag} {v}: must be {allowed}")
    ins = [("--in", args.inp)] if getattr(args, "inp", None) else []
    if hasattr(args, "teacher") and ins:
        ins.append(("--teacher", teacher_path_for(args.teacher, args.inp)))
    for flag, path in [("--out", args.out), ("--log", log)]:
        for in_flag, inp in ins:
            if same_file(path, inp):
                raise UserError(f"{flag} {path} is the same file as {in_flag} {inp}: it would be overwritten")
        if os.path.isdir(path):
            raise UserError(f"{flag} {path} is a folder; give a file name")
        check_writable(flag, path)
    if same_file(args.out, log):
        raise UserError(f"--log {log} is the same file as --out {args.out}")


def same_file(a, b):
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.abspath(a) == os.path.abspath(b)


def check_writable(flag, path):
    """The folder of path exists or can be made, takes a file, and has FREE_FLOOR bytes free."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_probe.{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"x")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror or type(e).__name__})")
    if shutil.disk_usage(folder).free < FREE_FLOOR:
        raise UserError(f"{flag} {path}: {folder} has less than {FREE_FLOOR // 2 ** 20} MiB free")


def autocast(device):
    """bf16 autocast for training forwards on CUDA (the gpu preset's speed); fp32 on CPU, where
    bf16 matmuls are slower and the CPU results in the README are measured."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def deterministic_cuda():
    """Same seed, same GPU: same numbers. CUDA's index_add_ / scatter-add (the MoE kernel's
    un-permute, embedding backward) sum with atomics in whatever order threads arrive;
    deterministic mode picks sorted kernels instead, and cuBLAS needs a fixed workspace for it.
    warn_only: an op with no deterministic kernel warns rather than stops a run. The fused
    attention kernels (cuDNN, flash, memory-efficient) keep atomics in their backward under
    warn_only (torch 2.11 on an H200 warned for cuDNN, then for flash), so attention runs on
    the math backend: plain matmuls and a softmax. --nondeterministic skips all of this."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    # deterministic mode also NaN-fills every new_empty; the kernel's scratch is always overwritten
    torch.utils.deterministic.fill_uninitialized_memory = False
    for fused in ("cudnn", "flash", "mem_efficient"):
        getattr(torch.backends.cuda, f"enable_{fused}_sdp")(False)


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path, ckpt):
    """Write atomically: a crash mid-write leaves the old file (if any) untouched.
    Under torchrun only rank 0 writes (every rank holds the same weights)."""
    if not is_main():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    remove_stale_temps(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk mid-run: the old file is untouched
        raise UserError(f"cannot write {path}: {e.strerror or type(e).__name__}")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(path):
    """Temp files of path left by a process killed mid-save (kill -9 skips every finally)."""
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        pid = tmp.rsplit(".", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(tmp)


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def file_digest(path):
    """sha256 of a file's bytes: what a checkpoint records of each input (`made_from`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def made_from(args):
    """{"in": digest, "teacher": digest} of the checkpoints this run reads (what it has of each);
    ablate.py reruns a node whose inputs no longer match."""
    if not getattr(args, "inp", None):
        return {}
    out = {"in": file_digest(args.inp)}
    if hasattr(args, "teacher"):
        out["teacher"] = file_digest(teacher_path_for(args.teacher, args.inp))
    return out


def load_checkpoint(path, kind=None):
    """Load a checkpoint; kind "dense" or "moe" checks what the model is."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or empty file, not a torch file, or one that wants to run code
        first = (str(e).splitlines() or [""])[0]
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}" + (f": {first}" if first else " (empty or cut off)"))
    missing = [k for k in ("model", "config", "stage", "tokenizer") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a PADD checkpoint (missing {', '.join(missing)})")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise UserError(f"{path} is not a PADD checkpoint (config or model is not a dict)")
    for k in ("args", "metrics"):
        if not isinstance(ckpt.setdefault(k, {}), dict):
            raise UserError(f"{path} is not a PADD checkpoint ({k} is not a dict)")
    known = set(GPTConfig.__dataclass_fields__)
    unknown = sorted(set(ckpt["config"]) - known)
    if unknown:
        raise UserError(f"{path}: its config has keys no model takes ({', '.join(map(str, unknown))})")
    is_moe = ckpt["config"].get("n_expert", 1) > 1
    if kind == "dense" and is_moe:
        raise UserError(f"{path} is an MoE student (stage {ckpt['stage']}); a dense teacher is expected here")
    if kind == "moe" and not is_moe:
        raise UserError(f"{path} is a dense model (stage {ckpt['stage']}); an MoE student is expected here")
    return ckpt


def build_model(ckpt, device):
    try:
        model = GPT(GPTConfig(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError, AssertionError) as e:  # config and tensors disagree
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"checkpoint (stage {ckpt.get('stage')}) does not build: {type(e).__name__}: {first}")
    return model.to(device)


def check_student(sckpt, tckpt, inp, teacher):
    """A student and the teacher it is compared with must share the vocabulary, depth and width,
    and its Stage I clusters must cover every layer's neurons: otherwise the teacher's path and
    logits do not line up with the student's (zip would silently drop layers)."""
    s, t = sckpt["config"], tckpt["config"]
    for k in ("vocab_size", "n_layer", "n_embd", "block_size"):
        if s.get(k) != t.get(k):
            raise UserError(f"teacher {teacher} has {k} {t.get(k)}, the student {inp} {s.get(k)}: not its teacher")
    clusters = sckpt.get("clusters")
    if clusters is None:
        raise UserError(f"{inp} has no Stage I clusters (stage {sckpt['stage']})")
    H, E = 4 * s.get("n_embd", 0), s.get("n_expert", 1)
    ok = (isinstance(clusters, (list, tuple)) and len(clusters) == s.get("n_layer")
          and all(torch.is_tensor(c) and c.shape == (H,) and not c.is_floating_point()
                  and int(c.min()) >= 0 and int(c.max()) < E for c in clusters))
    if not ok:
        raise UserError(f"{inp}: its Stage I clusters do not give each of the {s.get('n_layer')} layers' {H} neurons "
                        f"one of {E} experts")


def peak_memory_mib(device):
    """This process's peak resident memory (Linux reports KiB), or the peak CUDA allocation."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def make_checkpoint(model, tokenizer_dict, stage, args, metrics, **extra):
    if stage != "resume":
        metrics = dict(metrics, peak_mem_mib=peak_memory_mib(next(model.parameters()).device))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return dict(model=state, config=model.config.to_dict(), stage=stage, args=dict(vars(args)),
                metrics=metrics, tokenizer=tokenizer_dict, **extra)


def lr_at(step, steps, peak, warmup=0, final=0.1):
    """Linear warmup over `warmup` steps, then cosine decay from `peak` to `final * peak`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def item(x):
    """A loss term as a float for logs, whether it is a tensor (with grad) or a number."""
    return float(x.detach()) if torch.is_tensor(x) else float(x)


def strict(x):
    """x with every non-finite float (NaN, inf) as None: JSON has no NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    return x


def append_jsonl(path, record):
    """One strict-JSON line. A torn last line (a full disk or a kill mid-write leaves one) is
    dropped first, with a warning, so the next record starts on a line of its own."""
    if not is_main():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = json.dumps(strict(dict(time=round(time.time(), 3), **record)), allow_nan=False) + "\n"
    try:
        with open(path, "a+b") as f:
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    keep = data.rfind(b"\n") + 1
                    try:  # a whole record that lacks only its newline is kept, as read_jsonl keeps it
                        json.loads(data[keep:])
                        f.write(b"\n")
                    except ValueError:
                        f.truncate(keep)
                        print(f"warning: {path}: dropped a torn last line", file=sys.stderr)
            f.write(line.encode())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or type(e).__name__}")


def read_jsonl(path):
    """The records (dicts) of a JSON-lines file. A torn last line is skipped with a warning; a
    bad line anywhere else is a UserError naming the file and line."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records = []
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            r = json.loads(raw)
            if not isinstance(r, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError):
            if i == len(lines):  # no newline after it: the write was cut off
                print(f"warning: {path}: skipped a torn last line", file=sys.stderr)
                continue
            raise UserError(f"{path}, line {i}: not a JSON object; mend or remove the line")
        records.append(r)
    return records


def read_json(path):
    """A JSON file the runner wrote, as a UserError (not a traceback) when it is not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON ({type(e).__name__}); mend or remove it")


def pad_batch(prompts, completions, device, pad_id=0):
    """Concatenate prompt + completion per row and right-pad.

    Returns idx [B, T] (inputs), targets [B, T] (next tokens, -1 where the loss is off: on the
    prompt and the padding) and valid [B, T] (False on padding). The loss is on completion
    tokens only.
    """
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs) - 1
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -1, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        idx[i, :len(s) - 1] = torch.tensor(s[:-1])
        targets[i, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
        valid[i, :len(s) - 1] = True
    return idx.to(device), targets.to(device), valid.to(device)


def pack_batch(next_pair, rows, T, device):
    """Fill `rows` rows of T tokens with whole (prompt, completion) examples drawn from
    next_pair(), back to back, instead of padding each example to the longest.

    Our examples are ~50 tokens, so padding wastes about half of every padded batch; packed rows
    carry ~2.5x the examples for ~1.4x the compute. Each example keeps its own positions
    (0, 1, ...) and a block-diagonal causal mask stops it from attending to its neighbours, so
    the model sees exactly what it would see alone. Returns idx, targets (-1 off the loss),
    pos [rows, T], attn_mask [rows, 1, T, T] (True = may attend) and the number of examples.
    """
    idx = torch.zeros((rows, T), dtype=torch.long)
    targets = torch.full((rows, T), -1, dtype=torch.long)
    pos = torch.zeros((rows, T), dtype=torch.long)
    doc = torch.full((rows, T), -1, dtype=torch.long)
    pending, n = None, 0
    for r in range(rows):
        at = 0
        while True:
            p, c = pending or next_pair()
            s = p + c
            if len(s) - 1 > T:
                raise ValueError(f"an example of {len(s)} tokens does not fit in {T}")
            if at + len(s) - 1 > T:
                pending = (p, c)
                break
            pending, L = None, len(s) - 1
            idx[r, at:at + L] = torch.tensor(s[:-1])
            targets[r, at + len(p) - 1:at + L] = torch.tensor(s[len(p):])
            pos[r, at:at + L] = torch.arange(L)
            doc[r, at:at + L] = n
            at, n = at + L, n + 1
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return idx.to(device), targets.to(device), pos.to(device), mask[:, None].to(device), n


# --resume: every stage saves model + optimiser + step next to its output, and removes it once
# the final checkpoint is written. Batches come from per-step seeded streams, so a resumed run
# sees the same data it would have seen.

# A resume file holds the run's arguments and what its inputs were (made_from), and is taken
# only by a run whose arguments, bar these, and inputs are the same: anything else would
# continue another run and write a checkpoint whose args describe a run that did not happen.
RESUME_FREE = ("out", "log", "resume", "stop_after", "device", "nondeterministic")


def save_resume(args, model, opt, step, tokenizer_dict, **extra):
    ckpt = make_checkpoint(model, tokenizer_dict, "resume", args, {}, optimizer=opt.state_dict(), step=step, **extra)
    save_checkpoint(args.out + ".resume.pt", ckpt)


def resume_mismatch(saved, args):
    """The first argument (as its flag, with both values) in which a resume file's run differs
    from this one, or None."""
    now = vars(args)

    def same(k):
        a, b = saved.get(k, "unset"), now.get(k, "unset")
        if k in ("inp", "teacher") and isinstance(a, str) and isinstance(b, str):
            return os.path.abspath(a) == os.path.abspath(b)  # "out/x" and "./out/x" are one file
        return a == b

    for k in sorted(set(saved) | set(now)):
        if k not in RESUME_FREE and k != "made_from" and not same(k):
            return f"--{k.replace('_', '-')} {saved.get(k, 'unset')} there, {now.get(k, 'unset')} here"
    return None


def maybe_resume(args, model, opt, inputs=None):
    """Load <out>.resume.pt into model and opt if --resume and it exists; inputs: this run's
    made_from. Returns (step, the resume dict) or (0, {})."""
    path = args.out + ".resume.pt"
    if not (getattr(args, "resume", False) and os.path.exists(path)):
        return 0, {}
    state = load_checkpoint(path)
    if state["config"] != model.config.to_dict():
        raise UserError(f"{path} was written for another model config; delete it or drop --resume")
    diff = resume_mismatch(state["args"], args)
    if diff is None and inputs is not None and state.get("made_from", inputs) != inputs:
        diff = "its input checkpoints have changed since"
    if diff:
        raise UserError(f"{path} is from another run ({diff}); delete it or drop --resume")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    print(f"resuming {path} at step {state['step']}")
    return state["step"], state


def data_seed(teacher_ckpt):
    """The seed of the suite's splits the teacher was trained on; every later stage uses it."""
    args = teacher_ckpt.get("args", {})
    return args.get("data_seed", args.get("seed", 0))  # checkpoints from before --data-seed


def teacher_path_for(args_teacher, student_path):
    """The teacher a stage compares against: --teacher, else teacher.pt beside the student."""
    return args_teacher or os.path.join(os.path.dirname(os.path.abspath(student_path)), "teacher.pt")


def clear_resume(args):
    path = args.out + ".resume.pt"
    if is_main() and os.path.exists(path):
        os.remove(path)


# ----------------------------------------------------------------------------- torchrun
# `torchrun --nproc_per_node=N script.py ...` starts N copies of a script with RANK, WORLD_SIZE
# and LOCAL_RANK set. Data parallelism, as DDP does it, written out: every rank draws the same
# global batch from the same seeded stream and keeps its own slice (shard), gradients are
# averaged over ranks after backward (sync_grads), and quantities that must be global (expert
# loads, token counts, rewards for logs) are summed over ranks (all_reduce). Only rank 0 writes
# checkpoints and logs. We average gradients by hand instead of wrapping the model in
# DistributedDataParallel because the stages call submodules outside the model's forward
# (Stage I runs each MoE layer on the teacher's inputs), which DDP's hooks do not expect.
# Without torchrun every function below is the identity and the single-process path is
# exactly what it was.

def init_distributed(device):
    if "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # one report, from rank 0; errors still reach stderr


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def shard(items):
    """This rank's contiguous slice of a list that every rank holds in full."""
    n, w, r = len(items), world(), rank()
    return items[r * n // w:(r + 1) * n // w]


def all_reduce(t):
    """Sum of a tensor over ranks (in place; returned for convenience)."""
    if world() > 1:
        dist.all_reduce(t)
    return t


def global_weight(n_local, device):
    """Factor that turns this rank's mean over its n_local tokens into its share of the mean
    over the global batch's tokens, once gradients are averaged over ranks: n_local * W / n."""
    if world() == 1:
        return 1.0
    n = all_reduce(torch.tensor(float(n_local), device=device))
    return n_local * world() / float(n) if n else 0.0  # no such token on any rank: nothing to weigh


def sync_grads(model):
    """Average gradients over ranks in one all-reduce. A parameter without a gradient on this
    rank (an MoE expert none of its tokens chose) contributes zeros, so every rank takes the
    same optimizer step."""
    if world() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world()
    at = 0
    for p in params:
        p.grad.copy_(flat[at:at + p.numel()].view_as(p))
        at += p.numel()


def optimizer_step(model, opt, clip=1.0):
    """The end of every training step: average the gradients over ranks, clip their global norm
    (every stage clips at 1), step."""
    sync_grads(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


def gather_lists(xs):
    """Concatenate a per-rank Python list over ranks, in rank order."""
    if world() == 1:
        return xs
    out = [None] * world()
    dist.all_gather_object(out, xs)
    return [x for part in out for x in part]


# ----------------------------------------------------------------------------- load balance

def global_load(topk_per_layer, n_expert):
    """Assignments per expert, [L, E] float, from each layer's top-k indices, summed over ranks."""
    return all_reduce(torch.stack([torch.bincount(k.flatten(), minlength=n_expert)
                                   for k in topk_per_layer]).float())


def bias_update(bias, load, rate):
    """DeepSeek-V3: b_e += u * sign(mean load - load_e). Returns the new bias."""
    return bias + rate * torch.sign(load.float().mean() - load.float())


@torch.no_grad()
def step_select_bias(ffns, load, rate):
    """One bias_update per MoE layer, in place, from that layer's row of load [L, E]."""
    for f, l in zip(ffns, load):
        f.select_bias.copy_(bias_update(f.select_bias, l.to(f.select_bias.device), rate))
