"""How specialised the experts are, as a number: the mutual information, per layer, between a
token's subdomain S (its problem's math subject, one of benchmarks.SUBDOMAINS) and the
experts E its top-k selections go to,

    I(S; E) = sum_{s,e} p(s,e) log2 p(s,e) / (p(s) p(e)),   p(s,e) = counts[s,e] / total,

in bits, from the table counts[s,e] of top-k selections (0 log 0 = 0). It is 0 for a router
that ignores the subject and at most H(S) (log2 7 = 2.81 bits with equal shares) for one
whose choice names it; `normalised_mi` divides by H(S).

Counted on each model's own greedy generations on the test problems, prompt + generation
replayed teacher-forced (eval_math.evaluate's `route_counts`), four rows:
  * teacher_clusters: the dense teacher routed by its Stage I clusters, top-k of its path
    p_T(e|x) (losses.teacher_paths) with the student's k: what the clusters already know;
  * stage1: the student just built from those clusters and warmed up;
  * final: the last student of the run (stage4.pt, else stage3.pt, else stage2.pt);
  * random_router: a router independent of the subject at the final student's per-layer
    load, on the same number of tokens per subdomain. MI estimated from finite counts is
    biased upward (about (S-1)(E-1) / (2 N ln 2) bits for N tokens), so a table from a
    subject-blind router still reads above 0; this row is that floor, and only the height
    above it is specialisation. Its draws are independent selections, while a token's k
    choices and a problem's tokens are not: the true floor of a blind router is higher still.

A checkpoint's stored `route_counts` are used when they were counted on the same number of
test problems; otherwise (checkpoints older than them, another --n) they are recomputed.

Usage:
  python specialisation.py --run out/default [--n 700] [--json out/default/specialisation.json]
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

import common
import data
import eval_math
from benchmarks import SUBDOMAINS, classify_subdomain
from losses import teacher_paths


def _joint(counts):
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or (c < 0).any():
        raise ValueError(f"counts must be a 2-d table of nonnegative counts, got shape {c.shape}")
    total = c.sum()
    return c / total if total > 0 else c


def entropy_bits(p):
    p = np.asarray(p, dtype=np.float64).ravel()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def mutual_information(counts):
    """I(S; E) in bits of a [S, E] table of counts (rows: subdomains, columns: experts)."""
    p = _joint(counts)
    ps, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0  # p(s,e) > 0 implies p(s), p(e) > 0
    return float((p[nz] * np.log2(p[nz] / (ps * pe)[nz])).sum())


def normalised_mi(counts):
    """I(S; E) / H(S), in [0, 1]: the share of the subject that the expert choice tells."""
    h = entropy_bits(_joint(counts).sum(1))
    return mutual_information(counts) / h if h > 0 else 0.0


def random_router_mi(counts, n_draw=20, seed=0):
    """Mean MI over n_draw tables in which row s holds counts[s].sum() selections drawn from
    the marginal p(e) of counts, i.e. a router blind to the subject with the same load."""
    c = np.asarray(counts, dtype=np.float64)
    rows = np.rint(c.sum(1)).astype(np.int64)
    total = c.sum()
    if total <= 0:
        return 0.0
    pe = c.sum(0) / total
    rng = np.random.default_rng(seed)
    return float(np.mean([mutual_information(np.stack([rng.multinomial(n, pe) for n in rows]))
                          for _ in range(n_draw)]))


def subdomain_of(record):
    return record.get("subdomain") or classify_subdomain(record["question"])


@torch.no_grad()
def teacher_route_counts(teacher, clusters, enc, records, device, top_k, batch_size=100, max_new_tokens=None):
    """[L][S][E] counts of the dense teacher's top-k cluster choices (top-k of p_T), on its own
    greedy generations, replayed as eval_math.evaluate replays a student's."""
    was_training = teacher.training
    teacher.eval()
    cfg = teacher.config
    E = int(max(int(c.max()) for c in clusters)) + 1
    clusters = [c.to(device) for c in clusters]
    route = torch.zeros(cfg.n_layer, len(SUBDOMAINS), E, dtype=torch.float64)
    eos = data.eos_id(enc)
    max_new = max_new_tokens or cfg.block_size
    # evaluate's batches: the length-sorted order, prompts with no room to answer left out
    order = sorted(range(len(records)), key=lambda i: len(records[i]["question"]))
    prompt_of = {i: eval_math.encode_prompt(enc, records[i]["question"]) for i in order}
    order = [i for i in order if len(prompt_of[i]) < cfg.block_size]
    for b in range(0, len(order), batch_size):
        ids = order[b:b + batch_size]
        prompts = [prompt_of[i] for i in ids]
        outs = teacher.generate(prompts, max_new, temperature=0, eos_id=eos)
        seqs = [p + o for p, o in zip(prompts, outs)]
        idx, _, valid = common.pad_batch(seqs, [[] for _ in seqs], device)
        _, paths, _ = teacher_paths(teacher, idx, clusters)
        valid = valid.flatten()
        subs = [subdomain_of(records[i]) for i in ids]
        sub = torch.tensor([SUBDOMAINS.index(s) if s in SUBDOMAINS else -1 for s in subs], device=device)
        sub_tok = sub.repeat_interleave(idx.size(1))[valid]
        keep = sub_tok >= 0  # evaluate leaves a label outside SUBDOMAINS out of the table too
        for layer, p in enumerate(paths):
            chosen = p[valid].topk(top_k, dim=-1).indices[keep]
            table = torch.zeros(len(SUBDOMAINS), E, dtype=torch.float64, device=device)
            table.index_put_((sub_tok[keep][:, None].expand_as(chosen), chosen),
                             torch.ones_like(chosen, dtype=torch.float64), accumulate=True)
            route[layer] += table.cpu()
    teacher.train(was_training)
    return route.tolist()


def summary(per_layer, source=None):
    out = dict(per_layer=[float(x) for x in per_layer], mean=float(np.mean(per_layer)))
    if source:
        out["source"] = source
    return out


def _student_counts(ckpt, path, enc, records, device):
    """route_counts of a student checkpoint: stored if counted on these problems, else recomputed."""
    m = ckpt["metrics"]
    # `correct` holds one grade per problem: stored counts of another --n are other tokens
    if "route_counts" in m and len(m.get("correct", "")) == len(records):
        return m["route_counts"], "stored"
    model = common.build_model(ckpt, device)
    res = eval_math.evaluate(model, enc, records, device, samples=0, desc=os.path.basename(path))
    return res["route_counts"], "recomputed"


def specialisation(run_dir, n_test=700, device="cpu"):
    """{teacher_clusters, stage1, final, random_router: {per_layer, mean}, final_ckpt} of a
    run's folder; a row whose checkpoint is missing is left out."""
    device = torch.device(device)
    tpath = os.path.join(run_dir, "teacher.pt")
    if not os.path.isfile(tpath):
        raise common.UserError(f"no teacher.pt in {run_dir}: it fixes the test problems (its data seed)")
    tckpt = common.load_checkpoint(tpath, kind="dense")
    enc = data.tokenizer_from_dict(tckpt["tokenizer"])
    records = data.split_rows(seed=common.data_seed(tckpt))["test"][:n_test]
    out = dict(n_test=len(records))
    s1path = os.path.join(run_dir, "stage1.pt")
    if os.path.isfile(s1path):
        s1 = common.load_checkpoint(s1path, kind="moe")
        common.check_student(s1, tckpt, s1path, tpath)
        counts, source = _student_counts(s1, s1path, enc, records, device)
        teacher = common.build_model(tckpt, device)
        t_counts = teacher_route_counts(teacher, s1["clusters"], enc, records, device, s1["config"]["top_k"])
        out["teacher_clusters"] = summary([mutual_information(c) for c in t_counts], "recomputed")
        out["stage1"] = summary([mutual_information(c) for c in counts], source)
    final = next((n for n in ("stage4", "stage3", "stage2") if os.path.isfile(os.path.join(run_dir, f"{n}.pt"))), None)
    if final:
        path = os.path.join(run_dir, f"{final}.pt")
        counts, source = _student_counts(common.load_checkpoint(path, kind="moe"), path, enc, records, device)
        out["final"] = summary([mutual_information(c) for c in counts], source)
        out["final_ckpt"] = f"{final}.pt"
        # a seed per layer, so that the layers' floors are independent draws
        out["random_router"] = summary([random_router_mi(c, seed=l) for l, c in enumerate(counts)])
    return out


def print_table(res):
    rows = [k for k in ("teacher_clusters", "stage1", "final", "random_router") if k in res]
    L = max(len(res[k]["per_layer"]) for k in rows)
    label = {"final": f"final ({res.get('final_ckpt', '')})"}
    head = ["MI (bits)"] + [f"L{l}" for l in range(L)] + ["mean"]
    lines = [head] + [[label.get(k, k)] + [f"{x:.4f}" for x in res[k]["per_layer"]] + [f"{res[k]['mean']:.4f}"]
                      for k in rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    for j, r in enumerate(lines):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def main():
    parser = common.ArgumentParser(description="Mutual information I(subdomain; expert) per layer, in bits: the "
                                     "teacher's clusters, Stage I, the final student and a random router's floor.")
    parser.add_argument("--run", required=True, metavar="DIR", help="a run's folder: teacher.pt, stage1.pt, stage2-4.pt")
    parser.add_argument("--n", type=int, default=700, help="the first N test problems (the stages use 700)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    if args.n < 1:
        raise common.UserError(f"--n {args.n}: must be a positive integer")
    if not os.path.isdir(args.run):
        raise common.UserError(f"--run {args.run}: not a folder")
    if args.json:
        common.check_writable("--json", args.json)
    t0 = time.time()
    res = specialisation(args.run, args.n, common.pick_device(args.device))
    if not any(k in res for k in ("stage1", "final")):
        raise common.UserError(f"no student checkpoints (stage1.pt .. stage4.pt) in {args.run}")
    print(f"I(subdomain; expert) on {res['n_test']} test problems, {time.time() - t0:.0f} s")
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    common.run(main)
