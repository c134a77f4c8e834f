"""
Stage III: path-refined policy optimisation (PR-GRPO) of the MoE student.

GRPO with the grader as a verifiable reward. Each step samples G continuations of each of P
training prompts from the current student (KV cache) and grades them:

    r_i = 1[grader.is_equiv(extract_answer(text_i), gold)]               the grader IS the reward
    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)                   rl.group_advantages

then makes mu full-batch AdamW steps on the same rollouts, each minimising over the batch's
completion tokens t (policy_loss below):

    rho_t = gamma_t * pi_theta(y_t) / pi_old(y_t)
    L_pg  = -mean_t min(rho_t A_i, clip(rho_t, 1 - epsilon, 1 + epsilon) A_i)    rl.clipped_surrogate

`--algo` picks gamma_t and the extra terms:
- grpo:   gamma_t = 1.
- rspo:   RSPO's router-shift weight, per token, no gradient (rl.router_shift_weight):
              gamma_t = sg(max(gamma_min, exp(-mean_l mean_{e in TopK_old} |log g_theta(e|x_t) - log g_old(e|x_t)|)))
- prgrpo: rspo's gamma_t plus the path refinement *(our reading of the paper)*:
              + w_anchor  * mean_l mean_t sum_e |g_theta(e|x_t) - g_old(e|x_t)|      anchor the router
              + w_align   * mean_l mean_{t in A>0} KL(p_T(.|x_t) || g_theta(.|x_t))  follow T's path (losses.path_kl)
              + w_distill * mean_t KL(T || S)                                        Stage II kept on, small
              + w_gold    * mean over the step's gold-solution tokens of -log pi_theta (losses.gold_ce)
          p_T is the teacher's path from the Stage I clusters (losses.teacher_paths).

Every `rs_every` steps (a preset value) the router's distributions G_u on a fixed probe batch
(validation prompts + gold solutions, teacher-forced) are compared with the previous probe,
RS(u, u') = mean_l E_t sum_j |G_u(x_t)_j - G_u'(x_t)_j| (rl.router_shift), and logged as
`router_shift`: the paper's Figures 4 and 5. Stage IV (stage4_balance.py) is this loop plus a
per-sample balance reward and a selection-only router bias.

Defaults, chosen on the 500 validation problems over seeds 0-2 (the runs: docs/journal.md):
- --lr 3e-5, cosine to 10% (--lr-final 0.1): above Stage II on every seed; 1e-4, 5e-5, 2e-5 lower.
- 32 steps x 16 prompts x G 8: the study's time budget; 40 steps measured within noise of it.
- --mu 2: at mu 4 and 8 GRPO and RSPO lost accuracy and RSPO's gamma still stayed within 1% of 1.
- --epsilon 0.2: the spec's (PPO's) clip range.
- --gamma-min 0.5: RSPO's floor; it never binds here (gamma stays within 1% of 1).
- --temperature 1: 0.7 and 0.5 left more groups uniform and did not move accuracy.
- --w-gold 1 (prgrpo only): +0.8 points on every seed over 0; 3 was no better.
- --w-anchor 0.5, --w-align 0.05, --w-distill 0.05: our reading, not swept, except that
  --w-distill 0.3 and 1 measured no better.

Deviations from the paper (simplifications at small scale):
1. mu full-batch updates per rollout, not many minibatch updates: with minibatches RSPO's gamma
   still stayed within 1% of 1 and every algorithm lost accuracy.
2. The old policy's log-probs and routing are the first update pass's own, detached: that pass
   runs at the weights that sampled the rollout, so ratio and gamma are exactly 1 and the anchor
   exactly 0 on it, and no extra forward is needed (Stage IV, whose bias moves between rollout
   and update, takes one: rollout(record_old=True)).
3. No KL to a reference model (measured neutral at this budget) and no format reward (the spec
   allows a small one; it was never run here).
4. The gold cross-entropy is our addition (Stage II's, see stage2_distill.py), for prgrpo only:
   GRPO and RSPO run as their papers have them.
5. Prompts come from the suite's training split (subdomain first, then a problem); evaluation
   is greedy pass@1 on the test split.

The updates run on length-sorted micro-batches of about `--micro-tokens` padded tokens
(rl.length_buckets), gradients accumulated; every term is a sum over tokens divided by the
whole batch's count, so the step is the full batch's. Under torchrun the prompts are split over
ranks (a group never straddles ranks, so the advantages need no gather), every term is weighted
to the global batch (common.global_weight), expert loads are summed and gradients averaged.

    python stage3_prgrpo.py --in out/default/stage2.pt --out out/default/stage3.pt --algo prgrpo
    torchrun --standalone --nproc_per_node=2 stage3_prgrpo.py --in out/default/stage2.pt --out out/default/stage3.pt
"""

import argparse
import random
import time

import torch
from tqdm import tqdm

import common
import data
import eval_math
import grader
from losses import gold_ce, path_kl, teacher_paths, token_kl_loss
from model import count_params
from rl import (bucket, clipped_surrogate, clipped_tokens, expert_share, group_advantages, length_buckets,
                router_shift, router_shift_weight, token_logprobs, update_stats)

PRESETS = {
    "tiny": dict(steps=4, prompts=4, group=4, n_probe=16, n_test=42, rs_every=1, micro_tokens=2048),
    "default": dict(steps=32, prompts=16, group=8, n_probe=64, n_test=700, rs_every=2, micro_tokens=2048),
    "gpu": dict(steps=200, prompts=64, group=8, n_probe=128, n_test=700, rs_every=5, micro_tokens=32768),
}


def make_parser(description, stage, inp, out):
    p = common.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", default=inp, help="the student checkpoint to start from")
    p.add_argument("--teacher", help="the dense teacher (default: teacher.pt beside --in)")
    p.add_argument("--out", default=out, help="where to write the student checkpoint")
    p.add_argument("--algo", choices=["grpo", "rspo", "prgrpo"], default="prgrpo", help="policy-optimisation variant")
    p.add_argument("--preset", choices=PRESETS, default="default", help="budget preset")
    p.add_argument("--steps", type=int, help="rollout steps (preset if unset)")
    p.add_argument("--prompts", type=int, help="prompts per rollout step (preset if unset)")
    p.add_argument("--group", type=int, help="G, samples per prompt (preset if unset)")
    p.add_argument("--mu", type=int, default=2, help="full-batch updates (passes) per rollout batch")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate")
    p.add_argument("--lr-final", type=float, default=0.1,
                   help="cosine decay of the lr to this fraction of --lr by the last step (1 = constant)")
    p.add_argument("--epsilon", type=float, default=0.2, help="clip range of the surrogate: rho in [1 - eps, 1 + eps]")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--max-new", type=int, default=96, help="longest continuation sampled")
    p.add_argument("--gamma-min", type=float, default=0.5, help="floor of the router-shift weight (rspo, prgrpo)")
    p.add_argument("--w-anchor", type=float, default=0.5, help="prgrpo: weight of the router-shift penalty")
    p.add_argument("--w-align", type=float, default=0.05, help="prgrpo: weight of KL(p_T || g_S) on A > 0 samples")
    p.add_argument("--w-distill", type=float, default=0.05, help="prgrpo: weight of the kept Stage II KL(T || S)")
    p.add_argument("--w-gold", type=float, default=1.0,
                   help="prgrpo: weight of the kept Stage II cross-entropy on the step's prompts' gold solutions")
    p.add_argument("--micro-tokens", type=int, help="padded tokens per micro-batch of the updates (preset if unset)")
    common.add_run_args(p)
    p.set_defaults(stage=stage, w_aux=0.0)  # w_aux: the Switch loss, a flag of Stage IV's --balance aux
    return p


# what each flag may be (common.check_args); G = 1 would give every sample advantage 0
LIMITS = dict(steps=(1, None), prompts=(1, None), group=(2, None), mu=(1, None), lr=(0, None), lr_final=(0, 1),
              epsilon=(0, None), temperature=(1e-6, None), max_new=(1, None), gamma_min=(0, 1), w_anchor=(0, None),
              w_align=(0, None), w_distill=(0, None), w_gold=(0, None), micro_tokens=(1, None), n_probe=(1, None),
              rs_every=(1, None), w_aux=(0, None), alpha=(0, None), bias_rate=(0, None), calibrate=(0, None))


parser = make_parser(__doc__.split("\n\n")[0], "stage3", "out/default/stage2.pt", "out/default/stage3.pt")


# ----------------------------------------------------------------------------- the objective

def policy_loss(student, b, args, counts):
    """Bucket b's share of the step's loss (the docstring's L for `--algo`): every token term is
    a sum over b's tokens divided by the whole batch's count (counts: tokens, good = tokens of
    A > 0 samples, valid = non-pad tokens), so the buckets' losses add up to the batch's.
    Under torchrun each count is this rank's, and counts["weight"][k], its common.global_weight
    (absent: 1, one process), turns the rank's mean into its share of the global batch's mean
    once gradients are averaged over ranks.
    Returns (loss, diagnostics: gamma per token or None, and the clipped_tokens mask)."""
    with common.autocast(b["idx"].device):
        logits, _ = student(b["idx"])
    mflat = b["mask"].flatten()
    logp = token_logprobs(logits, b["targets"], args.temperature)
    logg = [f.router_probs[mflat].clamp(min=1e-9).log() for f in student.ffns]
    if "logp_old" not in b:
        # the first pass over a rollout runs at the weights that sampled it, so its own values,
        # detached, are the old policy's (ratio 1, gamma 1, anchor 0 on this pass) and the
        # rollout needs no forward of its own
        b.update(logp_old=logp.detach(), logg_old=[lg.detach() for lg in logg],
                 topk_old=[f.topk_idx[mflat] for f in student.ffns])

    def count(k):  # the global batch's count of k over the world size: this rank's divisor
        return counts[k] / counts.get("weight", {}).get(k, 1.0)

    n, L = count("tokens"), len(logg)
    gamma = None
    if args.algo in ("rspo", "prgrpo"):
        gamma = router_shift_weight(logg, b["logg_old"], b["topk_old"], args.gamma_min)
    loss = clipped_surrogate(logp, b["logp_old"], b["adv"], args.epsilon, gamma).sum() / n
    if args.algo == "prgrpo":
        if args.w_anchor > 0:
            anchor = sum((lg.exp() - lo.exp()).abs().sum() for lg, lo in zip(logg, b["logg_old"])) / (L * n)
            loss = loss + args.w_anchor * anchor
        good = b["adv"] > 0
        if args.w_align > 0 and good.any():
            align = sum(path_kl(p[good], lg[good].exp()).sum() for p, lg in zip(b["p_t"], logg)) / (L * count("good"))
            loss = loss + args.w_align * align
        if args.w_distill > 0:
            loss = loss + args.w_distill * token_kl_loss(b["t_logits"], logits[b["mask"]], beta=0.0).sum() / n
    if args.w_aux > 0:
        # Switch loss E sum_e f_e P_e: f_e is the whole batch's (counts["share"]), and P_e, a mean
        # of router probabilities over the batch's valid tokens, splits into per-bucket sums
        vflat = b["valid"].flatten()
        aux = sum(f.router_probs.size(-1) * (share * f.router_probs[vflat].sum(0)).sum()
                  for share, f in zip(counts["share"], student.ffns))
        loss = loss + args.w_aux * aux / count("valid")
    clipped = clipped_tokens(logp, b["logp_old"], b["adv"], args.epsilon, gamma)
    return loss, dict(gamma=gamma, clipped=clipped)


# ----------------------------------------------------------------------------- the loop

@torch.no_grad()
def probe_router(model, idx, valid):
    model(idx)
    return [f.router_probs[valid].clone() for f in model.ffns]


def rollout(student, enc, batch, args, gen, device, record_old=True):
    """Sample G continuations per prompt, grade them, and record what the updates need: with
    record_old, also the sampling policy's log-probs and routing from one no-grad forward."""
    eos = data.eos_id(enc)
    prompts, golds = [], []
    for ex in batch:
        p = eval_math.encode_prompt(enc, ex["question"])
        prompts += [p] * args.group
        golds += [ex["answer"]] * args.group
    student.eval()
    completions = student.generate(prompts, args.max_new, temperature=args.temperature, eos_id=eos, generator=gen)
    completions = [c if c else [eos] for c in completions]
    texts = [data.decode_completion(enc, c) for c in completions]
    correct = torch.tensor([float(grader.is_equiv(grader.extract_answer(t), g)) for t, g in zip(texts, golds)])
    idx, targets, valid = common.pad_batch(prompts, completions, device)
    ro = dict(idx=idx, targets=targets, valid=valid, correct=correct, rewards=correct,
              sample_of_token=torch.arange(len(prompts), device=device)[:, None].expand_as(targets)[targets >= 0])
    if record_old:
        # under the updates' autocast (bf16 on CUDA): in fp32 the first pass's ratio would not be
        # 1 nor its gamma 1, and the precision gap (~0.002 in router probabilities) outweighs the
        # router shift RSPO and the anchor are there to see
        with torch.no_grad(), common.autocast(device):
            logits, _ = student(idx)
        mflat = (targets >= 0).flatten()
        ro.update(logp_old=token_logprobs(logits, targets, args.temperature),
                  logg_old=[f.router_probs[mflat].clamp(min=1e-9).log() for f in student.ffns],
                  topk_old=[f.topk_idx[mflat] for f in student.ffns],
                  # every routed token, prompt included: the load that inference pays for
                  topk_all=[f.topk_idx[valid.flatten()] for f in student.ffns])
    student.train()
    return ro


def train(args, advantages=None, after_rollout=None, before_loop=None, continue_stream=False):
    """The RL loop shared by Stages III and IV.

    advantages(student, ro) -> [B] replaces group_advantages(ro["rewards"]) (Stage IV's balance
    reward enters there; it may set ro["balance"], a per-sample term whose mean is logged);
    after_rollout(student, ro) runs once per rollout batch (Stage IV's router-bias update);
    before_loop(student, enc, sample, device, log) runs once before the first step of a fresh run
    (Stage IV's bias calibration), where sample(rng) draws a training problem;
    continue_stream: from a Stage III checkpoint, step s draws the prompts and samples of
    Stage III's step (its steps + s), as one pipeline running on would (Stage IV); otherwise
    Stage IV's steps would replay the prompts of Stage III's first steps.
    """
    device, log = common.setup(args, PRESETS, args.stage, LIMITS)
    sckpt = common.load_checkpoint(args.inp, kind="moe")
    after = sckpt["args"].get("steps", 0) if continue_stream and sckpt["stage"] == "stage3" else 0
    stream = args.seed * 1_000_003 + after  # step s draws from stream + s (docstring: continue_stream)
    teacher_path = common.teacher_path_for(args.teacher, args.inp)
    tckpt = common.load_checkpoint(teacher_path, kind="dense")
    common.check_student(sckpt, tckpt, args.inp, teacher_path)
    inputs = common.made_from(args)
    enc = data.tokenizer_from_dict(sckpt["tokenizer"])
    student = common.build_model(sckpt, device)
    teacher = common.build_model(tckpt, device).eval()
    clusters = [c.to(device) for c in sckpt["clusters"]]
    splits = data.split_rows(seed=common.data_seed(tckpt))
    sample = data.subdomain_sampler(splits["train"])
    test, val = splits["test"][:args.n_test], splits["validation"]
    probe = [data.encode_example(enc, ex) for ex in val[:args.n_probe]]
    probe_idx, _, probe_valid = common.pad_batch(*zip(*probe), device)
    probe_valid = probe_valid.flatten()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, state = common.maybe_resume(args, student, opt, inputs)
    gen = torch.Generator(device=device)
    # The old policy's values need a forward of their own only where the first update pass does
    # not run at the rollout's weights and routing: in Stage IV (its bias moves between the
    # rollout and the updates, and its reward reads the rollout's routing).
    record_old = advantages is not None or after_rollout is not None
    t0 = time.time()
    if before_loop is not None and start == 0:
        before_loop(student, enc, sample, device, log)
    g_prev = state.get("g_prev") or probe_router(student, probe_idx, probe_valid)
    shifts = state.get("shifts", [])
    rewards_curve = state.get("rewards_curve", [])
    pbar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"{args.stage} {args.algo}",
                disable=not common.is_main())
    for step in pbar:
        rng = random.Random(stream + step)
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, args.steps, args.lr, final=args.lr_final)
        # under torchrun each rank rolls out its share of the prompts; a prompt's G samples stay
        # on one rank, so the group statistics of the advantage are exact without a gather
        batch = common.shard([sample(rng) for _ in range(args.prompts)])
        gen.manual_seed(stream + step + 7919 * common.rank())  # ranks sample apart
        ro = rollout(student, enc, batch, args, gen, device, record_old)
        gold = None
        if args.algo == "prgrpo" and args.w_gold > 0:
            gold = common.pad_batch(*zip(*[data.encode_example(enc, ex) for ex in batch]), device)[:2]
        rewards = ro["rewards"]
        adv = (group_advantages(rewards, args.group) if advantages is None else advantages(student, ro)).to(device)
        tok_adv = adv[ro["sample_of_token"]]
        # micro-batches of similar length, fixed across the mu passes
        lengths = ro["valid"].sum(1).tolist()
        buckets = [bucket(ro, tok_adv, rows.to(device), T) for rows, T in length_buckets(lengths, args.micro_tokens)]
        for b in buckets:
            if args.algo == "prgrpo" and (args.w_align > 0 or args.w_distill > 0):
                with common.autocast(device):
                    t_logits, p_t, _ = teacher_paths(teacher, b["idx"], clusters)
                b["t_logits"], b["p_t"] = t_logits[b["mask"]], [p[b["mask"].flatten()] for p in p_t]
        counts = dict(tokens=len(tok_adv), good=int((tok_adv > 0).sum()), valid=int(ro["valid"].sum()))
        if common.world() > 1:  # every term is a mean over the global batch
            counts["weight"] = {k: common.global_weight(counts[k], device) for k in ("tokens", "good", "valid")}
        if after_rollout is not None:
            after_rollout(student, ro)
        for _ in range(args.mu):
            if args.w_aux > 0:
                counts["share"] = expert_share(student, buckets)
            opt.zero_grad(set_to_none=True)
            loss, diags = 0.0, []
            for b in buckets:  # gradient accumulation: each bucket's loss is its share of the batch's
                part, diag = policy_loss(student, b, args, counts)
                part.backward()
                loss += part.detach()  # no .item() per bucket: on CUDA that is a sync each time
                diags.append(diag)
            l_gold = None
            if gold is not None:
                with common.autocast(device):
                    g_logits, _ = student(gold[0])
                l_gold = gold_ce(g_logits, gold[1], torch.tensor([], dtype=torch.long), device)
                (args.w_gold * l_gold).backward()
                loss += args.w_gold * l_gold.detach()
            common.optimizer_step(student, opt)
            stats = dict(loss=float(loss), **update_stats(diags, args.gamma_min))
            if l_gold is not None:
                stats["loss_gold"] = float(l_gold.detach())
        # uniform groups: every sample equally right (or wrong), so no correctness signal (DAPO's
        # zero-variance groups); Stage IV's balance term is then all their advantage carries
        c = ro["correct"].view(-1, args.group)
        means = [c.mean(), rewards.mean(), (c == c[:, :1]).all(1).float().mean(),
                 ro.get("balance", torch.zeros(1)).mean()]
        acc, mean_reward, uniform, balance = (float(v) / common.world() for v in common.all_reduce(
            torch.tensor([float(m) for m in means], device=device)))
        rewards_curve.append(acc)
        rec = dict(stage=args.stage, algo=args.algo, step=step + 1, reward=mean_reward, train_acc=acc,
                   uniform_groups=uniform, lr=opt.param_groups[0]["lr"], **stats)
        if "balance" in ro:
            rec["balance"] = balance
        if (step + 1) % args.rs_every == 0 or step + 1 == args.steps:
            g_now = probe_router(student, probe_idx, probe_valid)
            rec["router_shift"] = router_shift(g_now, g_prev)
            shifts.append((step + 1, rec["router_shift"]))
            g_prev = g_now
        if "load" in ro:
            rec["max_vio_batch"] = float(eval_math.max_vio(ro["load"]).mean())
        common.append_jsonl(log, rec)
        pbar.set_postfix(acc=f"{acc:.2f}", rs=f"{shifts[-1][1]:.4f}" if shifts else "-")
        if (step + 1) % 10 == 0 and step + 1 < args.steps:
            common.save_resume(args, student, opt, step + 1, sckpt["tokenizer"], g_prev=g_prev, shifts=shifts,
                               rewards_curve=rewards_curve, made_from=inputs)

    res = eval_math.evaluate(student, enc, test, device, desc=f"{args.stage} test")
    active, total = count_params(student)
    last = [s for u, s in shifts if u > 2 * args.steps / 3] or [s for _, s in shifts]
    metrics = dict(acc=res["acc"], per_subdomain=res["per_subdomain"], correct=res["correct"], algo=args.algo,
                   kl_to_teacher=eval_math.kl_to_teacher(student, teacher, enc, val[:200], device),
                   routing_entropy=res["routing_entropy"], max_vio=res["max_vio"], max_vio_per_layer=res["max_vio_per_layer"], expert_load=res["load"],
                   heatmap=res["heatmap"], router_shift=sum(last) / max(1, len(last)), router_shift_curve=shifts,
                   train_acc_curve=rewards_curve, active_params=active, total_params=total,
                   seconds=round(time.time() - t0, 1))
    common.save_checkpoint(args.out, common.make_checkpoint(student, sckpt["tokenizer"], args.stage, args, metrics,
                                                            clusters=sckpt["clusters"], made_from=inputs))
    common.append_jsonl(log, dict(stage=args.stage, step=args.steps, final=True,  # after the save
                                  **{k: v for k, v in metrics.items() if k != "heatmap"}))
    common.clear_resume(args)
    eval_math.print_report({sckpt["stage"]: sckpt["metrics"], args.stage: metrics})
    print(f"wrote {args.out} ({metrics['seconds']:.0f} s)")
    return metrics


def main():
    train(parser.parse_args())


if __name__ == "__main__":
    common.run(main)
