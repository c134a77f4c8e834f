"""
The ablation study's nodes and variants, where their checkpoints live, and what turns the
finished checkpoints into the write-up: `<results>/summary.json`, the figures and RESULTS.md
(the numbers, the paired gaps, the verdicts on the claims). ablate.py runs the study and calls
this; nothing here starts a process.
"""

import math
import os

import common
import eval_math

# the earlier studies and sweeps, each with the commit that holds its folder
JOURNAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs", "journal.md")

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

# the Stage III runs whose router-shift curves are Figures 4 and 5
RS_NODES = {"grpo": "s3_grpo", "rspo": "s3_rspo", "prgrpo": "s3_prgrpo"}

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
    that both ran (the pair starts from the same Stage II checkpoint, so the gap is paired). A
    seed whose hi router never moved (0, as on the tiny preset) has no relative gap and is left
    out; a pair left with no seed is left out too."""
    out = {}
    for lo, hi in (("prgrpo", "rspo"), ("rspo", "grpo")):
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
    (node_commits) is said when the checkpoints come from more than one commit; sweeps (the
    RESULTS.md files in subfolders of --results) are listed after the pointer to docs/journal.md."""
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
