"""
The ablation study's nodes and variants, where their checkpoints live, and what turns the
finished checkpoints into the write-up: `<results>/summary.json`, the figures and RESULTS.md
(the numbers, the paired gaps, the verdicts on the claims). ablate.py runs the study and calls
this; nothing here starts a process.
"""

import json
import math
import os

import common
import eval_math
import specialisation

# the earlier studies and sweeps, each with the commit that holds its folder
JOURNAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "journal.md")

# ----------------------------------------------------------------------------- the study
# the rollout/update mismatch of asynchronous, lower-precision inference engines
MISMATCH = ["--lag", "2", "--rollout-dtype", "bf16"]

# the Stage III algorithms compared from the same Stage II checkpoints, each also under MISMATCH
ALGOS = ("grpo", "gspo", "r3", "rspo", "prgrpo")

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
    "s3_gspo":            ("stage3_prgrpo.py",  "s2",                 ["--algo", "gspo"]),
    "s3_r3":              ("stage3_prgrpo.py",  "s2",                 ["--algo", "r3"]),
    "s3_grpo_mm":         ("stage3_prgrpo.py",  "s2",                 ["--algo", "grpo"] + MISMATCH),
    "s3_gspo_mm":         ("stage3_prgrpo.py",  "s2",                 ["--algo", "gspo"] + MISMATCH),
    "s3_r3_mm":           ("stage3_prgrpo.py",  "s2",                 ["--algo", "r3"] + MISMATCH),
    "s3_rspo_mm":         ("stage3_prgrpo.py",  "s2",                 ["--algo", "rspo"] + MISMATCH),
    "s3_prgrpo_mm":       ("stage3_prgrpo.py",  "s2",                 ["--algo", "prgrpo"] + MISMATCH),
    "s3_grpo_upcycle":    ("stage3_prgrpo.py",  "s1_random_subsets",  ["--algo", "grpo", "--w-distill", "0", "--w-gold", "0"]),
    "s3_prgrpo_nos2":     ("stage3_prgrpo.py",  "s1_cluster",         ["--algo", "prgrpo"]),
    "s3_prgrpo_random":   ("stage3_prgrpo.py",  "s2_random",          ["--algo", "prgrpo"]),
    "s4":                 ("stage4_balance.py", "s3_prgrpo",          []),
    "s4_nos3":            ("stage4_balance.py", "s2",                 []),
    "s4_nos2":            ("stage4_balance.py", "s3_prgrpo_nos2",     []),
    "s4_random":          ("stage4_balance.py", "s3_prgrpo_random",   []),
}

# variant -> (its final node, what it is); padd first, then the baselines, then the ablations,
# then the RL algorithms under the mismatch
VARIANTS = {
    "padd":         ("s4",              "Stages I-IV (PADD)"),
    "upcycle_grpo": ("s3_grpo_upcycle", "upcycling (random neuron subsets) + GRPO, no distillation"),
    "kd_only":      ("s2",              "Stages I-II: distillation only, no RL"),
    "vanilla_grpo": ("s3_grpo",         "Stages I-II + GRPO"),
    "gspo":         ("s3_gspo",         "Stages I-II + GSPO (sequence-level ratio)"),
    "r3":           ("s3_r3",           "Stages I-II + GRPO with rollout routing replay (R3)"),
    "rspo":         ("s3_rspo",         "Stages I-II + RSPO"),
    "no_stage1":    ("s4_random",       "random experts and router instead of the clustered init"),
    "no_stage2":    ("s4_nos2",         "no distillation: I -> III -> IV"),
    "no_stage3":    ("s4_nos3",         "no PR-GRPO phase: I -> II -> IV"),
    "no_stage4":    ("s3_prgrpo",       "no balancing phase: I -> II -> III"),
    "vanilla_grpo_mismatch": ("s3_grpo_mm",   "vanilla_grpo, rollouts 2 steps old in bf16"),
    "gspo_mismatch":         ("s3_gspo_mm",   "gspo, rollouts 2 steps old in bf16"),
    "r3_mismatch":           ("s3_r3_mm",     "r3, rollouts 2 steps old in bf16"),
    "rspo_mismatch":         ("s3_rspo_mm",   "rspo, rollouts 2 steps old in bf16"),
    "prgrpo_mismatch":       ("s3_prgrpo_mm", "no_stage4 (PR-GRPO), rollouts 2 steps old in bf16"),
}

# what "PADD above every baseline and ablation" compares with: PADD runs without the mismatch
COMPARED = [v for v in VARIANTS if not v.endswith("_mismatch")]

# the Stage III runs compared along their run (Figures 4 and 5 and the drift figures)
RS_NODES = {a: f"s3_{a}" for a in ALGOS} | {f"{a}+mismatch": f"s3_{a}_mm" for a in ALGOS}

# measured per Stage III-IV step on the step's samples (the router shift: on the probe)
DRIFT = ("router_shift", "topk_changed", "extreme_ratio")

# two-sided 95% critical values of Student's t, by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
       10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}

SHORT = {"prealgebra": "prealg", "algebra": "alg", "number_theory": "numth", "counting_probability": "count",
         "geometry": "geom", "intermediate_algebra": "intalg", "precalculus": "precalc"}


def ckpt(out, seed, node, ext=".pt"):
    """A node's checkpoint, or with ext its output log (.log) or metrics log (.jsonl): every
    node of seed S, its teacher included, lives in <out>/seed<S>."""
    return os.path.join(out, f"seed{seed}", node + ext)


# ----------------------------------------------------------------------------- the numbers

def mean_ci95(xs):
    """Mean and 95% confidence half-width (Student t, n - 1 degrees of freedom) of a sample."""
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    if sd <= 1e-12 * abs(m):  # equal values: only the mean's rounding is left, which is no spread
        return m, 0.0
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


def finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def per_step(m):
    """{metric: {step: value}} of a Stage III-IV checkpoint's metrics: the DRIFT metrics from
    drift_curve, "reward" from train_acc_curve (step i + 1 is entry i); a metric the checkpoint
    lacks is absent, a step it did not measure (None, NaN) is left out."""
    out = {}
    d = m.get("drift_curve")
    if isinstance(d, dict) and "step" in d:
        for k in DRIFT:
            if k in d:
                out[k] = {int(u): float(v) for u, v in zip(d["step"], d[k]) if finite(v)}
    if "train_acc_curve" in m:
        out["reward"] = {u + 1: float(v) for u, v in enumerate(m["train_acc_curve"]) if finite(v)}
    return out


def late_mean(curve):
    """Mean of a {step: value} curve over its last third (last_third)."""
    steps = sorted(curve)
    vals = last_third(steps, [curve[u] for u in steps])
    return sum(vals) / len(vals)


def tenths(curve):
    """(mean of the first tenth, mean of the last tenth) of a {step: value} curve, a step at least."""
    vals = [curve[u] for u in sorted(curve)]
    n = max(1, round(len(vals) / 10))
    return sum(vals[:n]) / n, sum(vals[-n:]) / n


def drift_band(ms):
    """One algorithm's metrics, a dict per seed -> {"steps": the steps every seed ran, per metric
    (DRIFT, "reward") its mean over seeds per step and "<metric>_ci95" the 95% half-width,
    "last_third": {metric: each seed's mean over its last third}, "reward_tenths": {"first",
    "last": each seed's}, "reward_probe": {"start", "end": each seed's mean, "rise_interval": over
    the probe's problems}}. A metric some seed lacks is left out; a step where some seed has no
    value (the probe's router shift is measured every rs_every steps) is None in both lists, so
    no step's mean is over fewer seeds than another's. None if no metric is left."""
    per = [per_step(m) for m in ms]
    keys = [k for k in DRIFT + ("reward",) if all(p.get(k) for p in per)]
    if not keys:
        return None
    steps = sorted(set.intersection(*(set().union(*(p[k] for k in keys)) for p in per)))
    out = {"steps": steps, "last_third": {}}
    for k in keys:
        band = [mean_ci95([p[k][u] for p in per]) if all(u in p[k] for p in per) else (None, None) for u in steps]
        out[k], out[k + "_ci95"] = [m for m, _ in band], [h for _, h in band]
        if k != "reward":
            out["last_third"][k] = [late_mean(p[k]) for p in per]
    if "reward" in keys:
        first, last = zip(*(tenths(p["reward"]) for p in per))
        out["reward_tenths"] = {"first": list(first), "last": list(last)}
    probes = [m.get("reward_probe") for m in ms]
    if all(probes):  # the same training problems and random numbers at the start and the end
        k = probes[0]["samples"]
        if any(p["samples"] != k for p in probes):
            raise common.UserError(f"the seeds' reward probes drew different numbers of samples: {[p['samples'] for p in probes]}")
        out["reward_probe"] = {w: [sum(p[w]) / (k * len(p[w])) for p in probes] for w in ("start", "end")}
        lo, hi = eval_math.paired_interval([p["end"] for p in probes], [p["start"] for p in probes], k=k)
        out["reward_probe"]["rise_interval"] = [lo / 100, hi / 100]
    return out


def specialisation_summary(metrics, seeds, teacher_counts=None):
    """{row: {"per_layer": mean over seeds of I(subdomain; expert) in bits per layer, "mean": over
    layers, "mean_per_seed"}} for the rows every seed has: teacher_clusters (teacher_counts,
    {seed: [L][S][E]}), stage1 (s1_cluster's route_counts), final (padd's, s4) and
    random_router (a subject-blind router at the final's load: the finite-count floor). None when
    no row is there."""

    def counts(node):
        got = [metrics.get((node, s), {}).get("route_counts") for s in seeds]
        return got if all(got) else None
    teacher = [(teacher_counts or {}).get(s) for s in seeds]
    final = counts("s4")
    rows = {name: [[specialisation.mutual_information(c) for c in layers] for layers in per_seed]
            for name, per_seed in (("teacher_clusters", teacher if all(teacher) else None),
                                   ("stage1", counts("s1_cluster")), ("final", final)) if per_seed}
    if final:  # a draw seed per layer, as specialisation.py's table: the layers' floors independent
        rows["random_router"] = [[specialisation.random_router_mi(c, seed=l) for l, c in enumerate(layers)] for layers in final]
    out = {}
    for name, mi in rows.items():
        per_layer = [sum(col) / len(col) for col in zip(*mi)]
        out[name] = {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer),
                     "mean_per_seed": [sum(r) / len(r) for r in mi]}
    return out or None


def build_summary(metrics, seeds, preset, commit, variants=tuple(VARIANTS), teacher_counts=None):
    """metrics: {(node, seed): a checkpoint's metrics} for the checkpoints that exist. A variant
    (or an algorithm's curves) is in the summary once every seed has its checkpoint; sampled
    pass@1, the drift curves and the specialisation once every seed's checkpoint stores them
    (older ones do not). teacher_counts: teacher_route_counts per seed, for the specialisation."""
    def have(node):
        return all((node, s) in metrics for s in seeds)

    def get(node, key):
        vals = []
        for s in seeds:
            if key not in metrics[node, s]:
                raise common.UserError(f"{node} (seed {s}) has no metrics['{key}']: written by an older stage script?")
            vals.append(metrics[node, s][key])
        return vals

    def sampled(node):
        if all("acc_sampled" in metrics[node, s] for s in seeds):
            xs = [metrics[node, s]["acc_sampled"] for s in seeds]
            return {"acc_sampled": mean_ci95(xs)[0], "acc_sampled_per_seed": xs}
        return {}

    if not have("teacher"):
        raise common.UserError(f"a teacher checkpoint is missing (seeds {seeds})")
    accs = get("teacher", "acc")
    out = {"seeds": list(seeds), "preset": preset, "commit": commit,
           "teacher": {"acc": mean_ci95(accs)[0], "acc_per_seed": accs, **sampled("teacher"),
                       "active_params": metrics["teacher", seeds[0]]["active_params"],
                       "total_params": metrics["teacher", seeds[0]]["total_params"]},
           "variants": {}, "router_shift": {}, "drift": {}}
    for v in variants:
        node = VARIANTS[v][0]
        if not have(node):
            continue
        accs, vios = get(node, "acc"), get(node, "max_vio")
        get(node, "per_subdomain")  # only to fail with a clear message when it is missing
        out["variants"][v] = {"acc": mean_ci95(accs)[0], "acc_per_seed": accs, **sampled(node),
                              "per_subdomain": mean_per_subdomain([metrics[node, s] for s in seeds]),
                              "max_vio": sum(vios) / len(vios),
                              "active_params": metrics[node, seeds[0]]["active_params"],
                              "total_params": metrics[node, seeds[0]]["total_params"]}
    for algo, node in RS_NODES.items():
        if have(node):
            out["router_shift"][algo] = shift_band(get(node, "router_shift_curve"))
            band = drift_band([metrics[node, s] for s in seeds])
            if band:
                out["drift"][algo] = band
    spec = specialisation_summary(metrics, seeds, teacher_counts)
    if spec:
        out["specialisation"] = spec
    return out


def teacher_route_counts(out, seed, n, device=None):
    """[L][S][E] of seed S's teacher routed by its Stage I clusters (specialisation.py) on the
    first n test problems, those the stages evaluate. Generation costs ~30 s a seed, so the
    counts are cached in <out>/seed<S>/teacher_route_counts.json under the digests of the
    teacher and of the Stage I checkpoint (the clusters and k) and n: a redraw reads them."""
    import data
    tpath, s1path = ckpt(out, seed, "teacher"), ckpt(out, seed, "s1_cluster")
    cache = ckpt(out, seed, "teacher_route_counts", ".json")
    key = {"teacher": common.file_digest(tpath), "s1_cluster": common.file_digest(s1path), "n": n}
    if os.path.exists(cache):
        try:
            have = common.read_json(cache)
            if isinstance(have, dict) and have.get("key") == key:
                return have["counts"]
        except common.UserError:
            pass  # a torn cache is counted again
    tckpt = common.load_checkpoint(tpath, kind="dense")
    s1 = common.load_checkpoint(s1path, kind="moe")
    device = device or common.pick_device()
    enc = data.tokenizer_from_dict(tckpt["tokenizer"])
    records = data.split_rows(seed=common.data_seed(tckpt))["test"][:n]
    counts = specialisation.teacher_route_counts(common.build_model(tckpt, device), s1["clusters"], enc, records,
                                                 device, s1["config"]["top_k"])
    tmp = f"{cache}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"key": key, "counts": counts}, f)
    os.replace(tmp, cache)
    return counts


def teacher_counts(out, seeds, metrics):
    """{seed: teacher_route_counts} where every seed's s1_cluster and s4 store route_counts (the
    rows it is compared with); {} when they do not."""
    ms = [metrics.get((n, s), {}) for n in ("s1_cluster", "s4") for s in seeds]
    if not all("route_counts" in m and isinstance(m.get("correct"), str) for m in ms):
        return {}
    return {s: teacher_route_counts(out, s, len(metrics["s1_cluster", s]["correct"])) for s in seeds}


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
        for r in common.read_jsonl(jsonl):
            if r.get("returncode") == 0 and "node" in r and "seed" in r:
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
                # a resumed run logs its last steps again: the later record of a step wins
                by_step = {r["step"]: r["gamma"] for r in common.read_jsonl(path)  # null: a NaN gamma
                           if r.get("gamma") is not None and "step" in r and not r.get("final")}
                if by_step:
                    steps = sorted(by_step)
                    vals += last_third(steps, [by_step[u] for u in steps])
        if vals:
            res[algo] = sum(vals) / len(vals)
    return res


def paired_gaps(summary, key="acc"):
    """{name: (per-seed points of PADD minus it, mean, 95% half-width)} for the teacher and every
    other variant; key "acc_sampled" for sampled pass@1, where both store it. Seed S's variants
    share seed S's teacher and Stage I-II checkpoints, so the per-seed difference leaves out
    what the seeds have in common (the teacher's luck, mostly), which the per-variant intervals
    of the main table carry in full."""
    var = summary["variants"]
    if f"{key}_per_seed" not in var.get("padd", {}):
        return {}
    p = var["padd"][f"{key}_per_seed"]
    out = {}
    for name, d in ({"teacher": summary["teacher"]} | var).items():
        if name != "padd" and f"{key}_per_seed" in d:
            gaps = [100 * (a - b) for a, b in zip(p, d[f"{key}_per_seed"])]
            out[name] = (gaps, *mean_ci95(gaps))
    return out


def grades(metrics, seeds, node, sampled=False):
    """(per-seed grade strings, k) of a node for eval_math.paired_interval: `correct` (k = 1) or
    with sampled `correct_sampled` (k = its samples); None where some seed's checkpoint does not
    store them (older ones) or the seeds drew different k."""
    ms = [metrics.get((node, s), {}) for s in seeds]
    got = [m.get("correct_sampled" if sampled else "correct") for m in ms]
    ks = {m.get("samples") if sampled else 1 for m in ms}
    if not all(isinstance(g, str) for g in got) or len(ks) != 1 or None in ks:
        return None
    return got, ks.pop()


def paired_problems(metrics, seeds, a, b, sampled=False):
    """eval_math.paired_interval of node a minus node b (points), greedy or sampled; None where
    either lacks the grades or their k differ."""
    ga, gb = grades(metrics, seeds, a, sampled), grades(metrics, seeds, b, sampled)
    if ga is None or gb is None or ga[1] != gb[1]:
        return None
    return eval_math.paired_interval(ga[0], gb[0], k=ga[1])


def problem_gaps(metrics, seeds, variants, sampled=False):
    """{name: (lo, hi)}: eval_math.paired_interval of PADD minus the teacher and each other
    variant (with sampled: of sampled pass@1), for those whose checkpoints all store per-problem
    results (older ones do not)."""
    padd = VARIANTS["padd"][0]
    if grades(metrics, seeds, padd, sampled) is None:
        return {}
    out = {}
    for name, node in [("teacher", "teacher")] + [(v, VARIANTS[v][0]) for v in variants if v != "padd"]:
        iv = paired_problems(metrics, seeds, padd, node, sampled)
        if iv is not None:
            out[name] = iv
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
    return {a: [metrics[n, s]["router_shift"] for s in seeds] for a, n in RS_NODES.items()
            if all("router_shift" in metrics.get((n, s), {}) for s in seeds)}


def shift_gaps(shifts, suffix=""):
    """{(lo, hi): (each seed's relative gap of lo's late router shift to hi's, in %, then their
    mean and 95% half-width)} for the adjacent pairs of the claimed order prgrpo < rspo < grpo
    that both ran, each name + suffix (the pair starts from the same Stage II checkpoint, so the gap is paired). A
    seed whose hi router never moved (0, as on the tiny preset) has no relative gap and is left
    out; a pair left with no seed is left out too."""
    out = {}
    for lo, hi in ((f"prgrpo{suffix}", f"rspo{suffix}"), (f"rspo{suffix}", f"grpo{suffix}")):
        if lo in shifts and hi in shifts:
            rel = [100 * (a - b) / b for a, b in zip(shifts[lo], shifts[hi]) if b != 0]
            if rel:
                out[lo, hi] = (rel, *mean_ci95(rel))
    return out


def paired_shift_text(shifts):
    """Seed by seed, each algorithm's late router shift against the next one's in the claimed
    order, as relative gaps, a count, and their mean with its 95% interval over seeds."""
    parts = [f"{lo} vs {hi} {', '.join(f'{r:+.0f}%' for r in rel)} ({sum(r < 0 for r in rel)} of {len(rel)} below; "
             f"mean {m:+.0f}% ± {h:.0f}%)" for (lo, hi), (rel, m, h) in shift_gaps(shifts).items()]
    return "; per seed, " + "; ".join(parts) if parts else ""


def num(x):
    return f"{x:.4g}"


def interval_words(m, h, n):
    """Whether a mean difference with its 95% half-width over n seeds clears 0, in words."""
    if n < 2:
        return "one seed: no interval"
    return "above 0 beyond its 95% interval" if m - h > 0 else "below 0 beyond its 95% interval" if m + h < 0 \
        else "its 95% interval holds 0"


def seed_gap(metrics, seeds, a, b, key, scale=100):
    """(per-seed a minus b of metrics[key], times scale, with their mean and 95% half-width), or
    None where a seed of either lacks it."""
    if not all(key in metrics.get((n, s), {}) for n in (a, b) for s in seeds):
        return None
    gaps = [scale * (metrics[a, s][key] - metrics[b, s][key]) for s in seeds]
    return (gaps, *mean_ci95(gaps))


FIG4 = ("prgrpo", "rspo", "grpo")  # the paper's Figure 4 order, lowest router shift first


def figure4_verdict(shifts, suffix=""):
    """(verdict, [one line per adjacent pair]) on Figure 4's order prgrpo < rspo < grpo of the
    late router shift (shifts: seed_shifts; suffix "+mismatch" for the runs under the mismatch),
    paired seed by seed as the claims list judges it: each pair lower in the mean or not, and
    whether its relative gaps' 95% interval over seeds (shift_gaps) is below 0. The order holds
    when both pairs are lower beyond that interval, in the means only when one is not."""
    names = [a + suffix for a in FIG4]
    if not all(shifts.get(n) for n in names):
        return "not measured", [f"router shift for {', '.join(n for n in names if shifts.get(n)) or 'none'} of {', '.join(names)}"]
    gaps = shift_gaps(shifts, suffix)
    lines, lower, clear = [], [], []
    for lo, hi in zip(names, names[1:]):
        ml, mh = (sum(shifts[n]) / len(shifts[n]) for n in (lo, hi))
        rel = gaps.get((lo, hi))
        paired = rel is not None and len(rel[0]) > 1  # two seeds or more: an interval over seeds
        beyond = paired and rel[1] + rel[2] < 0
        if ml >= mh:
            words = "not lower"
        elif paired:
            words = "lower, beyond the seeds' 95% interval" if beyond else "lower in the mean, within the seeds' noise"
        else:
            words = "lower in the mean (one seed: no interval)"
        gap = f" (per seed {', '.join(f'{r:+.0f}%' for r in rel[0])}; mean {rel[1]:+.0f}% ± {rel[2]:.0f}%)" if rel else ""
        lines.append(f"{lo} {num(ml)} vs {hi} {num(mh)}: {words}{gap}")
        lower.append(ml < mh)
        clear.append(beyond)
    verdict = ("holds, beyond the seeds' 95% intervals" if all(lower) and all(clear) else
               "holds in the means only, within the seeds' noise" if all(lower) else "does not hold")
    return verdict, lines


def rl_table(summary, metrics, seeds):
    """Markdown rows of the RL algorithms (RS_NODES) that every seed finished: greedy and sampled
    pass@1 and each minus kd_only (over seeds; over the test problems), the train reward's first
    and last tenth, its rise on the fixed reward probe (over seeds; over the probe's problems)
    and each drift metric over the last third, mean +- 95% over seeds."""
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731

    def band(xs):
        m, h = mean_ci95(xs)
        return f"{num(m)} ± {num(h)}"

    def vs_kd(node, key, sampled):
        g = seed_gap(metrics, seeds, node, "s2", key)
        if g is None:
            return ""
        iv = paired_problems(metrics, seeds, node, "s2", sampled)
        return f"{g[1]:+.1f} ± {g[2]:.1f}" + (f" [{iv[0]:+.1f}, {iv[1]:+.1f}]" if iv else "")
    rows = ["| algorithm | greedy | minus kd_only | sampled | minus kd_only | reward, first tenth | reward, last tenth | "
            "reward probe, end minus start | " + " | ".join(f"{k}, last third" for k in DRIFT) + " |",
            "|---|" + "---|" * (7 + len(DRIFT))]
    for algo, node in RS_NODES.items():
        if not all((node, s) in metrics for s in seeds):
            continue
        d = summary.get("drift", {}).get(algo, {})
        acc = [metrics[node, s]["acc"] for s in seeds]
        samp = [metrics[node, s].get("acc_sampled") for s in seeds]
        cells = [algo, f"{pct(mean_ci95(acc)[0])} ± {pct(mean_ci95(acc)[1])}", vs_kd(node, "acc", False),
                 f"{pct(mean_ci95(samp)[0])} ± {pct(mean_ci95(samp)[1])}" if all(finite(x) for x in samp) else "",
                 vs_kd(node, "acc_sampled", True)]
        tenth = d.get("reward_tenths")
        cells += [band(tenth["first"]), band(tenth["last"])] if tenth else ["", ""]
        probe = d.get("reward_probe")
        cells.append(f"{band([b - a for a, b in zip(probe['start'], probe['end'])])} "
                     f"[{probe['rise_interval'][0]:+.3f}, {probe['rise_interval'][1]:+.3f}]" if probe else "")
        cells += [band(d["last_third"][k]) if k in d.get("last_third", {}) else "" for k in DRIFT]
        rows.append("| " + " | ".join(cells) + " |")
    return rows if len(rows) > 2 else []


def stage4_lines(metrics, seeds):
    """Stage IV measured against no_stage4 (padd's s4 against the s3_prgrpo it starts from):
    MaxVio and both accuracies, per seed, as paired gaps with their 95% intervals."""
    a, b = VARIANTS["padd"][0], VARIANTS["no_stage4"][0]
    if not all((n, s) in metrics for n in (a, b) for s in seeds):
        return []
    L = ["| measure | no_stage4 | padd | padd minus no_stage4, per seed | mean ± 95% over seeds | 95% over test problems |",
         "|---|---|---|---|---|---|"]
    words = []
    for label, key, scale, sampled in (("MaxVio", "max_vio", 1, None), ("greedy pass@1 (points)", "acc", 100, False),
                                       ("sampled pass@1 (points)", "acc_sampled", 100, True)):
        g = seed_gap(metrics, seeds, a, b, key, scale)
        if g is None:
            continue
        gaps, m, h = g
        mean = {n: scale * sum(metrics[n, s][key] for s in seeds) / len(seeds) for n in (a, b)}
        iv = paired_problems(metrics, seeds, a, b, sampled) if sampled is not None else None
        L.append(f"| {label} | {num(mean[b])} | {num(mean[a])} | {' '.join(f'{x:+.3g}' for x in gaps)} | "
                 f"{m:+.3g} ± {h:.3g} | " + (f"[{iv[0]:+.1f}, {iv[1]:+.1f}]" if iv else "") + " |")
        words.append(f"{label}: padd minus no_stage4 {m:+.3g} ± {h:.3g}, {interval_words(m, h, len(seeds))}"
                     + (f"; over the test problems [{iv[0]:+.1f}, {iv[1]:+.1f}]"
                        + (", which holds 0" if iv[0] <= 0 <= iv[1] else ", clear of 0") if iv else ""))
    return L + [""] + [f"- {w}." for w in words]


def specialisation_lines(spec):
    """The model x layer table of I(subdomain; expert) in bits, mean over seeds."""
    rows = [k for k in ("teacher_clusters", "stage1", "final", "random_router") if k in spec]
    if not rows:
        return []
    n_layer = max(len(spec[k]["per_layer"]) for k in rows)
    L = ["| model | " + " | ".join(f"L{l}" for l in range(n_layer)) + " | mean | ± 95% over seeds |",
         "|---|" + "---|" * (n_layer + 2)]
    for k in rows:
        d = spec[k]
        L.append(f"| {k} | " + " | ".join(f"{x:.4f}" for x in d["per_layer"]) + f" | {d['mean']:.4f} | "
                 + f"{mean_ci95(d['mean_per_seed'])[1]:.4f} |")
    return L


def claims(summary, wall_seconds=None, gamma=None, per_script=None, by_problem=None, shifts=None):
    """The study's targets, judged on the numbers: [(target, "holds" | "does not hold" |
    "not measured", the numbers behind it)]. gamma ({algo: late mean of RSPO's weight}),
    per_script ({script: summed seconds}) and by_problem (problem_gaps) only add to the
    explanation: a verdict is on the means, as the targets are stated. The router-shift order is
    the exception: where shifts (seed_shifts) has two seeds or more, each of its two steps must
    also clear the seeds' noise (the paired relative gaps' 95% interval below 0): a mean gap of
    0.4% with the seeds at -4%, -10% and +14% is not an order."""
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
        behind = [f"{v} {pct(d['acc'])}" for v, d in var.items() if v in COMPARED and v != "padd" and d["acc"] >= p]
        missing = [v for v in COMPARED if v not in var]
        # one variant at or above PADD settles it; otherwise every one of them has to be there
        out.append(("PADD above every baseline and ablation",
                    "does not hold" if behind else "not measured" if missing else "holds",
                    f"PADD {pct(p)}" + (f"; not above: {', '.join(behind)}" if behind else "")
                    + (f"; not run: {', '.join(missing)}" if missing else "") + noise_note({k: g for k, g in by_problem.items() if k in COMPARED})))
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

def curve_style(algo):
    """An algorithm's colour, the same in every figure; under the mismatch, dashed."""
    base = algo.removesuffix("+mismatch")
    return dict(color=f"C{ALGOS.index(base)}", ls="--" if base != algo else "-")


def plot_band(ax, steps, mean, ci95, algo):
    """An algorithm's mean curve and its 95% band, over the steps that have a mean (not None)."""
    pts = [(u, m, h) for u, m, h in zip(steps, mean, ci95) if m is not None]
    if pts:
        u, m, h = zip(*pts)
        ax.plot(u, m, label=algo, **curve_style(algo))
        ax.fill_between(u, [x - y for x, y in zip(m, h)], [x + y for x, y in zip(m, h)], alpha=0.15,
                        color=curve_style(algo)["color"])


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
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for algo, d in rs.items():
            plot_band(ax, d["steps"], d["mean"], d["ci95"], algo)
        ax.set_xlabel("Stage III step")
        ax.set_ylabel("router shift")
        ax.set_title(f"router shift, mean and 95% CI over seeds {seeds}", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "router_shift")
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for algo in rs:
            curves = [metrics[RS_NODES[algo], s]["router_shift_curve"] for s in seeds]
            pooled = sorted(v for c in curves for v in last_third([u for u, _ in c], [r for _, r in c]))
            ax.step([pooled[0]] + pooled, [i / len(pooled) for i in range(len(pooled) + 1)], where="post", label=algo,
                    **curve_style(algo))
        ax.set_xlabel("router shift (last third of steps, all seeds)")
        ax.set_ylabel("fraction of probes")
        ax.legend(fontsize=7, ncol=2)
        save(fig, "router_shift_ecdf")

    # each drift metric and the train reward along Stage III, per algorithm, with its 95% band
    ylabel = {"router_shift": "router shift (probe)", "topk_changed": "share of tokens, top-k set changed",
              "extreme_ratio": "share of tokens, ratio outside [0.5, 2]", "reward": "train reward"}
    for k in DRIFT + ("reward",):
        runs = {a: d for a, d in summary.get("drift", {}).items() if k in d}
        if not runs:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for algo, d in runs.items():
            plot_band(ax, d["steps"], d[k], d[k + "_ci95"], algo)
        ax.set_xlabel("Stage III step")
        ax.set_ylabel(ylabel[k])
        ax.set_title(f"{ylabel[k]}, mean and 95% CI over seeds {seeds}; dashed: with the mismatch", fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "reward" if k == "reward" else f"drift_{k}")

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

def paired_section(summary, by_problem, by_problem_sampled):
    """The table of PADD minus each variant, per seed and over the test problems (problem_gaps),
    with sampled pass@1's columns where PADD stores it; [] without padd."""
    gaps, gaps_s = paired_gaps(summary), paired_gaps(summary, "acc_sampled")
    if not gaps:
        return []

    def cells(g, bp, name):
        gs, m, h = g
        iv = f"[{bp[name][0]:+.1f}, {bp[name][1]:+.1f}]" if name in bp else "not stored"
        return f" {' '.join(f'{x:+.1f}' for x in gs)} | {m:+.1f} ± {h:.1f} | {iv} |"
    head = "| PADD minus | per seed | mean ± 95% over seeds | 95% over test problems |"
    if gaps_s:
        head += " sampled, per seed | sampled, mean ± 95% over seeds | sampled, 95% over test problems |"
    L = ["PADD minus each variant, seed by seed (points; the same seed shares its teacher and, where the "
         "chains overlap, its Stage I-II checkpoints, so these differences are paired and their interval "
         "leaves out the spread the seeds have in common). The test-problem columns resample the test problems "
         "instead, models fixed: the noise of this test set, not of training (`eval_math.paired_interval`). "
         "A gap is a finding only when neither interval holds 0.", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, g in gaps.items():
        row = f"| {name} |" + cells(g, by_problem, name)
        if gaps_s:
            row += cells(gaps_s[name], by_problem_sampled, name) if name in gaps_s else " | | |"
        L.append(row)
    return L + [""]


def rl_section(summary, metrics, seeds):
    """The RL algorithms' table (rl_table) and Figure 4's verdict without and with the
    mismatch; [] when none of them ran for every seed."""
    rl = rl_table(summary, metrics, seeds)
    if not rl:
        return []
    L = ["## RL algorithms", "",
         "Each Stage III algorithm from the same Stage II checkpoint of each seed, without and with the "
         f"rollout/update mismatch (`+mismatch`: `{' '.join(MISMATCH)}`, rollouts from a policy copy 2 steps "
         "old, in bf16). Accuracies in percent; minus kd_only: the paired gap in points to the Stage II "
         "checkpoint they all start from, mean ± 95% over seeds and [95% over the test problems]. The train "
         "reward is the share of right rollout samples, along the steps' own prompts (first and last tenth) "
         "and on the reward probe (the same `--n-probe` training problems and random numbers at the start and at the end, "
         "so the prompts' difficulty cancels; [95% over its problems]); the drift metrics are per step: the probe's router "
         "shift, and on the step's samples the share of tokens whose top-k expert set differs from the rollout "
         "policy's and the share whose importance ratio is outside [0.5, 2]; each as its mean over the last "
         "third of the steps, ± 95% over seeds.", "", *rl, ""]
    verdict, lines = figure4_verdict(seed_shifts(metrics, seeds), "+mismatch")
    L += ["Figure 4's claim, router shift over the last third PR-GRPO < RSPO < GRPO, under the mismatch "
          f"(without it: the claims list below): {verdict}.", ""]
    L += [f"- {x}." for x in lines] + [""]
    return L


def markdown(summary, metrics, verdicts, cmd_line, node_cmds, times, figs, md_path, sweeps=(), by_problem=None,
             made_at=None, by_problem_sampled=None):
    """The write-up; by_problem and by_problem_sampled (problem_gaps, greedy and sampled) fill
    the paired table's test-problem columns; made_at (node_commits) is said when the checkpoints
    come from more than one commit; sweeps (the RESULTS.md files in subfolders of --results) are
    listed after the pointer to docs/journal.md."""
    seeds, var = summary["seeds"], summary["variants"]
    subs = list(dict.fromkeys(s for d in var.values() for s in d["per_subdomain"]))
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    node_seconds, wall, untimed, _ = times
    drawn = next((m for m in metrics.values() if "samples" in m and "temperature" in m), None)
    L = ["# Ablation study", "",
         f"Generated by `ablate.py` from checkpoints of commit `{summary['commit']}` (the newest, where they span several), preset `{summary['preset']}`, seeds {seeds}. "
         "Greedy pass@1 on the suite's test split, in percent"
         + (f"; sampled pass@1: the share of right answers among k = {drawn['samples']} samples per problem at "
            f"temperature {drawn['temperature']:g}" if drawn else "")
         + "; ± is the 95% confidence half-width of the mean over seeds (Student t).", "",
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

    def sampled(d):
        xs = d.get("acc_sampled_per_seed")
        return f"{pct(d['acc_sampled'])} ± {pct(mean_ci95(xs)[1])}" if xs else ""
    L += ["## Results", "",
         "| variant | what | acc | seeds | sampled | " + " | ".join(SHORT.get(s, s) for s in subs) + " | MaxVio | active | total |",
         "|---|---|---|---|---|" + "---|" * len(subs) + "---|---|---|"]
    t = summary["teacher"]
    t_sub = mean_per_subdomain([metrics["teacher", s] for s in seeds])
    L.append(f"| teacher | dense, one per seed | {pct(t['acc'])} ± {pct(mean_ci95(t['acc_per_seed'])[1])} | "
             + " ".join(pct(a) for a in t["acc_per_seed"]) + f" | {sampled(t)} | "
             + " | ".join(pct(t_sub[s]) if s in t_sub else "" for s in subs)
             + f" | | {t['active_params']:,} | {t['total_params']:,} |")
    for v, d in var.items():
        L.append(f"| {v} | {VARIANTS[v][1]} | {pct(d['acc'])} ± {pct(mean_ci95(d['acc_per_seed'])[1])} | "
                 + " ".join(pct(a) for a in d["acc_per_seed"]) + f" | {sampled(d)} | "
                 + " | ".join(pct(d["per_subdomain"].get(s, 0)) for s in subs)
                 + f" | {d['max_vio']:.3f} | {d['active_params']:,} | {d['total_params']:,} |")
    missing = [v for v in VARIANTS if v not in var]
    if missing:
        L += ["", f"Not run, or not for every seed: {', '.join(missing)}."]
    L += ["", "MaxVio: max_e load_e / mean_e load_e - 1 on the test generations, mean over layers and seeds.", ""]
    L += paired_section(summary, by_problem or {}, by_problem_sampled or {})
    L += rl_section(summary, metrics, seeds)
    s4 = stage4_lines(metrics, seeds)
    if s4:
        L += ["## Stage IV against no_stage4", "",
              "padd is no_stage4 (Stage III's PR-GRPO checkpoint) plus Stage IV; per seed, padd minus no_stage4 "
              "(accuracies in points).", "", *s4, ""]
    spec = summary.get("specialisation")
    if spec:
        L += ["## Specialisation", "",
              "Mutual information I(subdomain; expert) in bits per layer, on each model's greedy generations on "
              "the test problems (`specialisation.py`), mean over seeds: the teacher routed by its Stage I "
              "clusters, the student after Stage I, padd's final student, and a router blind to the subdomain at "
              "the final student's load (the finite-count floor: only the height above it is specialisation).", "",
              *specialisation_lines(spec), ""]
    captions = {"ablation_bars": "Accuracy per variant and per subdomain (the paper's Figure 2).",
                "heatmaps": f"Subdomain x expert share of routed tokens, seed {seeds[0]}: the teacher's clusters "
                            "(mean p_T), the student after Stage I and (once padd has run) after Stage IV.",
                "router_shift": "Router shift along Stage III, mean and 95% band over seeds (Figure 4).",
                "router_shift_ecdf": "Distribution of router shift over the last third of Stage III, "
                                     "pooled over seeds (Figure 5).",
                "expert_load": "Each expert's share of the routed tokens per layer, before (no_stage4) and "
                               "after (padd) Stage IV; the dashed line is an even load.",
                "drift_router_shift": "Router shift of the probe per Stage III step, per algorithm, mean and 95% band "
                                      "over seeds; dashed: with the rollout/update mismatch.",
                "drift_topk_changed": "Share of each step's sample tokens whose top-k expert set differs from the "
                                      "rollout policy's, mean and 95% band over seeds; dashed: with the mismatch.",
                "drift_extreme_ratio": "Share of each step's sample tokens whose importance ratio is outside [0.5, 2], "
                                       "mean and 95% band over seeds; dashed: with the mismatch.",
                "reward": "Train reward (share of right rollout samples) per Stage III step, mean and 95% band "
                          "over seeds; dashed: with the mismatch."}
    if figs:
        L += ["## Figures", ""]
        for name, path in figs.items():
            rel = os.path.relpath(path, os.path.dirname(os.path.abspath(md_path)))
            L += [captions[name], "", f"![{name}]({rel})", ""]
    L += ["## Claims at this scale", "",
          f"Judged on the means over seeds {seeds}; the ± in the table says how much of a gap is noise.", ""]
    for target, verdict, numbers in verdicts:
        L.append(f"- {target}: {verdict} ({numbers}).")
    journal = os.path.relpath(JOURNAL, os.path.dirname(os.path.abspath(md_path)))
    L += ["", "## Earlier studies and sweeps" if sweeps else "## Earlier studies", "",
          f"Earlier studies and sweeps are described in [docs/journal.md]({journal}), with the git commit "
          "where each one's folder can be found."]
    if sweeps:
        L += ["", "Sweeps over a stage's flags (`--extra`) in subfolders beside this study, each written up on "
              "its own with the commit it ran at:", ""]
        for path in sweeps:
            rel = os.path.relpath(path, os.path.dirname(os.path.abspath(md_path)))
            L.append(f"- [{rel}]({rel})")
    return "\n".join(L) + "\n"
