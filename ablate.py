"""
The ablation study: PADD against its baselines and against itself with each stage taken out,
and the Stage III algorithms side by side with and without a rollout/update mismatch, over
several seeds, written up (report.py) as tables, the paper's Figures 2, 4 and 5, the drift
figures and a plain list of which claims hold at this scale.

The variants, each the last checkpoint of a chain of the existing stage scripts:

    padd            I (cluster) -> II -> III (PR-GRPO) -> IV              s4
    upcycle_grpo    I (random_subsets: upcycling) -> III (GRPO)           s3_grpo_upcycle
    kd_only         I -> II                                               s2
    vanilla_grpo    I -> II -> III (GRPO); gspo, r3, rspo alike           s3_grpo, s3_gspo, ...
    no_stage1       I (random experts and router) -> II -> III -> IV      s4_random
    no_stage2       I -> III -> IV                                        s4_nos2
    no_stage3       I -> II -> IV                                         s4_nos3
    no_stage4       I -> II -> III                                        s3_prgrpo
    <x>_mismatch    vanilla_grpo, gspo, r3, rspo, PR-GRPO with rollouts   s3_<algo>_mm
                    from a policy 2 steps old, in bf16 (report.MISMATCH)

plus the dense teacher every chain starts from, trained once per seed: seed S's chains start
from seed S's teacher. Teachers are not interchangeable at this scale (thread count and machine
change their rounding, see docs/journal.md), so a claim about student vs teacher has to average
over teachers as well, and each seed's variants share their teacher, so differences between
variants stay paired.
Shared prefixes run once per seed, so a seed is 23 subprocesses (NODES, in report.py), each
`python <stage script> --preset P --seed S --in ... --out <out>/seed<S>/<node>.pt`. Up to
`--jobs` of them run at once, each single-threaded, and a node starts as soon as its input
checkpoints exist. A node whose checkpoint is done is skipped, so an interrupted study
continues where it stopped (and each script's own `--resume` picks up a half-finished node):
done means it loads and the digests of the inputs it records (`made_from`) are those of its
inputs now, so a node whose teacher or student was remade, or whose file was cut off, runs
again, and so does everything below it.

    python ablate.py                          # the study: default preset, seeds 0 1 2
    python ablate.py --quick                  # tiny preset, into out/ablate_quick, results_quick/
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
finished node appends {node, seed, seconds, returncode, commit, time} to `<out>/ablate.jsonl`
and its output to `<out>/seed<S>/<node>.log`.

Deviations and caveats:
- "no Stage I" is `stage1_cluster.py --init random`: fresh random experts and router, but the
  embeddings and attention are still the teacher's and the Stage I warmup still runs (with the
  teacher's clusters defining p_T for the later stages). It removes the clustered init, not
  the whole stage.
- Stage IV is a second, shorter RL phase (bias calibration, then PR-GRPO plus balancing for
  a quarter of Stage III's steps at a smaller lr), so padd gets 1.25 times the RL steps of
  no_stage4, and no_stage3 still gets Stage IV's short RL phase.
- Every seed is evaluated on the same test problems: `--seed` varies the initialisation, the
  batches and the samples; the splits follow train_teacher.py's `--data-seed` (0).
- The spread reported is the 95% confidence half-width of the mean over seeds (Student t),
  which with 3 seeds is 2.5 standard deviations: wide, on purpose.
"""

import argparse
import concurrent.futures
import glob
import json
import os
import shlex
import subprocess
import sys
import time

from tqdm import tqdm

import common
from report import (NODES, VARIANTS, build_summary, ckpt, claims, late_gamma, markdown, newest_commit,
                    node_commits, plot_all, problem_gaps, seed_shifts, study_time, teacher_counts)

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------- the study
# the nodes (NODES), the variants (VARIANTS) and where their checkpoints live (ckpt) are in
# report.py, which reads them too; this file runs them

# --extra names a stage by these; its flags go to every node of that script
STAGES = {"teacher": "train_teacher.py", "stage1": "stage1_cluster.py", "stage2": "stage2_distill.py",
          "stage3": "stage3_prgrpo.py", "stage4": "stage4_balance.py"}

parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds, each a full copy of the study")
parser.add_argument("--preset", choices=["tiny", "default"], help="budget preset of every stage (default: default; --quick: tiny)")
parser.add_argument("--out", help="checkpoints and logs (default: out/ablate; --quick: out/ablate_quick)")
parser.add_argument("--results", help="folder for summary.json and figures/ (default: results; --quick: results_quick)")
parser.add_argument("--md", help="the generated write-up (default: RESULTS.md; --quick: RESULTS_quick.md)")
parser.add_argument("--jobs", type=int, default=2, help="subprocesses at once, each with OMP_NUM_THREADS=1")
parser.add_argument("--quick", action="store_true", help="tiny preset into separate folders: checks the machinery")
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
    plan = common.read_json(path)
    if not (isinstance(plan, dict) and isinstance(plan.get("preset"), str) and isinstance(plan.get("extra"), dict)):
        raise common.UserError(f"{path} is not a plan (a preset and extra flags); mend or remove it")
    return plan


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


def exists(out):
    return lambda node, seed: os.path.exists(ckpt(out, seed, node))


def node_inputs(out, seed, node):
    """{"in": path, "teacher": path} of the checkpoints a node reads, keyed as its `made_from`
    (Stage I reads only the teacher, as --in; the teacher reads none)."""
    inp = NODES[node][1]
    if inp is None:
        return {}
    paths = {"in": ckpt(out, seed, inp)}
    if inp != "teacher":
        paths["teacher"] = ckpt(out, seed, "teacher")
    return paths


def node_done(out):
    """done(node, seed): the node's checkpoint loads and was made from its inputs as they are
    now (the digests in its `made_from`; a checkpoint without them: not older than its inputs)."""
    digests = {}

    def digest(path):
        key = (os.path.realpath(path), os.path.getmtime(path), os.path.getsize(path))
        if key not in digests:
            digests[key] = common.file_digest(path)
        return digests[key]

    def done(node, seed):
        path = ckpt(out, seed, node)
        if not os.path.exists(path):
            return False
        try:
            have = common.load_checkpoint(path)
        except common.UserError as e:
            print(f"warning: {e}; running {node} (seed {seed}) again", file=sys.stderr)
            return False
        paths = node_inputs(out, seed, node)
        if not paths:
            return True
        if not all(os.path.exists(p) for p in paths.values()):
            return False
        if "made_from" not in have:
            return all(os.path.getmtime(p) <= os.path.getmtime(path) for p in paths.values())
        if have["made_from"] != {k: digest(p) for k, p in paths.items()}:
            print(f"warning: {path} was made from other inputs than those in {out}/seed{seed} now; "
                  "running it again", file=sys.stderr)
            return False
        return True
    return done


def pending_jobs(nodes, seeds, done):
    """The (node, seed) to run: those not done, and every node below one of them (its inputs
    will change)."""
    pending = []
    for n, s in jobs_of(nodes, seeds):  # nodes in NODES order: an input comes before its users
        if any((i, s) in pending for i in inputs(n)) or not done(n, s):
            pending.append((n, s))
    return pending


def schedule(nodes, seeds, out, run_node, jobs, on_done=lambda node, seed, rc, seconds: None, done=None):
    """Run every (node, seed) that is not done (done(node, seed); default: its checkpoint
    exists), at most `jobs` at a time, each once its inputs are done. run_node(node, seed) ->
    exit status, blocking (it runs in a worker thread; the real one waits on a subprocess).
    on_done is called in this thread. After a failure nothing new starts, running nodes
    finish. Returns [(node, seed, rc)] of the failures (rc None: it exited 0 but wrote no
    checkpoint)."""
    done = done or exists(out)
    pending = pending_jobs(nodes, seeds, done)
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
                if not any((i, key[1]) in pending or (i, key[1]) in running.values() for i in inputs(key[0])):
                    pending.remove(key)
                    running[pool.submit(timed, *key)] = key
            if not running:
                break  # stopped by a failure: the rest of pending waits on it
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for f in finished:
                (node, seed), (rc, seconds) = running.pop(f), f.result()
                on_done(node, seed, rc, seconds)
                if rc != 0 or not done(node, seed):
                    failed.append((node, seed, rc if rc != 0 else None))
    return failed


def log_tail(path, n=15):
    """The last n lines of a node's log, tqdm's carriage-return redraws collapsed to their last."""
    with open(path, errors="replace", newline="") as f:  # newline="": keep the \r to split on
        lines = [[seg for seg in line.split("\r") if seg.strip()][-1:] for line in f.read().split("\n")]
    return "\n".join([seg for line in lines for seg in line][-n:])


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


def drop_stale_resume(path, seed, node, out=None):
    """A node's resume file left by a run from other inputs (its teacher was remade since) is
    the study's own leftover: removed, so the node starts afresh instead of being refused."""
    if not os.path.exists(path):
        return
    out = out or os.path.dirname(os.path.dirname(path))
    now = {k: common.file_digest(p) for k, p in node_inputs(out, seed, node).items()}
    try:
        stale = common.load_checkpoint(path).get("made_from", now) != now
    except common.UserError:
        stale = True
    if stale:
        print(f"warning: {path} is from other inputs; {node} (seed {seed}) starts afresh", file=sys.stderr)
        os.remove(path)


# ----------------------------------------------------------------------------- main

def main():
    args = parser.parse_args()
    if args.quick and args.preset == "default":
        raise common.UserError("--quick runs the tiny preset; drop --preset default")
    if args.jobs < 1:
        raise common.UserError("--jobs must be at least 1")
    if min(args.seeds) < 0:
        raise common.UserError(f"--seeds {min(args.seeds)}: seeds must be at least 0")
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
        done = node_done(args.out)
        todo = len(pending_jobs(nodes, seeds, done))
        print(f"{len(keys)} checkpoints for {len(seeds)} seed(s), {len(keys) - todo} done already, {todo} to run")
        bar = tqdm(total=todo, desc="ablate", unit="node", disable=not todo)

        def run_node(node, seed):
            script, *rest = command(node, seed, args.preset, args.out, extra)
            os.makedirs(os.path.dirname(ckpt(args.out, seed, node)), exist_ok=True)
            # a metrics log per node (the three Stage III runs of a seed would otherwise share
            # stage3.jsonl), and --resume so a node killed halfway continues from its last save
            rest += ["--log", ckpt(args.out, seed, node, ".jsonl"), "--resume"]
            drop_stale_resume(ckpt(args.out, seed, node) + ".resume.pt", seed, node)
            with open(ckpt(args.out, seed, node, ".log"), "w") as f:
                return subprocess.run([sys.executable, os.path.join(HERE, script)] + rest, stdout=f,
                                      stderr=subprocess.STDOUT, env=env).returncode

        def on_done(node, seed, rc, seconds):
            common.append_jsonl(jsonl, dict(node=node, seed=seed, seconds=round(seconds, 1), returncode=rc, commit=head))
            bar.update(1)
            bar.write(f"{'done' if rc == 0 else 'FAILED'} seed {seed} {node} ({seconds:.0f} s)")

        failed = schedule(nodes, seeds, args.out, run_node, args.jobs, on_done, done)
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
    # the teacher's own routing costs a generation per seed (cached): only where padd's chain ran
    counts = teacher_counts(args.out, seeds, metrics) if "padd" in variants else {}
    summary = build_summary(metrics, seeds, args.preset, commit, variants, counts)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "summary.json"), "w") as f:
        json.dump(common.strict(summary), f, indent=1, allow_nan=False)
    figs = plot_all(summary, metrics, os.path.join(args.results, "figures"))

    times = study_time(jsonl, keys)
    complete = len(summary["variants"]) == len(VARIANTS) and not times[2]
    by_problem = problem_gaps(metrics, seeds, summary["variants"])
    by_problem_sampled = problem_gaps(metrics, seeds, summary["variants"], sampled=True)
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
                         made_at, by_problem_sampled))
    print(f"wrote {os.path.join(args.results, 'summary.json')}, {len(figs)} figures in "
          f"{os.path.join(args.results, 'figures')}, {args.md}")
    for target, verdict, numbers in verdicts:
        print(f"  {target}: {verdict} ({numbers})")


if __name__ == "__main__":
    common.run(main)
