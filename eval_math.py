"""Evaluation of a PADD checkpoint: the command to run, and the metrics the stages record.

What it measures (``evaluate``), on records {question, answer, subdomain}:
  * greedy pass@1: temperature-0 generation, graded by ``grader.extract_answer`` +
    ``grader.is_equiv`` (the same grader Stage III-IV use as the RL reward);
  * accuracy per subdomain (a record's label, else ``benchmarks.classify_subdomain``);
  * for an MoE model, prompt + generation replayed once teacher-forced: per-layer expert
    load, MaxVio = max_e load_e / mean_e load_e - 1 (0 = perfectly balanced; ``max_vio``),
    mean routing entropy H(route) and the subdomain x expert activation table.
Also: ``kl_to_teacher``, the held-out KL(T || S) per solution token, teacher-forced on gold
solutions; ``lm_loss``, the solution-token cross-entropy; and ``paired_interval``, the 95%
bootstrap interval of a gap between two models that resamples the problems (each problem
paired with itself), i.e. the noise of this test set with the models held fixed.

Usage:
  python eval_math.py --table out/default                                 # one row per checkpoint
  python eval_math.py --ckpt out/default/stage4.pt --data gsm8k --n 200   # any benchmark of ../shared/data/benchmarks
  python eval_math.py --ckpt out/default/stage2.pt out/default/stage3.pt --split validation  # stage3 minus stage2, paired

Given several checkpoints it prints each later one minus the first with that interval.

A prompt that does not fit the model's context (``len(prompt) >= block_size``; most of
GSM8K's at the default 128 tokens) is not generated for: it is counted as skipped and graded
wrong (the accuracy keeps every problem in its denominator, so two models stay comparable
problem by problem), and the table's ``skip`` column and a line under it say how many and
why. It is not cut to its last tokens, since the model would then answer a question it was
never shown in full.
``--data`` takes 'suite', a benchmark name, a JSON-lines file or a saved dataset folder;
``--question-field`` / ``--answer-field`` name the columns of another layout.
Answer extraction and equivalence live in grader.py (the LaTeX arithmetic it evaluates
in latex_eval.py); benchmark loading and the subdomain classifier in benchmarks.py.
"""

from __future__ import annotations

import json
import os

import torch
from tqdm import tqdm

import common
import data
from benchmarks import SUBDOMAINS, classify_subdomain, load_benchmark
from grader import extract_answer, is_equiv
from model import count_params


def encode_prompt(enc, question):
    return data.encode_example(enc, dict(question=question, solution=""))[0]


def load_records(spec, split="test", seed=0, question_field=None, answer_field=None):
    """'suite' (the built-in suite's split), a benchmark name, a JSON-lines file or a saved
    dataset folder (benchmarks.load_benchmark, through datasets)."""
    if spec == "suite":
        return data.heldout_rows(seed) if split == "heldout" else data.split_rows(seed=seed)[split]
    try:
        return load_benchmark(spec, question_field, answer_field)
    except FileNotFoundError:
        raise common.UserError(f"data file not found: {spec}")
    except ValueError as e:
        raise common.UserError(str(e))


def max_vio(load):
    """MaxVio = max_e load_e / mean_e load_e - 1 over the last dim (0 = perfectly balanced)."""
    load = torch.as_tensor(load, dtype=torch.float64)
    return load.max(dim=-1).values / load.mean(dim=-1).clamp(min=1e-12) - 1


# sampled pass@1 (the field's avg@k): k samples per problem at the rollouts' temperature. At 8
# the paired interval of a Stage III - Stage II gap on the 700 test problems is half greedy's
# width (about 2 points against 4; docs/journal.md, 2026-12-06)
SAMPLES, SAMPLE_TEMPERATURE = 8, 1.0


@torch.no_grad()
def evaluate(model, enc, records, device, batch_size=100, max_new_tokens=None, desc="eval",
             samples=SAMPLES, temperature=SAMPLE_TEMPERATURE, seed=0):
    """Greedy pass@1 over records {question, answer, subdomain}, overall and per subdomain, and
    with samples = k > 0 sampled pass@1: the mean over problems of the share of k samples at
    `temperature` that are right (`acc_sampled`; `correct_sampled` holds each problem's count,
    one digit per problem, so k <= 9). Greedy is what a user of the model gets; sampled is what
    RL optimises, and it moves first (Stage III's headline, greedy its guard).

    For an MoE model it also replays prompt + greedy tokens once, teacher-forced, to measure
    routing at inference: per-layer expert load and MaxVio, mean router entropy, the
    subdomain x expert activation table (share of a subdomain's assignments that go to each
    expert, summed over layers) and its per-layer counts (`route_counts` [L][S][E], the
    specialisation's mutual information is computed from them).
    """
    if not 0 <= samples <= 9:
        raise ValueError(f"samples={samples}: per-problem counts are stored one digit each (0..9)")
    was_training = model.training
    model.eval()
    eos = data.eos_id(enc)
    max_new = max_new_tokens or model.config.block_size
    cfg = model.config
    moe = cfg.n_expert > 1
    load = torch.zeros(cfg.n_layer, cfg.n_expert, dtype=torch.float64)
    route = torch.zeros(cfg.n_layer, len(SUBDOMAINS), cfg.n_expert, dtype=torch.float64)
    right_k = [0] * len(records)  # right samples per problem
    gen = torch.Generator(device=device)
    ent_sum, ent_n = 0.0, 0
    # under torchrun each rank grades every world-th problem (of the length-sorted order, so the
    # ranks' batches cost about the same) and the results are gathered below
    order = sorted(range(len(records)), key=lambda i: len(records[i]["question"]))[common.rank()::common.world()]
    correct = [False] * len(records)
    preds = [None] * len(records)
    prompt_of = {i: encode_prompt(enc, records[i]["question"]) for i in order}
    skipped = [i for i in order if len(prompt_of[i]) >= cfg.block_size]  # no room to answer
    order = [i for i in order if len(prompt_of[i]) < cfg.block_size]
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=not common.is_main()):
        ids = order[b:b + batch_size]
        prompts = [prompt_of[i] for i in ids]
        outs = model.generate(prompts, max_new, temperature=0, eos_id=eos)
        for i, out in zip(ids, outs):
            text = data.decode_completion(enc, out)
            preds[i] = extract_answer(text)
            correct[i] = is_equiv(preds[i], records[i]["answer"], records[i].get("unit"))
        if samples:
            # seeded per batch of the length-sorted order: the same draws whatever ran before
            gen.manual_seed(seed * 1_000_003 + 7919 * common.rank() + b)
            outs_k = model.generate([p for p in prompts for _ in range(samples)], max_new,
                                    temperature=temperature, eos_id=eos, generator=gen)
            for j, out in enumerate(outs_k):
                i = ids[j // samples]
                right_k[i] += int(is_equiv(extract_answer(data.decode_completion(enc, out)), records[i]["answer"],
                                        records[i].get("unit")))
        if moe:
            seqs = [p + o for p, o in zip(prompts, outs)]
            idx, _, valid = common.pad_batch(seqs, [[] for _ in seqs], device)
            model(idx)
            valid = valid.flatten()
            sub = [records[i].get("subdomain") or classify_subdomain(records[i]["question"]) for i in ids]
            row_of = torch.arange(len(ids), device=device).repeat_interleave(idx.size(1))[valid]
            for layer, ffn in enumerate(model.ffns):
                chosen = ffn.topk_idx[valid]
                counts = torch.zeros(len(ids), cfg.n_expert, device=device, dtype=torch.float64)
                counts.index_put_((row_of[:, None].expand_as(chosen), chosen),
                                  torch.ones_like(chosen, dtype=torch.float64), accumulate=True)
                counts = counts.cpu()
                load[layer] += counts.sum(0)
                for r, s in enumerate(sub):  # a subdomain's selections, per layer (heatmap: summed over layers)
                    route[layer, SUBDOMAINS.index(s)] += counts[r]
                p = ffn.router_probs[valid]
                ent_sum += float(-(p * p.clamp(min=1e-12).log()).sum(-1).sum())
                ent_n += p.size(0)
    model.train(was_training)
    n_skipped = len(skipped)
    if common.world() > 1:
        for i, c, p, h in common.gather_lists([(i, correct[i], preds[i], right_k[i]) for i in order]):
            correct[i], preds[i], right_k[i] = c, p, h
        n_skipped = int(common.all_reduce(torch.tensor([float(n_skipped)], device=device))[0])
        if moe:
            load = common.all_reduce(load.to(device)).cpu()
            route = common.all_reduce(route.to(device)).cpu()
            ent = common.all_reduce(torch.tensor([ent_sum, ent_n], dtype=torch.float64, device=device))
            ent_sum, ent_n = float(ent[0]), int(ent[1])
    subs = sorted({r.get("subdomain") or classify_subdomain(r["question"]) for r in records},
                  key=lambda s: SUBDOMAINS.index(s) if s in SUBDOMAINS else 99)
    per = {}
    for s in subs:
        hits = [c for c, r in zip(correct, records) if (r.get("subdomain") or classify_subdomain(r["question"])) == s]
        per[s] = sum(hits) / len(hits)
    # correct as a string, one "0"/"1" per record in the records' order: it is small enough to
    # keep in every checkpoint's metrics, where ablate.py pairs two variants problem by problem
    res = dict(acc=sum(correct) / max(1, len(records)), per_subdomain=per, n=len(records),
               correct="".join("1" if c else "0" for c in correct), predictions=preds,
               skipped=n_skipped, context=cfg.block_size)
    if samples:
        res.update(acc_sampled=sum(right_k) / max(1, samples * len(records)), correct_sampled="".join(map(str, right_k)),
                   samples=samples, temperature=temperature)
    if moe:
        vio = max_vio(load)
        res.update(load=load.tolist(), max_vio_per_layer=vio.tolist(), max_vio=float(vio.mean()),
                   routing_entropy=ent_sum / max(1, ent_n),
                   heatmap={s: (h / h.sum().clamp(min=1)).tolist() for s, h in zip(SUBDOMAINS, route.sum(0)) if h.sum() > 0},
                   route_counts=route.tolist())
    return res


def stored(res):
    """What a stage keeps of evaluate()'s result in its checkpoint's metrics: both accuracies
    with their per-problem grades (ablate.py pairs variants on them), and the routing counts."""
    keys = ("acc", "per_subdomain", "correct", "acc_sampled", "correct_sampled", "samples", "temperature",
            "skipped", "route_counts")
    return {k: res[k] for k in keys if k in res}


@torch.no_grad()
def kl_to_teacher(student, teacher, enc, records, device, batch_size=64):
    """Held-out KL(T || S) per solution token, teacher-forced on gold solutions."""
    total, count = 0.0, 0
    for b in range(0, len(records), batch_size):
        pairs = [data.encode_example(enc, r) for r in records[b:b + batch_size]]
        idx, targets, _ = common.pad_batch(*zip(*pairs), device)
        mask = targets >= 0
        lt = teacher(idx)[0].float().log_softmax(-1)[mask]
        ls = student(idx)[0].float().log_softmax(-1)[mask]
        total += float((lt.exp() * (lt - ls)).sum())
        count += int(mask.sum())
    return total / max(1, count)


def print_report(rows):
    """One table, a row per checkpoint: accuracy overall and per subdomain, parameters, KL to
    the teacher, routing entropy, MaxVio and router shift (blank where it does not apply)."""
    subs = [s for s in SUBDOMAINS if any(s in m.get("per_subdomain", {}) for m in rows.values())]
    short = {"prealgebra": "prealg", "algebra": "alg", "number_theory": "numth",
             "counting_probability": "count", "geometry": "geom",
             "intermediate_algebra": "intalg", "precalculus": "precalc"}
    skips = any(m.get("skipped") for m in rows.values())
    sampled = any("acc_sampled" in m for m in rows.values())
    head = ["ckpt", "acc"] + (["sampled"] if sampled else []) + (["skip"] if skips else []) + \
        [short.get(s, s[:7]) for s in subs] + \
        ["active", "total", "KL(T|S)", "H(route)", "MaxVio", "RS"]
    lines = [head]

    def f(x, fmt):
        return "" if x is None else format(x, fmt)
    for name, m in rows.items():
        per = m.get("per_subdomain", {})
        lines.append([name, f(100 * m["acc"], ".1f")] +
                     ([f(100 * m["acc_sampled"], ".1f") if "acc_sampled" in m else ""] if sampled else []) +
                     ([str(m.get("skipped", 0))] if skips else []) +
                     [f(100 * per[s], ".1f") if s in per else "" for s in subs] +
                     [f(m.get("active_params"), ","), f(m.get("total_params"), ","), f(m.get("kl_to_teacher"), ".4f"),
                      f(m.get("routing_entropy"), ".3f"), f(m.get("max_vio"), ".3f"), f(m.get("router_shift"), ".4f")])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    for j, r in enumerate(lines):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if sampled:
        m = next(m for m in rows.values() if "acc_sampled" in m)
        print(f"acc: greedy pass@1; sampled: pass@1 of {m['samples']} samples a problem at temperature {m['temperature']:g}")
    for name, m in rows.items():
        if m.get("skipped"):
            print(f"{name}: {m['skipped']} of {m['n']} problems skipped, graded wrong: their prompt does not fit "
                  f"the model's context of {m.get('context', '?')} tokens")


def paired_interval(a, b, n_boot=4000, seed=0, k=1):
    """a, b: per-seed strings of per-problem grades ("0"/"1", the same problems in the same
    order, as evaluate() returns them; for sampled pass@1 each digit counts the right ones of
    k samples, `correct_sampled`) of two models or two variants. The 95% percentile
    interval, in points, of mean(a) - mean(b) when the problems are resampled with replacement
    (one resample for all seeds, so each problem stays paired with itself).

    It is the noise of grading on these problems and not others, the models held fixed; a
    t-interval over training seeds is the other half. Two students that fail on the same
    problems differ by little and get a narrow interval; the same two accuracies reached on
    different problems get a wide one, which an unpaired comparison cannot tell apart."""
    import numpy as np
    if len({len(x) for x in (*a, *b)}) != 1:
        raise common.UserError("per-problem grades of different lengths: were they graded on different problems?")
    # integer sums, one division: float means of thirds put an end that is exactly 0 at -5e-17,
    # which reads as "below" (a gap that is no finding)
    diff = len(b) * np.sum([[int(c) for c in x] for x in a], 0) - len(a) * np.sum([[int(c) for c in x] for x in b], 0)
    sums = diff[np.random.default_rng(seed).integers(0, len(diff), (n_boot, len(diff)))].sum(1)
    lo, hi = np.percentile(sums / (len(a) * len(b) * len(diff) * k), [2.5, 97.5])
    return 100 * float(lo), 100 * float(hi)


@torch.no_grad()
def lm_loss(model, enc, records, device, batch_size=64):
    """Mean next-token cross-entropy on solution tokens (teacher-forced, gold solutions)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(records), batch_size):
        pairs = [data.encode_example(enc, r) for r in records[b:b + batch_size]]
        idx, targets, _ = common.pad_batch(*zip(*pairs), device)
        _, loss = model(idx, targets)
        n = int((targets >= 0).sum())
        total, count = total + loss.item() * n, count + n
    model.train(was_training)
    return total / max(1, count)


def table(run_dir):
    """The stored metrics of every checkpoint of a run, in pipeline order."""
    rows = {}
    for name in ("teacher", "stage1", "stage2", "stage3", "stage4"):
        path = os.path.join(run_dir, f"{name}.pt")
        if os.path.exists(path):
            rows[name] = common.load_checkpoint(path)["metrics"]
    if not rows:
        raise common.UserError(f"no checkpoints (teacher.pt, stage1.pt, ...) in {run_dir}")
    return rows


def main():
    parser = common.ArgumentParser(description="Greedy pass@1 of a PADD checkpoint, overall and per subdomain; "
                                     "given several, each later one minus the first with a paired 95% interval.")
    parser.add_argument("--ckpt", nargs="+", help="checkpoint(s) to evaluate")
    parser.add_argument("--table", metavar="DIR", help="print the stored metrics of DIR/{teacher,stage1..4}.pt as one table")
    parser.add_argument("--data", default="suite",
                        help="'suite' (built-in test split), a benchmark name, a .jsonl path or a saved dataset folder")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test", "heldout"],
                        help="suite split; heldout: ~2,600 more validation problems (data.heldout_rows)")
    parser.add_argument("--data-seed", type=int, default=0,
                        help="seed of the suite's splits: the teacher's train_teacher.py --data-seed")
    parser.add_argument("--n", type=int, help="evaluate the first N problems only (a positive integer)")
    parser.add_argument("--question-field", help="column holding the problem, for a file or dataset of another layout")
    parser.add_argument("--answer-field", help="column holding the answer (#### x or \\boxed{x} read as x)")
    parser.add_argument("--batch-size", type=int, default=100, help="prompts generated together")
    parser.add_argument("--samples", type=int, default=SAMPLES,
                        help="k samples a problem for sampled pass@1, 0 to 9 (0: greedy only)")
    parser.add_argument("--temperature", type=float, default=SAMPLE_TEMPERATURE, help="temperature of those samples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples")
    parser.add_argument("--json", help="write the results (with the per-problem grades, without the predictions) here")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args()
    if args.table:
        rows = table(args.table)
        print_report(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if not args.ckpt:
        parser.error("give --ckpt PATH or --table DIR")
    if not 0 <= args.samples <= 9:
        raise common.UserError(f"--samples {args.samples}: must be 0 to 9 (per-problem counts are kept one digit each)")
    if args.temperature <= 0:
        raise common.UserError(f"--temperature {args.temperature}: must be above 0 (--samples 0 for greedy only)")
    if args.n is not None and args.n < 1:
        raise common.UserError(f"--n {args.n}: must be a positive integer (leave it out to evaluate every problem)")
    device = common.pick_device(args.device)
    records = load_records(args.data, args.split, args.data_seed, args.question_field, args.answer_field)
    records = records[:args.n] if args.n else records
    results = {}
    for path in args.ckpt:
        ckpt = common.load_checkpoint(path)
        enc = data.tokenizer_from_dict(ckpt["tokenizer"])
        model = common.build_model(ckpt, device)
        res = evaluate(model, enc, records, device, batch_size=args.batch_size, desc=os.path.basename(path),
                       samples=args.samples, temperature=args.temperature, seed=args.seed)
        res["active_params"], res["total_params"] = count_params(model)
        results[path] = {k: v for k, v in res.items() if k != "predictions"}
    print(f"{len(records)} problems from {args.data}")
    print_report(results)
    # every later checkpoint against the first, problem by problem: is the gap more than the
    # luck of these problems? (a quick ablation's question; the answer says nothing of seeds)
    first, *rest = args.ckpt
    for path in rest:
        a, b = results[path]["correct"], results[first]["correct"]
        lo, hi = paired_interval([a], [b])
        points = 100 * (results[path]["acc"] - results[first]["acc"])
        results[path]["minus_first"] = dict(points=points, ci95=[lo, hi])
        print(f"{path} minus {first}: greedy {points:+.1f} points, "
              f"95% over these problems [{lo:+.1f}, {hi:+.1f}]; only it right: {sum(x > y for x, y in zip(a, b))}, "
              f"only the first right: {sum(x < y for x, y in zip(a, b))}")
        if args.samples:
            lo, hi = paired_interval([results[path]["correct_sampled"]], [results[first]["correct_sampled"]],
                                     k=args.samples)
            points = 100 * (results[path]["acc_sampled"] - results[first]["acc_sampled"])
            results[path]["minus_first_sampled"] = dict(points=points, ci95=[lo, hi])
            print(f"{path} minus {first}: sampled {points:+.1f} points, 95% over these problems [{lo:+.1f}, {hi:+.1f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    common.run(main)
