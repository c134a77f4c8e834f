"""
The ablation study (issue 4): PADD against its baselines and against itself with each stage
taken out, over several seeds, written up as one table, the paper's Figures 2, 4 and 5, and a
plain list of which claims hold at this scale.

The variants, each the last checkpoint of a chain of the existing stage scripts:

    padd            I (cluster) -> II -> III (PR-GRPO) -> IV              s4
    upcycle_grpo    I (random_subsets: upcycling) -> III (GRPO)           s3_grpo_upcycle
    kd_only         I -> II                                               s2
    vanilla_grpo    I -> II -> III (GRPO)                                 s3_grpo
    rspo            I -> II -> III (RSPO)                                 s3_rspo
    no_stage1       I (random experts and router) -> II -> III -> IV      s4_random
    no_stage2       I -> III -> IV                                        s4_nos2
    no_stage3       I -> II -> IV                                         s4_nos3
    no_stage4       I -> II -> III                                        s3_prgrpo

plus the dense teacher every chain starts from, trained once per seed: seed S's chains start
from seed S's teacher. Teachers are not interchangeable at this scale (the same recipe and seed
gave 45.3% on one machine, and 33.6% with two threads and 50.7% with one on another: the
rounding differs), so a claim about student vs teacher has to average over teachers as well, and
each seed's variants share their teacher, so differences between variants stay paired.
Shared prefixes run once per seed, so a seed is 16 subprocesses (NODES below), each
`python <stage script> --preset P --seed S --in ... --out <out>/seed<S>/<node>.pt`. Up to
`--jobs` of them run at once, each single-threaded, and a node starts as soon as its input
checkpoints exist. A node whose checkpoint exists is skipped, so an interrupted study
continues where it stopped (and each script's own `--resume` picks up a half-finished node).

    python ablate.py                          # the study: default preset, seeds 0 1 2
    python ablate.py --quick                  # tiny preset, ~4 min, into out/ablate_quick, results_quick/
    python ablate.py --variants padd kd_only  # only these variants (and what they start from)
    python ablate.py --report-only            # redraw summary, figures and RESULTS.md from the checkpoints

A sweep over one stage's flags is the same runner with `--extra`, into its own folders; with
`--reuse` the nodes the extra flags cannot change (here the teacher, Stages I and II) are
linked from an earlier study instead of recomputed:

    python ablate.py --variants vanilla_grpo rspo no_stage4 --extra stage3="--mu 4" \
        --reuse out/ablate --out out/ablate_mu4 --results results/mu4 --md results/mu4/RESULTS.md

(A write-up in a subfolder of results/ gets a link from RESULTS.md at its next redraw.)

Every `<out>` records its preset and extra flags in `<out>/plan.json`, and a run whose plan
differs is refused: a checkpoint made under other flags would otherwise be skipped as done.
The code is not pinned that way (a fix to a stage should not throw a study away), but every
node's record carries the commit it ran at (`-dirty` with uncommitted changes): resuming an
`<out>` made at another commit warns, RESULTS.md lists the commits when they are mixed, and
summary.json's `commit` is the nodes' commit when they share one.

Writes `<results>/summary.json`, `<results>/figures/*.png` and `--md` (RESULTS.md); every
finished node appends {node, seed, seconds, returncode, commit, time} to `<out>/ablate.jsonl` and its
output to `<out>/seed<S>/<node>.log`.

Deviations and caveats:
- "no Stage I" is `stage1_cluster.py --init random`: fresh random experts and router, but the
  embeddings and attention are still the teacher's and the Stage I warmup still runs (with the
  teacher's clusters defining p_T for the later stages). It removes the clustered init, not
  the whole stage.
- Stage IV is a second, shorter RL phase (bias calibration, then PR-GRPO plus balancing for
  a quarter of Stage III's steps at a smaller lr), so padd gets 1.25 times the RL steps of
  no_stage4, and no_stage3 still gets Stage IV's short RL phase.
- Every seed is evaluated on the same test problems: `--seed` varies the initialisation, the
  batches and the samples, while the suite's splits come from train_teacher.py's `--data-seed`
  (0), which later stages follow.
- The spread reported is the 95% confidence half-width of the mean over seeds (Student t),
  which with 3 seeds is 2.5 standard deviations: wide, on purpose.
"""

import argparse
import concurrent.futures
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time

from tqdm import tqdm

import common
import eval_math

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- the study
# node -> (script, the checkpoint it starts from, extra flags). Stages II-IV also get the
# seed's teacher as --teacher. Checkpoints live in <out>/seed<S>/<node>.pt, the teacher's too.
NODES = {
    "teacher":            ("train_teacher.py",  None,                 []),
    "s1_cluster":         ("stage1_cluster.py", "teacher",            ["--init", "cluster"]),
    "s1_random_subsets":  ("stage1_cluster.py", "teacher",            ["--init", "random_subsets"]),
    "s1_random":          ("stage1_cluster.py", "teacher",            ["--init", "random"]),
    "s2":                 ("stage2_distill.py", "s1_cluster",         []),
    "s2_random":          ("stage2_distill.py", "s1_random",          []),
    "s3_prgrpo":          ("stage3_prgrpo.py",  "s2",                 ["--algo", "prgrpo"]),
    "s3_grpo":            ("stage3_prgrpo.py",  "s2",                 ["--algo", "grpo"]),
    "s3_rspo":            ("stage3_prgrpo.py",  "s2",                 ["--algo", "rspo"]),
    "s3_grpo_upcycle":    ("stage3_prgrpo.py",  "s1_random_subsets",  ["--algo", "grpo"]),
    "s3_prgrpo_nos2":     ("stage3_prgrpo.py",  "s1_cluster",         ["--algo", "prgrpo"]),
    "s3_prgrpo_random":   ("stage3_prgrpo.py",  "s2_random",          ["--algo", "prgrpo"]),
    "s4":                 ("stage4_balance.py", "s3_prgrpo",          []),
    "s4_nos3":            ("stage4_balance.py", "s2",                 []),
    "s4_nos2":            ("stage4_balance.py", "s3_prgrpo_nos2",     []),
    "s4_random":          ("stage4_balance.py", "s3_prgrpo_random",   []),
}

# variant -> (its final node, what it is); padd first, then the baselines, then the ablations
VARIANTS = {
    "padd":         ("s4",              "Stages I-IV (PADD)"),
    "upcycle_grpo": ("s3_grpo_upcycle", "upcycling (random neuron subsets) + GRPO, no distillation"),
    "kd_only":      ("s2",              "Stages I-II: distillation only, no RL"),
    "vanilla_grpo": ("s3_grpo",         "Stages I-II + GRPO"),
    "rspo":         ("s3_rspo",         "Stages I-II + RSPO"),
    "no_stage1":    ("s4_random",       "random experts and router instead of the clustered init"),
    "no_stage2":    ("s4_nos2",         "no distillation: I -> III -> IV"),
    "no_stage3":    ("s4_nos3",         "no PR-GRPO phase: I -> II -> IV"),
    "no_stage4":    ("s3_prgrpo",       "no balancing phase: I -> II -> III"),
}

# --extra names a stage by these; its flags go to every node of that script
STAGES = {"teacher": "train_teacher.py", "stage1": "stage1_cluster.py", "stage2": "stage2_distill.py",
          "stage3": "stage3_prgrpo.py", "stage4": "stage4_balance.py"}

# the Stage III runs whose router-shift curves are Figures 4 and 5
RS_NODES = {"grpo": "s3_grpo", "rspo": "s3_rspo", "prgrpo": "s3_prgrpo"}

# two-sided 95% critical values of Student's t, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

SHORT = {"prealgebra": "prealg", "algebra": "alg", "number_theory": "numth", "counting_probability": "count",
         "geometry": "geom", "intermediate_algebra": "intalg", "precalculus": "precalc"}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, each a full copy of the study")
parser.add_argument("--preset", choices=["tiny", "default"], help="budget preset of every stage (default: default; --quick: tiny)")
parser.add_argument("--out", help="checkpoints and logs (default: out/ablate; --quick: out/ablate_quick)")
parser.add_argument("--results", help="folder for summary.json and figures/ (default: results; --quick: results_quick)")
parser.add_argument("--md", help="the generated write-up (default: RESULTS.md; --quick: RESULTS_quick.md)")
parser.add_argument("--jobs", type=int, default=2, help="subprocesses at once, each with OMP_NUM_THREADS=1")
parser.add_argument("--quick", action="store_true", help="tiny preset into separate folders: checks the machinery in ~4 min")
parser.add_argument("--report-only", action="store_true", help="run nothing; rebuild summary, figures and markdown")
parser.add_argument("--extra", action="append", default=[], metavar="STAGE=FLAGS",
                    help=f'flags added to every node of a stage, e.g. stage3="--mu 4" (stages: {", ".join(STAGES)}); repeatable')
parser.add_argument("--reuse", metavar="DIR", help="link the checkpoints that --extra cannot change from this earlier --out")
parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                    help=f"run and report only these (default: all): {', '.join(VARIANTS)}")


# ----------------------------------------------------------------------------- the plan

def inputs(node):
    """The checkpoints a node reads: its --in and, past Stage I, the teacher."""
    inp = NODES[node][1]
    return [] if inp is None else sorted({inp, "teacher"})


def ancestors(variants):
    """Every node the given variants need, in NODES order (which is a topological order)."""
    need, todo = set(), [VARIANTS[v][0] for v in variants]
    while todo:
        n = todo.pop()
        if n not in need:
            need.add(n)
            todo += inputs(n)
    return [n for n in NODES if n in need]


def height(node):
    """Length of the longest chain of nodes hanging below this one (0 for a leaf)."""
    kids = [n for n in NODES if node in inputs(n)]
    return 1 + max(map(height, kids)) if kids else 0


def ckpt(out, seed, node, ext=".pt"):
    """A node's checkpoint, or with ext its output log (.log) or metrics log (.jsonl): every
    node of seed S, its teacher included, lives in <out>/seed<S>."""
    return os.path.join(out, f"seed{seed}", node + ext)


def jobs_of(nodes, seeds):
    """(node, seed) for every checkpoint the study needs."""
    return [(n, s) for s in seeds for n in nodes]


def command(node, seed, preset, out, extra=None):
    """The node's command line, script first (the caller puts the interpreter in front);
    extra: {script: [flags]} from --extra, added last so that they win."""
    script, inp, flags = NODES[node]
    cmd = [script, "--preset", preset, "--seed", str(seed)]
    if inp is not None:
        cmd += ["--in", ckpt(out, seed, inp)]
    if inp not in (None, "teacher"):
        cmd += ["--teacher", ckpt(out, seed, "teacher")]
    return cmd + ["--out", ckpt(out, seed, node)] + flags + (extra or {}).get(script, [])


def parse_extra(items):
    """--extra's ["stage3=--mu 4", ...] -> {"stage3_prgrpo.py": ["--mu", "4"], ...}."""
    extra = {}
    for item in items:
        stage, sep, flags = item.partition("=")
        if not sep or stage not in STAGES:
            raise common.UserError(f"--extra {item!r}: expected STAGE=FLAGS with STAGE one of {', '.join(STAGES)}")
        extra[STAGES[stage]] = extra.get(STAGES[stage], []) + shlex.split(flags)
    return extra


def touched(node, extra):
    """Whether --extra can change the node's checkpoint: its own script's flags or an input's."""
    return NODES[node][0] in extra or any(touched(i, extra) for i in inputs(node))


def read_plan(out):
    """<out>/plan.json: the preset and --extra flags its checkpoints were made with (None if absent)."""
    path = os.path.join(out, "plan.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_plan(out, plan, write):
    """Refuse an <out> made under another preset or other extra flags (its checkpoints would be
    skipped as done); record the plan in a fresh one when `write`."""
    old = read_plan(out)
    if old is not None and old != plan:
        raise common.UserError(f"{out} was run with {old}, not {plan}: give another --out")
    if old is None and write:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "plan.json"), "w") as f:
            json.dump(plan, f)


def check_reuse(src, preset):
    """--reuse links only from a study of the same preset. Returns that study's extra flags: a
    node they touched is not linked (it is not the plain node this run expects)."""
    old = read_plan(src) or {"preset": preset, "extra": {}}  # studies older than plan.json were plain
    if old["preset"] != preset:
        raise common.UserError(f"--reuse {src} was run with preset {old['preset']}, not {preset}")
    return old["extra"]


def link_reused(nodes, seeds, out, src, extra):
    """Symlink src's checkpoint of every node that no flags in extra can change into out, where
    out has none yet (main passes this run's flags and src's together). Returns how many were linked."""
    n = 0
    for node, seed in jobs_of(nodes, seeds):
        have, dst = ckpt(src, seed, node), ckpt(out, seed, node)
        if not touched(node, extra) and os.path.exists(have) and not os.path.lexists(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.path.abspath(have), dst)
            n += 1
    return n


def schedule(nodes, seeds, out, run_node, jobs, on_done=lambda node, seed, rc, seconds: None):
    """Run every (node, seed) whose checkpoint is missing, at most `jobs` at a time, each once
    its input checkpoints exist. run_node(node, seed) -> exit status, blocking (it runs in a
    worker thread; the real one waits on a subprocess). on_done is called in this thread.
    After a failure nothing new starts, running nodes finish. Returns [(node, seed, rc)] of the
    failures (rc None: it exited 0 but wrote no checkpoint)."""
    pending = [(n, s) for n, s in jobs_of(nodes, seeds) if not os.path.exists(ckpt(out, s, n))]
    # the longest chains first, so the study does not end with one long chain running alone
    pending.sort(key=lambda k: (-height(k[0]), seeds.index(k[1]), nodes.index(k[0])))

    def timed(node, seed):
        t0 = time.time()
        return run_node(node, seed), time.time() - t0

    failed, running = [], {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for key in list(pending):
                if failed or len(running) >= jobs:
                    break
                if all(os.path.exists(ckpt(out, key[1], i)) for i in inputs(key[0])):
                    pending.remove(key)
                    running[pool.submit(timed, *key)] = key
            if not running:
                break  # stopped by a failure: the rest of pending waits on it
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                (node, seed), (rc, seconds) = running.pop(f), f.result()
                on_done(node, seed, rc, seconds)
                if rc != 0 or not os.path.exists(ckpt(out, seed, node)):
                    failed.append((node, seed, rc if rc != 0 else None))
    return failed


def log_tail(path, n=15):
    """The last n lines of a node's log, tqdm's carriage-return redraws collapsed to their last."""
    with open(path, errors="replace", newline="") as f:  # newline="": keep the \r to split on
        lines = [[seg for seg in line.split("\r") if seg.strip()][-1:] for line in f.read().split("\n")]
    return "\n".join([seg for line in lines for seg in line][-n:])


# ----------------------------------------------------------------------------- the numbers

def mean_ci95(xs):
    """Mean and 95% confidence half-width (Student t, n - 1 degrees of freedom) of a sample."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    # between tabled degrees of freedom, the next smaller one's (wider) value; past 30, 1.96
    t = T95[max(d for d in T95 if d <= n - 1)] if n - 1 <= 30 else 1.96
    return m, t * sd / math.sqrt(n)


def mean_per_subdomain(ms):
    subs = dict.fromkeys(s for m in ms for s in m["per_subdomain"])
    return {s: sum(m["per_subdomain"][s] for m in ms if s in m["per_subdomain"]) /
            sum(s in m["per_subdomain"] for m in ms) for s in subs}


def shift_band(curves):
    """Per-seed router-shift curves ([[step, rs], ...]) -> mean and 95% half-width at each step
    every seed logged."""
    steps = sorted(set.intersection(*({int(u) for u, _ in c} for c in curves)))
    at = [{int(u): float(r) for u, r in c} for c in curves]
    band = [mean_ci95([a[u] for a in at]) for u in steps]
    return {"steps": steps, "mean": [m for m, _ in band], "ci95": [h for _, h in band]}


def last_third(steps, values):
    """The values logged after two thirds of the run (Stage III's own summary uses the same
    cut); all of them if that leaves none."""
    cut = 2 * max(steps) / 3
    return [v for u, v in zip(steps, values) if u > cut] or list(values)


def build_summary(metrics, seeds, preset, commit, variants=tuple(VARIANTS)):
    """metrics: {(node, seed): a checkpoint's metrics} for the checkpoints that exist. A variant
    (or router-shift curve) is in the summary once every seed has its checkpoint."""
    def have(node):
        return all((node, s) in metrics for s in seeds)

    def get(node, key):
        vals = []
        for s in seeds:
            if key not in metrics[node, s]:
                raise common.UserError(f"{node} (seed {s}) has no metrics['{key}']: written by an older stage script?")
            vals.append(metrics[node, s][key])
        return vals

    if not have("teacher"):
        raise common.UserError(f"a teacher checkpoint is missing (seeds {seeds})")
    accs = get("teacher", "acc")
    out = {"seeds": list(seeds), "preset": preset, "commit": commit,
           "teacher": {"acc": mean_ci95(accs)[0], "acc_per_seed": accs,
                       "active_params": metrics["teacher", seeds[0]]["active_params"],
                       "total_params": metrics["teacher", seeds[0]]["total_params"]},
           "variants": {}, "router_shift": {}}
    for v in variants:
        node = VARIANTS[v][0]
        if not have(node):
            continue
        accs, vios = get(node, "acc"), get(node, "max_vio")
        get(node, "per_subdomain")  # only to fail with a clear message when it is missing
        out["variants"][v] = {"acc": mean_ci95(accs)[0], "acc_per_seed": accs,
                              "per_subdomain": mean_per_subdomain([metrics[node, s] for s in seeds]),
                              "max_vio": sum(vios) / len(vios),
                              "active_params": metrics[node, seeds[0]]["active_params"],
                              "total_params": metrics[node, seeds[0]]["total_params"]}
    for algo, node in RS_NODES.items():
        if have(node):
            out["router_shift"][algo] = shift_band(get(node, "router_shift_curve"))
    return out


def busy_wall(intervals):
    """Length of the union of (start, end) intervals: the wall clock during which some node was
    running, so the pause of an interrupted and resumed study is not counted."""
    total, reach = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def last_records(jsonl):
    """{(node, seed): the last successful record} of <out>/ablate.jsonl ({} if absent)."""
    last = {}
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            for line in f:
                r = json.loads(line)
                if r["returncode"] == 0:
                    last[r["node"], r["seed"]] = r
    return last


def node_commits(jsonl, keys):
    """{commit: how many of keys' checkpoints were made at it}, from ablate.jsonl. Records older
    than the commit field count as "unrecorded"; checkpoints linked by --reuse have no record."""
    last = last_records(jsonl)
    counts = {}
    for k in keys:
        if k in last:
            c = last[k].get("commit", "unrecorded")
            counts[c] = counts.get(c, 0) + 1
    return counts


def newest_commit(jsonl, keys):
    """The commit of the most recently made of keys' checkpoints (None if none is recorded): the
    code of a mixed study's latest numbers, which summary.json names as its commit."""
    last = last_records(jsonl)
    recs = [last[k] for k in keys if k in last and "commit" in last[k]]
    return max(recs, key=lambda r: r["time"])["commit"] if recs else None


def study_time(jsonl, keys):
    """(sum of node seconds, wall clock, keys without a timing, summed seconds per stage script)
    from the last successful record of each (node, seed) in keys."""
    last = last_records(jsonl)
    timed = [last[k] for k in keys if k in last]
    per_script = {}
    for r in timed:
        script = NODES[r["node"]][0]
        per_script[script] = per_script.get(script, 0.0) + r["seconds"]
    return (sum(r["seconds"] for r in timed), busy_wall([(r["time"] - r["seconds"], r["time"]) for r in timed]),
            [k for k in keys if k not in last], per_script)


def late_gamma(out, seeds):
    """{algo: mean router-shift weight gamma over the last third of Stage III, pooled over seeds;
    a step logs the mean over tokens at its last of mu updates, where the router has moved most}
    from the node logs, for the algorithms that have one (rspo, prgrpo)."""
    res = {}
    for algo in ("rspo", "prgrpo"):
        vals = []
        for s in seeds:
            node = RS_NODES[algo]
            path = ckpt(out, s, node, ".jsonl")
            if os.path.exists(path) and os.path.exists(ckpt(out, s, node)):  # finished runs only
                with open(path) as f:
                    # a resumed run logs its last steps again: the later record of a step wins
                    by_step = {r["step"]: r["gamma"] for r in map(json.loads, f) if "gamma" in r and not r.get("final")}
                if by_step:
                    steps = sorted(by_step)
                    vals += last_third(steps, [by_step[u] for u in steps])
        if vals:
            res[algo] = sum(vals) / len(vals)
    return res


def paired_gaps(summary):
    """{name: (per-seed points of PADD minus it, mean, 95% half-width)} for the teacher and every
    other variant. Seed S's variants share seed S's teacher and Stage I-II checkpoints, so the
    per-seed difference leaves out what the seeds have in common (the teacher's luck, mostly),
    which the per-variant intervals of the main table carry in full."""
    var = summary["variants"]
    if "padd" not in var:
        return {}
    p = var["padd"]["acc_per_seed"]
    out = {}
    for name, d in ({"teacher": summary["teacher"]} | var).items():
        if name != "padd":
            gaps = [100 * (a - b) for a, b in zip(p, d["acc_per_seed"])]
            out[name] = (gaps, *mean_ci95(gaps))
    return out


def problem_gaps(metrics, seeds, variants):
    """{name: (lo, hi)}: eval_math.paired_interval of PADD minus the teacher and each other
    variant, for those whose checkpoints all store per-problem results (older ones do not)."""
    def bits(node):
        got = [metrics.get((node, s), {}).get("correct") for s in seeds]
        return got if all(isinstance(g, str) for g in got) else None
    padd = bits(VARIANTS["padd"][0])
    if padd is None:
        return {}
    out = {}
    for name, node in [("teacher", "teacher")] + [(v, VARIANTS[v][0]) for v in variants if v != "padd"]:
        other = bits(node)
        if other is not None:
            out[name] = eval_math.paired_interval(padd, other)
    return out


def noise_note(by_problem):
    """Which of PADD's gaps to the variants clear the test problems' noise, in words."""
    gaps = {k: v for k, v in by_problem.items() if k != "teacher"}
    if not gaps:
        return ""
    above = [k for k, (lo, _) in gaps.items() if lo > 0]
    below = [k for k, (_, hi) in gaps.items() if hi < 0]
    within = [k for k in gaps if k not in above + below]
    parts = [f"above {', '.join(above)}" if above else "", f"below {', '.join(below)}" if below else "",
             f"within the noise: {', '.join(within)}" if within else ""]
    return "; over the test problems (95%), PADD is " + "; ".join(x for x in parts if x)


def seed_shifts(metrics, seeds):
    """{algo: [each seed's router shift over the last third of Stage III]} (the node's own
    late mean), for the seeds whose node finished: what the paired comparison reads."""
    return {a: [metrics[n, s]["router_shift"] for s in seeds if (n, s) in metrics]
            for a, n in RS_NODES.items() if all((n, s) in metrics for s in seeds)}


def shift_gaps(shifts):
    """{(lo, hi): (each seed's relative gap of lo's late router shift to hi's, in %, then their
    mean and 95% half-width)} for the adjacent pairs of the claimed order prgrpo < rspo < grpo
    that both ran (the pair starts from the same Stage II checkpoint, so the gap is paired)."""
    out = {}
    for lo, hi in (("prgrpo", "rspo"), ("rspo", "grpo")):
        if lo in shifts and hi in shifts:
            rel = [100 * (a - b) / b for a, b in zip(shifts[lo], shifts[hi])]
            out[lo, hi] = (rel, *mean_ci95(rel))
    return out


def paired_shift_text(shifts):
    """Seed by seed, each algorithm's late router shift against the next one's in the claimed
    order, as relative gaps, a count, and their mean with its 95% interval over seeds."""
    parts = [f"{lo} vs {hi} {', '.join(f'{r:+.0f}%' for r in rel)} ({sum(r < 0 for r in rel)} of {len(rel)} below; "
             f"mean {m:+.0f}% ± {h:.0f}%)" for (lo, hi), (rel, m, h) in shift_gaps(shifts).items()]
    return "; per seed, " + "; ".join(parts) if parts else ""


def claims(summary, wall_seconds=None, gamma=None, per_script=None, by_problem=None, shifts=None):
    """The study's targets, judged on the numbers: [(target, "holds" | "does not hold" |
    "not measured", the numbers behind it)]. gamma ({algo: late mean of RSPO's weight}),
    per_script ({script: summed seconds}) and by_problem (problem_gaps) only add to the
    explanation: a verdict is on the means, as the targets are stated. The router-shift order is
    the exception: where shifts (seed_shifts) has two seeds or more, each of its two steps must
    also clear the seeds' noise (the paired relative gaps' 95% interval below 0), since a mean
    gap of 0.4% between RSPO and GRPO once read "holds" with the seeds at -4%, -10% and +14%."""
    out, var, pct = [], summary["variants"], lambda x: f"{100 * x:.1f}%"
    t = summary["teacher"]["acc"]

    def verdict(ok):
        return "holds" if ok else "does not hold"
    if "padd" in var:
        p = var["padd"]["acc"]
        gaps, gm, gh = paired_gaps(summary)["teacher"]  # seed S's PADD was distilled from seed S's teacher
        by_problem = by_problem or {}
        out.append(("PADD >= teacher + 3 points", verdict(p >= t + 0.03),
                    f"PADD {pct(p)} vs teacher {pct(t)} ({100 * (p - t):+.1f} points); per seed, PADD minus its own "
                    f"teacher: {', '.join(f'{g:+.1f}' for g in gaps)} (mean {gm:+.1f} ± {gh:.1f}"
                    + ("; [{:+.1f}, {:+.1f}] over the test problems".format(*by_problem["teacher"]) if "teacher" in by_problem else "")
                    + ")"))
        behind = [f"{v} {pct(d['acc'])}" for v, d in var.items() if v != "padd" and d["acc"] >= p]
        missing = [v for v in VARIANTS if v not in var]
        # one variant at or above PADD settles it; otherwise every one of them has to be there
        out.append(("PADD above every baseline and ablation",
                    "does not hold" if behind else "not measured" if missing else "holds",
                    f"PADD {pct(p)}" + (f"; not above: {', '.join(behind)}" if behind else "")
                    + (f"; not run: {', '.join(missing)}" if missing else "") + noise_note(by_problem)))
        vio = var["padd"]["max_vio"]
        out.append(("PADD MaxVio <= 0.2", verdict(vio <= 0.2), f"MaxVio {vio:.3f}"))
    else:
        out += [(c, "not measured", "padd was not run") for c in
                ("PADD >= teacher + 3 points", "PADD above every baseline and ablation", "PADD MaxVio <= 0.2")]
    rs = summary["router_shift"]
    if all(a in rs for a in ("prgrpo", "rspo", "grpo")):
        late = {}
        for a in ("prgrpo", "rspo", "grpo"):
            vals = last_third(rs[a]["steps"], rs[a]["mean"])
            late[a] = sum(vals) / len(vals)
        text = ", ".join(f"{a} {late[a]:.4f}" for a in ("prgrpo", "rspo", "grpo")) + paired_shift_text(shifts or {})
        if gamma:
            text += "; mean RSPO weight gamma over the last third (each step's last of its mu updates): " + ", ".join(f"{a} {g:.4f}" for a, g in gamma.items())
            if "rspo" in gamma and 1 - gamma["rspo"] < 0.01:
                text += (" (within 1% of 1: between a rollout and its updates the router barely moves, so"
                         " RSPO reweights its tokens by under 1% on average and stays close to GRPO)")
        noisy = [f"{lo} vs {hi}" for (lo, hi), (rel, m, h) in shift_gaps(shifts or {}).items()
                 if len(rel) > 1 and m + h >= 0]
        if noisy:
            text += f"; within the seeds' noise: {', '.join(noisy)}"
        out.append(("router shift over the last third: PR-GRPO < RSPO < GRPO",
                    verdict(late["prgrpo"] < late["rspo"] < late["grpo"] and not noisy), text))
    else:
        out.append(("router shift over the last third: PR-GRPO < RSPO < GRPO", "not measured",
                    f"curves for {', '.join(rs) or 'none'} of grpo, rspo, prgrpo"))
    if wall_seconds is None:
        out.append(("study wall time <= 60 min", "not measured", "the study is incomplete or has untimed nodes"))
    elif len(summary["seeds"]) < 3:  # the target is for the whole study, 3 seeds at least
        out.append(("study wall time <= 60 min", "not measured",
                    f"{wall_seconds / 60:.1f} min wall clock for {len(summary['seeds'])} seed(s); the study is 3"))
    else:
        text = f"{wall_seconds / 60:.1f} min wall clock"
        if per_script:
            total = sum(per_script.values())
            text += "; node time by script: " + ", ".join(
                f"{k.removesuffix('.py')} {v / 60:.0f} min ({100 * v / total:.0f}%)"
                for k, v in sorted(per_script.items(), key=lambda kv: -kv[1]))
        out.append(("study wall time <= 60 min", verdict(wall_seconds <= 3600), text))
    return out


# ----------------------------------------------------------------------------- figures

def plot_all(summary, metrics, fig_dir):
    """Draw whatever the checkpoints allow; returns {name: path} of the figures written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(fig_dir, exist_ok=True)
    seeds, var, figs = summary["seeds"], summary["variants"], {}
    s0 = seeds[0]

    def save(fig, name):
        figs[name] = os.path.join(fig_dir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(figs[name], dpi=120)
        plt.close(fig)

    # Figure 2: overall accuracy per variant, per-seed dots and 95% bars; then per subdomain
    rows = {"teacher": summary["teacher"]} | var
    sub_of = ({"teacher": mean_per_subdomain([metrics["teacher", s] for s in seeds])}
              | {v: d["per_subdomain"] for v, d in var.items()})
    subs = list(dict.fromkeys(s for d in sub_of.values() for s in d))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 8))
    colour = {name: "0.4" if name == "teacher" else f"C{i % 10}" for i, name in enumerate(rows)}  # same in both panels
    for i, (name, d) in enumerate(rows.items()):
        m, h = mean_ci95(d["acc_per_seed"])
        a1.bar(i, 100 * m, color=colour[name])
        a1.errorbar(i, 100 * m, yerr=100 * h, color="k", capsize=4)
        a1.plot([i] * len(d["acc_per_seed"]), [100 * a for a in d["acc_per_seed"]], "o", color="k", ms=3)
    a1.set_xticks(range(len(rows)), list(rows), rotation=20)
    a1.set_ylabel("test pass@1 (%)")
    a1.set_title(f"accuracy, mean over seeds {seeds} (dots: seeds, bars: 95% CI)")
    w = 0.8 / len(rows)
    for i, name in enumerate(rows):
        a2.bar([j + (i - (len(rows) - 1) / 2) * w for j in range(len(subs))],
               [100 * sub_of[name].get(s, 0) for s in subs], w, label=name, color=colour[name])
    a2.set_xticks(range(len(subs)), [SHORT.get(s, s) for s in subs])
    a2.set_ylabel("test pass@1 (%)")
    a2.legend(ncol=5, fontsize=7)
    save(fig, "ablation_bars")

    # subdomain x expert share: the teacher's clusters, the student after Stage I, after Stage IV
    maps = []
    if ("s1_cluster", s0) in metrics:
        m = metrics["s1_cluster", s0]
        maps += [("teacher clusters (mean p_T)", m.get("teacher_heatmap")), ("student after Stage I", m.get("heatmap"))]
    if ("s4", s0) in metrics:
        maps.append(("student after Stage IV", metrics["s4", s0].get("heatmap")))
    maps = [(t, h) for t, h in maps if h]
    if maps:
        fig, axes = plt.subplots(1, len(maps), figsize=(4.5 * len(maps), 4), squeeze=False)
        for ax, (title, h) in zip(axes[0], maps):
            names = list(h)
            im = ax.imshow([h[s] for s in names], aspect="auto", cmap="viridis")
            ax.set_yticks(range(len(names)), [SHORT.get(s, s) for s in names])
            ax.set_xlabel("expert")
            ax.set_title(f"{title}, seed {s0}", fontsize=9)
            fig.colorbar(im, ax=ax)
        save(fig, "heatmaps")

    # Figures 4 and 5: router shift along Stage III, and its distribution late in the run
    rs = summary["router_shift"]
    if rs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for algo, d in rs.items():
            ax.plot(d["steps"], d["mean"], label=algo)
            ax.fill_between(d["steps"], [m - h for m, h in zip(d["mean"], d["ci95"])],
                            [m + h for m, h in zip(d["mean"], d["ci95"])], alpha=0.25)
        ax.set_xlabel("Stage III step")
        ax.set_ylabel("router shift")
        ax.set_title(f"router shift, mean and 95% CI over seeds {seeds}", fontsize=9)
        ax.legend()
        save(fig, "router_shift")
        fig, ax = plt.subplots(figsize=(6, 4))
        for algo in rs:
            curves = [metrics[RS_NODES[algo], s]["router_shift_curve"] for s in seeds]
            pooled = sorted(v for c in curves for v in last_third([u for u, _ in c], [r for _, r in c]))
            ax.step([pooled[0]] + pooled, [i / len(pooled) for i in range(len(pooled) + 1)], where="post", label=algo)
        ax.set_xlabel("router shift (last third of steps, all seeds)")
        ax.set_ylabel("fraction of probes")
        ax.legend()
        save(fig, "router_shift_ecdf")

    # what Stage IV changes: each expert's share of the routed tokens, per layer
    runs = {name: metrics[node, s0] for name, node in (("no_stage4", "s3_prgrpo"), ("padd", "s4"))
            if (node, s0) in metrics and "expert_load" in metrics[node, s0]}
    if runs:
        n_layer = len(next(iter(runs.values()))["expert_load"])
        fig, axes = plt.subplots(1, n_layer, figsize=(4 * n_layer, 3.5), squeeze=False)
        for layer, ax in enumerate(axes[0]):
            for i, (name, m) in enumerate(runs.items()):
                c = m["expert_load"][layer]
                vio = m.get("max_vio_per_layer")
                ax.bar([e + (i - 0.5) * 0.4 for e in range(len(c))], [x / sum(c) for x in c], 0.4,
                       label=f"{name}, MaxVio {vio[layer]:.2f}" if vio else name)
            ax.axhline(1 / len(c), color="k", ls="--", lw=0.8)
            ax.set_title(f"layer {layer}, seed {s0}", fontsize=9)
            ax.set_xlabel("expert")
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("share of assignments")
        save(fig, "expert_load")
    return figs


# ----------------------------------------------------------------------------- RESULTS.md

def markdown(summary, metrics, verdicts, cmd_line, node_cmds, times, figs, md_path, sweeps=(), by_problem=None,
             made_at=None):
    """The write-up; by_problem (problem_gaps) fills the paired table's last column; made_at
    (node_commits) is said when the checkpoints come from more than one commit."""
    seeds, var = summary["seeds"], summary["variants"]
    subs = list(dict.fromkeys(s for d in var.values() for s in d["per_subdomain"]))
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    node_seconds, wall, untimed, _ = times
    L = ["# Ablation study", "",
         f"Generated by `ablate.py` from checkpoints of commit `{summary['commit']}` (the newest, where they span several), preset `{summary['preset']}`, seeds {seeds}. "
         "Greedy pass@1 on the suite's test split, in percent; ± is the 95% confidence half-width of the mean "
         "over seeds (Student t).", "",
         "## Commands", "", "```bash", cmd_line, "```", "",
         f"which runs, for each seed S (shown for S = {seeds[0]}; each also gets `--log <out>/seed<S>/<node>.jsonl --resume`):", "",
         "```bash", *node_cmds, "```", "",
         f"Wall time: {wall / 60:.1f} min wall clock, {node_seconds / 60:.1f} min summed over nodes"
         + (f" ({len(untimed)} checkpoints have no timing in ablate.jsonl)" if untimed else "")
         + (" (nodes made at more than one commit, so in more than one run: the wall clock is the union "
            "of their runs' intervals, not one run's)" if made_at and len(made_at) > 1 else "") + ".", ""]
    if made_at and (len(made_at) > 1 or any(c.endswith("-dirty") for c in made_at)):
        L += ["Checkpoints made at: " + ", ".join(f"`{c}` ({n})" for c, n in made_at.items())
              + " (plan.json pins the flags, not the code).", ""]
    L += ["## Results", "",
         "| variant | what | acc | seeds | " + " | ".join(SHORT.get(s, s) for s in subs) + " | MaxVio | active | total |",
         "|---|---|---|---|" + "---|" * len(subs) + "---|---|---|"]
    t = summary["teacher"]
    t_sub = mean_per_subdomain([metrics["teacher", s] for s in seeds])
    L.append(f"| teacher | dense, one per seed | {pct(t['acc'])} ± {pct(mean_ci95(t['acc_per_seed'])[1])} | "
             + " ".join(pct(a) for a in t["acc_per_seed"]) + " | "
             + " | ".join(pct(t_sub[s]) if s in t_sub else "" for s in subs)
             + f" | | {t['active_params']:,} | {t['total_params']:,} |")
    for v, d in var.items():
        L.append(f"| {v} | {VARIANTS[v][1]} | {pct(d['acc'])} ± {pct(mean_ci95(d['acc_per_seed'])[1])} | "
                 + " ".join(pct(a) for a in d["acc_per_seed"]) + " | "
                 + " | ".join(pct(d["per_subdomain"].get(s, 0)) for s in subs)
                 + f" | {d['max_vio']:.3f} | {d['active_params']:,} | {d['total_params']:,} |")
    missing = [v for v in VARIANTS if v not in var]
    if missing:
        L += ["", f"Not run, or not for every seed: {', '.join(missing)}."]
    L += ["", "MaxVio: max_e load_e / mean_e load_e - 1 on the test generations, mean over layers and seeds.", ""]
    gaps = paired_gaps(summary)
    by_problem = by_problem or {}
    if gaps:
        L += ["PADD minus each variant, seed by seed (points; the same seed shares its teacher and, where the "
              "chains overlap, its Stage I-II checkpoints, so these differences are paired and their interval "
              "leaves out the spread the seeds have in common). The last column resamples the test problems "
              "instead, models fixed: the noise of this test set, not of training (`eval_math.paired_interval`). "
              "A gap is a finding only when neither interval holds 0.", "",
              "| PADD minus | per seed | mean ± 95% over seeds | 95% over test problems |", "|---|---|---|---|"]
        L += [f"| {name} | {' '.join(f'{g:+.1f}' for g in gs)} | {m:+.1f} ± {h:.1f} | "
              + (f"[{by_problem[name][0]:+.1f}, {by_problem[name][1]:+.1f}]" if name in by_problem else "not stored")
              + " |" for name, (gs, m, h) in gaps.items()]
        L.append("")
    captions = {"ablation_bars": "Accuracy per variant and per subdomain (the paper's Figure 2).",
                "heatmaps": f"Subdomain x expert share of routed tokens, seed {seeds[0]}: the teacher's clusters "
                            "(mean p_T), the student after Stage I and (once padd has run) after Stage IV.",
                "router_shift": "Router shift along Stage III, mean and 95% band over seeds (Figure 4).",
                "router_shift_ecdf": "Distribution of router shift over the last third of Stage III, "
                                     "pooled over seeds (Figure 5).",
                "expert_load": "Each expert's share of the routed tokens per layer, before (no_stage4) and "
                               "after (padd) Stage IV; the dashed line is an even load."}
    if figs:
        L += ["## Figures", ""]
        for name, path in figs.items():
            rel = os.path.relpath(path, os.path.dirname(os.path.abspath(md_path)))
            L += [captions[name], "", f"![{name}]({rel})", ""]
    L += ["## Claims at this scale", "",
          f"Judged on the means over seeds {seeds}; the ± in the table says how much of a gap is noise.", ""]
    for target, verdict, numbers in verdicts:
        L.append(f"- {target}: {verdict} ({numbers}).")
    if sweeps:
        L += ["", "## Earlier studies and sweeps", "",
              "Earlier studies (results/<commit>/) and sweeps over a stage's flags (`--extra`), each written "
              "up on its own with the commit it ran at:", ""]
        for path in sweeps:
            rel = os.path.relpath(path, os.path.dirname(os.path.abspath(md_path)))
            L.append(f"- [{rel}]({rel})")
    return "\n".join(L) + "\n"


def git_commit(dirty=False):
    """HEAD's sha ("unknown" outside a git checkout); with dirty, "-dirty" appended when a tracked
    file differs from it, since then the checkpoints come from code no commit holds."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, timeout=10)
        sha = r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "unknown"
        if dirty and sha != "unknown":
            d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10)
            sha += "-dirty" if d.stdout.strip() else ""
        return sha
    except OSError:
        return "unknown"


# ----------------------------------------------------------------------------- main

def main():
    args = parser.parse_args()
    if args.quick and args.preset == "default":
        raise common.UserError("--quick runs the tiny preset; drop --preset default")
    if args.jobs < 1:
        raise common.UserError("--jobs must be at least 1")
    q = args.quick
    args.preset = args.preset or ("tiny" if q else "default")
    args.out = args.out or ("out/ablate_quick" if q else "out/ablate")
    args.results = args.results or ("results_quick" if q else "results")
    args.md = args.md or ("RESULTS_quick.md" if q else "RESULTS.md")
    seeds = list(dict.fromkeys(args.seeds))
    variants = args.variants or list(VARIANTS)
    nodes = ancestors(variants)
    jsonl = os.path.join(args.out, "ablate.jsonl")
    keys = jobs_of(nodes, seeds)
    extra = parse_extra(args.extra)
    plan = {"preset": args.preset, "extra": extra}
    check_plan(args.out, plan, write=not args.report_only)
    if args.reuse:
        if not os.path.isdir(args.reuse) or os.path.abspath(args.reuse) == os.path.abspath(args.out):
            raise common.UserError(f"--reuse {args.reuse}: not a folder other than --out")
        # neither run's flags may touch a linked node: a plain study lends its Stage II to a
        # Stage III sweep, and a Stage III sweep lends its Stage II back to a plain run
        untouched = extra | check_reuse(args.reuse, args.preset)

    if not args.report_only:
        head = git_commit(dirty=True)
        stale = {c: n for c, n in node_commits(jsonl, keys).items() if c != head}
        if stale:
            # plan.json pins the flags, not the code: a stage changed since would be mixed in silently
            print(f"warning: {args.out} holds checkpoints made at other commits ("
                  + ", ".join(f"{n} at {c[:12]}" for c, n in stale.items()) + f") than {head[:12]}; "
                  "they are kept as done (give another --out to redo them)", file=sys.stderr)
        if args.reuse:
            print(f"linked {link_reused(nodes, seeds, args.out, args.reuse, untouched)} checkpoints from {args.reuse}")
        # single-threaded processes side by side: at our matrix sizes two processes on two
        # cores get more done than one process with two threads. Every node gets one thread,
        # whatever runs beside it, so a node's numbers do not depend on the schedule.
        env = dict(os.environ, OMP_NUM_THREADS="1")
        todo = sum(not os.path.exists(ckpt(args.out, s, n)) for n, s in keys)
        print(f"{len(keys)} checkpoints for {len(seeds)} seed(s), {len(keys) - todo} done already, {todo} to run")
        bar = tqdm(total=todo, desc="ablate", unit="node", disable=not todo)

        def run_node(node, seed):
            script, *rest = command(node, seed, args.preset, args.out, extra)
            os.makedirs(os.path.dirname(ckpt(args.out, seed, node)), exist_ok=True)
            # a metrics log per node (the three Stage III runs of a seed would otherwise share
            # stage3.jsonl), and --resume so a node killed halfway continues from its last save
            rest += ["--log", ckpt(args.out, seed, node, ".jsonl"), "--resume"]
            with open(ckpt(args.out, seed, node, ".log"), "w") as f:
                return subprocess.run([sys.executable, os.path.join(HERE, script)] + rest, stdout=f,
                                      stderr=subprocess.STDOUT, env=env).returncode

        def on_done(node, seed, rc, seconds):
            common.append_jsonl(jsonl, dict(node=node, seed=seed, seconds=round(seconds, 1), returncode=rc, commit=head))
            bar.update(1)
            bar.write(f"{'done' if rc == 0 else 'FAILED'} seed {seed} {node} ({seconds:.0f} s)")

        failed = schedule(nodes, seeds, args.out, run_node, args.jobs, on_done)
        bar.close()
        for node, seed, rc in failed:
            log = ckpt(args.out, seed, node, ".log")
            print(f"--- {node} (seed {seed}), the end of {log}:\n{log_tail(log)}", file=sys.stderr)
        if failed:
            node, seed, rc = failed[0]
            raise common.UserError(f"{node} (seed {seed}) " + (f"exited with status {rc}" if rc is not None else
                                   "wrote no checkpoint") + f"; see {ckpt(args.out, seed, node, '.log')}")

    metrics = {(n, s): common.load_checkpoint(ckpt(args.out, s, n))["metrics"]
               for n, s in keys if os.path.exists(ckpt(args.out, s, n))}
    if not metrics:
        raise common.UserError(f"no checkpoints under {args.out}/seed*/ for seeds {seeds}; run without --report-only first")
    made_at = node_commits(jsonl, keys)
    # the sha the numbers come from: the one commit every recorded node ran at; in a study
    # redone in parts, the newest node's (RESULTS.md lists them all); HEAD's if none is recorded
    commit = newest_commit(jsonl, keys) or git_commit()
    summary = build_summary(metrics, seeds, args.preset, commit, variants)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    figs = plot_all(summary, metrics, os.path.join(args.results, "figures"))

    times = study_time(jsonl, keys)
    complete = len(summary["variants"]) == len(VARIANTS) and not times[2]
    by_problem = problem_gaps(metrics, seeds, summary["variants"])
    verdicts = claims(summary, times[1] if complete else None, late_gamma(args.out, seeds), times[3], by_problem,
                      seed_shifts(metrics, seeds))
    shown = [a for a in sys.argv[1:] if a != "--report-only"]
    cmd_line = " ".join(["python ablate.py"] + [shlex.quote(a) for a in shown])
    node_cmds = [" ".join(["python"] + [shlex.quote(a) for a in command(n, seeds[0], args.preset, args.out, extra)])
                 for n in nodes]
    with open(args.md, "w") as f:
        # sweeps written into subfolders of --results (e.g. results/mu4/RESULTS.md) get a link
        sweeps = sorted(p for p in glob.glob(os.path.join(args.results, "*", "RESULTS.md"))
                        if os.path.abspath(p) != os.path.abspath(args.md))
        f.write(markdown(summary, metrics, verdicts, cmd_line, node_cmds, times, figs, args.md, sweeps, by_problem,
                         made_at))
    print(f"wrote {os.path.join(args.results, 'summary.json')}, {len(figs)} figures in "
          f"{os.path.join(args.results, 'figures')}, {args.md}")
    for target, verdict, numbers in verdicts:
        print(f"  {target}: {verdict} ({numbers})")


if __name__ == "__main__":
    common.run(main)
