"""
Stage III: path-refined policy optimisation (PR-GRPO) of the MoE student.

GRPO with a verifiable reward. Each step takes P training prompts (subdomain first, then a
problem: data.subdomain_sampler, the test split's mix) and samples G continuations
of each from the current student (temperature 1, KV cache). The reward of sample i is

    r_i = 1[is_equiv(extract_answer(text_i), gold)]            (eval_math: the grader IS the reward)
    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)          group-normalised advantage

Then mu >= 2 passes over the same rollouts (with mu = 1 and fresh rollouts the ratio is
identically 1 and no ratio-based refinement could do anything), each pass `--minibatches`
optimiser steps on a random split of the samples (default 1: one full-batch step per pass),
each step minimising the token-level clipped surrogate over the completion tokens t of its
samples:

    rho_t = gamma_t * pi_theta(y_t) / pi_old(y_t)
    L_pg  = -mean_t min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i)  +  w_ref * KL_k3(pi_theta || pi_ref)

`--algo` picks gamma_t and the extra terms:
- grpo:   gamma_t = 1.
- rspo:   router-shift weight (RSPO, arXiv 2510.23027), per token, no gradient:
              gamma_t = sg(max(gamma_min, exp(-mean_l mean_{e in TopK_old} |log g_theta(e|x_t) - log g_old(e|x_t)|)))
          tokens whose routing moved since the rollout count less. This is RSPO as a plug-in on
          GRPO, one of the settings of its paper; the paper's headline method is RSPO on GMPO
          (geometric-mean policy optimisation), which `--agg geo` runs:
              L_pg = -mean_i A_i * exp(mean_{t in i} c_t),   c_t = log rho_t clipped to [-0.4, 0.4]
          on the pessimistic side of A_i (GMPO's range, `--geo-clip`): a per-sequence geometric
          mean of the ratios instead of a per-token mean. Measured from the ecefe9f study's
          Stage II checkpoints at the peak lr of then, 1e-4 (seeds 0 / 1 / 2; router shift
          over the last third, on the validation probe): RSPO with --agg geo 0.00152 / 0.00135 / 0.00155, GRPO 0.00170 /
          0.00134 / 0.00163, GMPO alone (grpo, --agg geo) 0.00155 / 0.00164 / 0.00160; gamma
          0.9997-0.9998 throughout. Neither the aggregation nor gamma moves the router
          measurably at our scale, so the default stays `--agg token`, like the other two.
- prgrpo: rspo's gamma_t plus the path refinement *(reading of the paper)*:
              + w_anchor * mean_l mean_t sum_e |g_theta(e|x_t) - g_old(e|x_t)|    anchor the router
              + w_align  * mean_l mean_{t in A>0} KL(p_T(.|x_t) || g_theta(.|x_t))   follow T's path on good samples
              + w_distill * mean_t KL(T || S)                                     Stage II kept on, small
              + w_gold * mean over the step's prompts' gold-solution tokens of -log pi_theta(y_t)
          p_T is T's path from the Stage I clusters (stage1_cluster.teacher_path). The last
          term is Stage II's gold cross-entropy (stage2_distill.gold_ce) kept on: one extra
          teacher-forced forward and backward per update on the P gold solutions of the step.

Schedule: AdamW at a peak lr of 3e-5, cosine-decayed to 10% of it by the last step (`--lr-final
0.1`), the shape of Stage II's schedule (whose own lr ends at 5e-5). The peak was 1e-4 until the
ecefe9f study, and lowered once Stage II balanced as it trained: from that study's Stage II
checkpoints (all 500 validation problems, seeds 0 / 1 / 2; Stage II itself 50.0 / 40.8 / 50.2,
mean 47.0, held-out KL(T||S) 0.0085), each Stage III, then Stage IV at its lr of then (3e-5):

    | peak lr      | Stage III (validation)    | then Stage IV             | KL(T||S) | RS, last third |
    | 1e-4 (was)   | 48.6 / 39.8 / 49.6 (46.0) | 49.8 / 38.8 / 51.2 (46.6) | 0.0127   | 0.0009         |
    | 5e-5         | 48.8 / 41.2 / 51.4 (47.1) | 49.4 / 38.8 / 52.4 (46.9) | 0.0108   | 0.0006         |
    | 3e-5 (now)   | 50.6 / 42.0 / 50.4 (47.7) | 49.8 / 39.4 / 51.8 (47.0) | 0.0098   | 0.0003         |
    | 2e-5         | 50.2 / 41.0 / 51.0 (47.4) |                           | 0.0092   | 0.0002         |

At 1e-4 Stage III ended below its Stage II on every seed; at 3e-5 above it on every seed (+0.6,
+1.2, +0.2), the first setting measured where it does. The train reward moves at no lr (mean
of the first 8 steps against the last 8: 0.34 -> 0.36, 0.30 -> 0.28, 0.42 -> 0.42 at 3e-5, the
same at 1e-4): what the smaller step buys is less drift from the student Stage II left (the
held-out KL rises 0.0013 over Stage II's instead of 0.0042) while the kept gold cross-entropy
goes on teaching. Stage IV at 3e-5 took part of it back (47.7 -> 47.0); at its lr of now, 1e-5,
it does not (47.7; stage4_balance.py). The baselines share
the schedule, so GRPO's and RSPO's router shift falls with it too. Everything measured below
this paragraph ran at the earlier peaks, except this one: the rollouts' temperature, from the
same Stage II checkpoints at 3e-5 (validation, seeds 0 / 1 / 2; the log-probs now take the
temperature): 1.0 (the default) 50.6 / 42.0 / 50.4 (47.7); 0.7 50.6 / 41.2 / 50.6 (47.5); 0.5
50.6 / 40.4 / 51.4 (47.5). Cooler rollouts are right more often (train reward 0.33-0.50 against
0.28-0.36) and leave more groups uniform (50-62% against 43-47%), and greedy accuracy does not
move: the default stays 1.

The 1e-4 peak had been chosen on the validation split (all 500 problems, seeds 0 / 1 / 2,
from the Stage II checkpoints of the 1a0ca2a study; single-threaded runs on the lent machine's
CPUs, whose torch 2.11 gave the same accuracies as our 2.13 where both ran): Stage II 49.6 /
39.6 / 40.2 (mean 43.1); PR-GRPO at a constant 5e-5 (the previous default) 49.6 / 40.2 / 41.6
(43.8); 1e-4 decayed to 10% 50.8 / 42.0 / 42.0 (44.9); 2e-4 decayed 47.4 / 40.0 / 39.6 (42.3).
A constant 1e-4 had lost to 5e-5 (40.4 / 40.6 against 43.0 / 42.6, seeds 1 and 2, first 500
validation problems): the decay is what makes the larger step pay, as it did for Stage II.
Raising the kept distillation term (`--w-distill` 0.3 or 1.0, at either lr) landed between
the two (44.3 to 44.5).

Measured again once Stage II had its gold cross-entropy (the 0bd093d study's Stage II
checkpoints, seeds 1 / 2, all 500 validation problems): Stage II 43.2 / 45.0 (mean 44.1);
PR-GRPO at the default 44.2 / 43.0 (43.6); lr 5e-5 44.0 / 44.6 (44.3); lr 2e-5 43.0 / 45.2
(44.1); sampling temperature 0.7 43.4 / 43.6 (43.5; a run from before the log-probs took the
temperature, so its ratios compared the untempered policy with the tempered one); vanilla GRPO
at the default 41.6 / 42.2 (41.9). Every PR-GRPO setting lands within a seed's noise (~2
points at 500 problems) of the Stage II it starts from: 40 steps of 128 samples move the
train reward from ~0.33 to ~0.35 and greedy accuracy not measurably. The default is unchanged; RESULTS.md says what this means
for the claims.

The kept gold cross-entropy (`--w-gold`, default 1; prgrpo only, the baselines stay as their
papers have them) is *our reading* of "the Stage II distillation term may stay on": our Stage II
is distillation plus that cross-entropy, and the cross-entropy is the half that still teaches
(stage2_distill.py: our teachers are under-trained, the labels are not). Chosen on all 500
validation problems, seeds 0 / 1 / 2, from the Stage II checkpoints of the 476f523 study
(Stage II itself 50.8 / 40.0 / 50.2, mean 47.0):

    | --w-gold | Stage III (validation)    | then Stage IV, same --w-gold | RS, last third |
    | 0        | 49.6 / 41.4 / 51.8 (47.6) | 49.0 / 40.6 / 50.0 (46.5)    | 0.0006         |
    | 1        | 50.4 / 42.2 / 52.6 (48.4) | 49.6 / 41.8 / 50.2 (47.2)    | 0.0009         |
    | 3        | 50.8 / 40.8 / 51.8 (47.8) |                              | 0.0010         |

+0.8 on every seed at 1, for ~7% more time a step. The router moves a little more (the
cross-entropy trains it too), still below GRPO's and RSPO's ~0.0012 in the 476f523 study.

Budget: 32 steps (40 until the 98ebd2d study) and no KL to the reference (`--w-ref` 0, was
0.01), to bring the whole study under the 60 minutes issue 4 gives it. Chosen on all 500
validation problems, seeds 0 / 1 / 2, from the Stage II checkpoints of the 98ebd2d study
(Stage II itself 50.2 / 39.2 / 51.4, mean 46.9), Stage IV after each at its default (a quarter
of the steps):

    | Stage III                        | Stage III (validation)    | then Stage IV             |
    | 40 steps, w_ref 0.01 (the old)   | 50.4 / 41.2 / 52.4 (48.0) | 49.2 / 40.0 / 51.6 (46.9) |
    | 40 steps, w_ref 0                | 49.8 / 41.0 / 52.6 (47.8) | 49.0 / 40.8 / 51.6 (47.1) |
    | 32 steps, w_ref 0.01             | 49.8 / 41.2 / 53.0 (48.0) | 49.0 / 39.4 / 50.4 (46.3) |
    | 32 steps, w_ref 0 (the default)  | 48.8 / 40.8 / 52.6 (47.4) | 49.2 / 40.0 / 50.0 (46.4) |

These Stage III runs took 128-129 s at the default against 164-190 s at 40 steps (two or three
single-threaded runs at once; the 98ebd2d study's prgrpo runs took 199-222 s). Every row is
within a seed's noise of the others (~2 points per 500 problems), but both 32-step rows end
~0.6 lower after Stage IV (46.3-46.4 against 46.9-47.1): on validation, that is what the
60-minute budget costs. Where time is no object, `--steps 40 --w-ref 0.01` (and Stage IV's
`--steps 10`) is the previous default.

Router shift: every `--rs-every` steps the student's router distributions G_u on a fixed probe
batch (validation prompts + gold solutions, teacher-forced) are compared with the previous
probe,  RS(u, u') = mean_l E_t sum_j |G_u(x_t)_j - G_u'(x_t)_j|,  and appended to the run's
JSON-lines log (`router_shift`): the paper's Figures 4 and 5 are drawn from it.

Stage IV (stage4_balance.py) is this loop plus a per-sample balance reward and a selection-only
router bias, passed in through `advantages` and `after_rollout`.

Simplifications (nanochat-style, all at small scale):
- no format reward by default (`--format-reward` adds one for emitting an extractable answer);
- no KL to a reference by default (`--w-ref`; the spec makes it optional, and at our budget it
  measured neutral, "Budget" above); when on, the reference is the input student, frozen;
- old log-probs and old router distributions are the first update pass's own, detached: that
  pass runs at the weights that sampled the rollout, so it is the sampling policy, and a
  separate no-grad forward (~8% of a step, measured) is needed only with `--minibatches` > 1 and in
  Stage IV (rollout(), record_old). On the first pass the ratio and gamma are exactly 1 and
  the anchor exactly 0 (with its own forward the anchor's |.| had a gradient of random sign);
- prompts come from the training split; evaluation is greedy pass@1 on the test split;
- mu = 2 full-batch updates per rollout, not the many minibatch updates of the RSPO paper. At
  our scale RSPO's gamma stays within ~1% of 1 for any mu tried (2, 4, 8), so RSPO's router
  shift equals GRPO's; GRPO and RSPO lose accuracy as mu grows while PR-GRPO holds (README,
  "Sweeps": the ablate.py --extra stage3="--mu M" runs). `--minibatches 4` (8 updates per
  rollout) keeps gamma at ~0.998 (spread within a batch under 1%) and puts RSPO's router shift
  5-6% below GRPO's on each seed, but costs every algorithm 0.4-2.2 points of accuracy and
  Stage III about a third more time: the default stays 1. (Numbers reported before commit 2a2b846,
  gamma ~0.57 and a collapse, came from a bug in minibatch bucketing, since fixed.)

    python stage3_prgrpo.py --in out/default/stage2.pt --out out/default/stage3.pt --algo prgrpo
    torchrun --standalone --nproc_per_node=2 stage3_prgrpo.py --in out/default/stage2.pt --out out/default/stage3.pt

The updates run on length-sorted micro-batches of about `--micro-tokens` padded tokens each,
gradients accumulated (`length_buckets`, `policy_loss`): every term above is a sum over tokens
divided by the whole batch's count, so the step is the full batch's (tested against one
bucket), without the ~40% padding of a rollout batch padded to its longest row. One term
needs the batch's expert shares f_e before the backward passes: the Switch loss of Stage IV's
`--balance aux` baseline, E sum_e f_e P_e, is not a sum over tokens, so with `--w-aux` each
update first counts f_e in one no-grad pass over the buckets (`expert_share`).

Under torchrun the prompts of a step are split over ranks and each rank rolls out its prompts'
G samples; a group never straddles ranks, so group-normalised advantages need no gather.
Rewards are averaged over ranks for the log, expert loads summed (Stage IV's bias and MaxVio
see the global batch), gradients averaged, and the test set is graded in shards. Every term of
the loss is a mean over the global batch's tokens (or samples, or A > 0 tokens): each rank
weighs its sums by its share of the global count (common.global_weight; at first only the
surrogate was, and the other terms were means of the ranks' means), and the Switch
loss's f_e is counted over all ranks (test_ranks_weighted_shares_average_to_the_global_batch_loss).

The log records, per step, `uniform_groups`: the share of groups whose samples are all right
or all wrong. Their correctness advantage is 0, so they teach nothing but the other terms
(Stage III from the e3346d2 study's Stage II: 43% and 47% of the groups on average, seeds 0
and 1, 6-88% per step; in Stage IV they carry the balance reward alone).

Does the loop learn at all, when the train reward does not climb? `--prompt-pool N` draws N
prompts once and cycles through them (0, the default: fresh prompts every step). From the
study's Stage II checkpoints, on validation (README, "Does the RL loop learn?"): GRPO on 16
prompts at a constant 1e-4 lifts their reward from 0.27 to 0.84 in 30 steps and loses 14 points
on unseen problems; four epochs over 128 prompts at the defaults lift the pool's reward by
0.06-0.09 and cost 1.4 points against fresh prompts (46.3 against 47.7, down on every seed).
The loop learns what it sees; at this budget that is the prompts, not the skill, so the
default keeps every prompt fresh.
"""

import argparse
import math
import random
import time

import torch
from tqdm import tqdm

import common
import data
import eval_math
from model import count_params
from stage1_cluster import teacher_paths
from stage2_distill import gold_ce, path_kl, token_kl_loss

PRESETS = {
    "tiny": dict(steps=4, prompts=4, group=4, n_probe=16, n_test=42, rs_every=1, micro_tokens=2048),
    "default": dict(steps=32, prompts=16, group=8, n_probe=64, n_test=700, rs_every=2, micro_tokens=2048),
    "gpu": dict(steps=200, prompts=64, group=8, n_probe=128, n_test=700, rs_every=5, micro_tokens=32768),
}


def make_parser(description, stage, inp, out):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="inp", default=inp, help="the student checkpoint to start from")
    p.add_argument("--teacher", help="the dense teacher (default: teacher.pt beside --in)")
    p.add_argument("--out", default=out, help="where to write the student checkpoint")
    p.add_argument("--algo", choices=["grpo", "rspo", "prgrpo"], default="prgrpo", help="policy-optimisation variant")
    p.add_argument("--preset", choices=PRESETS, default="default", help="budget preset")
    p.add_argument("--steps", type=int, help="rollout steps (preset if unset)")
    p.add_argument("--prompts", type=int, help="prompts per rollout step (preset if unset)")
    p.add_argument("--group", type=int, help="G, samples per prompt (preset if unset)")
    p.add_argument("--mu", type=int, default=2, help="passes (epochs) over each rollout batch")
    p.add_argument("--minibatches", type=int, default=1,
                   help="optimiser updates per pass, each on its share of the samples (mu * minibatches updates per rollout)")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate")
    p.add_argument("--lr-final", type=float, default=0.1,
                   help="cosine decay of the lr to this fraction of --lr by the last step (1 = constant)")
    p.add_argument("--clip", type=float, default=0.2, help="epsilon of the clipped surrogate")
    p.add_argument("--agg", choices=["token", "geo"], default="token",
                   help="token: GRPO's token-level mean of the clipped surrogate; geo: GMPO's per-sequence "
                        "geometric mean of the token ratios (see the docstring)")
    p.add_argument("--geo-clip", type=float, default=0.4,
                   help="--agg geo: each token's log-ratio is clipped to [-c, c] (GMPO's default 0.4)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--max-new", type=int, default=96, help="longest continuation sampled")
    p.add_argument("--w-ref", type=float, default=0.0,
                   help="weight of KL to the reference (input) student; 0, the default, skips the reference model")
    p.add_argument("--gamma-min", type=float, default=0.5, help="floor of the router-shift weight (rspo, prgrpo)")
    p.add_argument("--w-anchor", type=float, default=0.5, help="prgrpo: weight of the router-shift penalty")
    p.add_argument("--w-align", type=float, default=0.05, help="prgrpo: weight of KL(p_T || g_S) on A > 0 samples")
    p.add_argument("--w-distill", type=float, default=0.05, help="prgrpo: weight of the kept Stage II KL(T || S)")
    p.add_argument("--w-gold", type=float, default=1.0,
                   help="prgrpo: weight of the kept Stage II cross-entropy on the step's prompts' gold solutions")
    p.add_argument("--w-aux", type=float, default=0.0, help="weight of the Switch balance loss (stage 4: --balance aux)")
    p.add_argument("--format-reward", type=float, default=0.0, help="reward for an extractable answer")
    p.add_argument("--prompt-pool", type=int, default=0,
                   help="0 (default): fresh training prompts every step; N: draw N prompts once and cycle through "
                        "them, each rolled out steps * prompts / N times (docstring: 'Does the loop learn?')")
    p.add_argument("--micro-tokens", type=int, help="padded tokens per micro-batch of the updates (preset if unset)")
    p.add_argument("--rs-every", type=int, help="log router shift on the probe batch every N steps")
    common.add_run_args(p)
    p.set_defaults(stage=stage)
    return p


parser = make_parser(__doc__.split("\n\n")[0], "stage3", "out/default/stage2.pt", "out/default/stage3.pt")


# ----------------------------------------------------------------------------- pure pieces

def group_advantages(rewards, group, eps=1e-6):
    """(r - mean_G) / (std_G + eps) within each consecutive group of G samples. [B] -> [B]."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


def importance_ratio(logp, logp_old, gamma=None):
    """rho_t = gamma_t * pi_theta(y_t) / pi_old(y_t) (gamma None: 1)."""
    rho = torch.exp(logp - logp_old)
    return rho if gamma is None else gamma * rho


def clipped_surrogate(logp, logp_old, adv, clip, gamma=None):
    """Per-token PPO/GRPO objective to *minimise*: -min(rho A, clip(rho) A), rho = gamma * ratio."""
    rho = importance_ratio(logp, logp_old, gamma)
    return -torch.min(rho * adv, rho.clamp(1 - clip, 1 + clip) * adv)


def geo_mean_surrogate(logp, logp_old, adv, seq, clip, gamma=None):
    """GMPO's sequence-level objective to *minimise*, one entry per sequence of the bucket:
    -A_i * exp(mean_{t in i} c_t), where c_t is the token's log-ratio (plus log gamma_t) clipped
    pessimistically to [-clip, clip] (a token of A > 0 stops pushing up past +clip, of A < 0
    past -clip). seq [N] names each token's sequence (any order; the output is by sorted seq)."""
    lr = logp - logp_old
    if gamma is not None:
        lr = lr + gamma.log()
    s = adv.sign()
    c = s * torch.min(s * lr, s * lr.clamp(-clip, clip))
    ids, inv, n_tok = seq.unique(return_inverse=True, return_counts=True)
    mean = torch.zeros(len(ids), dtype=c.dtype, device=c.device).index_add(0, inv, c) / n_tok
    a = torch.zeros(len(ids), dtype=adv.dtype, device=adv.device).scatter(0, inv, adv)
    return -a * mean.exp()


def clipped_tokens(logp, logp_old, adv, clip, gamma=None, geo=False):
    """Tokens on the clipped branch of the surrogate, which carry no policy gradient: A > 0 with
    rho > 1 + eps, A < 0 with rho < 1 - eps (geo: GMPO's bounds on the log-ratio, rho > e^eps
    and rho < e^-eps). Logged as clip_frac because it is where RSPO acts hardest: a gamma below
    the lower bound puts a token of negative advantage there whatever its ratio."""
    rho = importance_ratio(logp, logp_old, gamma).detach()
    lo, hi = (math.exp(-clip), math.exp(clip)) if geo else (1 - clip, 1 + clip)
    return ((adv > 0) & (rho > hi)) | ((adv < 0) & (rho < lo))


def router_shift_weight(logg_new, logg_old, topk_old, gamma_min):
    """RSPO's gamma_t: lists over layers of log g [N, E] (new, old) and old top-k [N, k] ->
    [N], floored at gamma_min, and with no gradient."""
    dev = torch.stack([(ln.gather(1, k) - lo.gather(1, k)).abs().mean(1)
                       for ln, lo, k in zip(logg_new, logg_old, topk_old)]).mean(0)
    return torch.exp(-dev).clamp(min=gamma_min).detach()


def pool_prompts(pool, step, n):
    """--prompt-pool: step `step`'s n prompts, the next n of a fixed pool, wrapping around, so
    over whole epochs every pooled prompt comes up equally often."""
    return [pool[(step * n + i) % len(pool)] for i in range(n)]


def router_shift(g_a, g_b):
    """RS = mean_l E_t sum_j |G_a(x_t)_j - G_b(x_t)_j| over lists (layers) of [N, E]."""
    return float(torch.stack([(a - b).abs().sum(-1).mean() for a, b in zip(g_a, g_b)]).mean())


def token_logprobs(logits, targets, temperature=1.0):
    """log pi(y_t) for targets >= 0 (flattened), from logits [B, T, V]. pi is the policy the
    rollouts sample, softmax(logits / temperature): at a temperature other than 1 the ratio
    must compare that policy, not the untempered one, or the first pass's ratio is not 1."""
    mask = targets >= 0
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    lp = logits.log_softmax(-1)[mask]
    return lp.gather(1, targets[mask][:, None]).squeeze(1)


def minibatch_rows(n, m, seed=0):
    """Rows 0..n-1 in m minibatches of near-equal size: [LongTensor]. m = 1 keeps them in order
    (the full batch); otherwise a random split, seeded, PPO style."""
    order = torch.arange(n) if m == 1 else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [c for c in order.tensor_split(m) if len(c)]


def length_buckets(lengths, max_tokens):
    """Rows of a right-padded batch in micro-batches of similar length: [(rows, T)], rows in
    ascending order, T the bucket's longest row, each bucket about max_tokens padded tokens.
    Sorting first is the point: a rollout batch padded to its longest row is ~40% padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    out, cur = [], []
    for i in order:  # lengths grow along `order`, so lengths[i] is the bucket's T if i joins it
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    out.append(cur)
    return [(torch.tensor(sorted(b)), max(lengths[i] for i in b)) for b in out if b]


def bucket(ro, tok_adv, rows, T):
    """The rollout's rows `rows` cut to T columns, with their tokens' entries of the per-token
    tensors. Those list the batch's loss tokens row by row in ascending row order, so `pos` is
    in that order and the rows must be too: a minibatch's rows come in a random order, and
    unsorted they would pair each token's new log-prob with another token's old one."""
    rows = rows.sort().values
    pos = torch.isin(ro["sample_of_token"], rows).nonzero().squeeze(1)
    targets = ro["targets"][rows, :T]
    b = dict(pos=pos, idx=ro["idx"][rows, :T], targets=targets, mask=targets >= 0, valid=ro["valid"][rows, :T],
             adv=tok_adv[pos], seq=ro["sample_of_token"][pos])
    if "logp_old" in ro:  # else the first update pass supplies them (policy_loss)
        b.update(logp_old=ro["logp_old"][pos], logg_old=[g[pos] for g in ro["logg_old"]],
                 topk_old=[k[pos] for k in ro["topk_old"]])
    return b


def policy_loss(student, b, args, counts):
    """Bucket b's share of the step's loss (the docstring's L for `--algo`): every token term is
    a sum over b's tokens divided by the whole batch's count (counts: tokens, good = tokens of
    A > 0 samples, valid = non-pad tokens, samples), so the buckets' losses add up to the batch's.
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

    n, L, geo = count("tokens"), len(logg), args.agg == "geo"
    gamma = None
    if args.algo in ("rspo", "prgrpo"):
        gamma = router_shift_weight(logg, b["logg_old"], b["topk_old"], args.gamma_min)
    if geo:
        loss = geo_mean_surrogate(logp, b["logp_old"], b["adv"], b["seq"], args.geo_clip, gamma).sum() \
            / count("samples")
    else:
        loss = clipped_surrogate(logp, b["logp_old"], b["adv"], args.clip, gamma).sum() / n
    if "ref_logp" in b:
        d = b["ref_logp"] - logp
        loss = loss + args.w_ref * (torch.exp(d) - d - 1).sum() / n
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
    clipped = clipped_tokens(logp, b["logp_old"], b["adv"], args.geo_clip if geo else args.clip, gamma, geo)
    return loss, dict(gamma=gamma, clipped=clipped)


def update_stats(diags, gamma_min):
    """What the log says of one update, from its buckets' policy_loss diagnostics: the mean RSPO
    weight gamma, its spread over tokens, the share of tokens held at the floor gamma_min, and
    the share on the clipped branch. A near-uniform gamma only rescales the step, which AdamW's
    per-parameter normalisation undoes, so gamma_std says whether RSPO can act at all."""
    clipped = torch.cat([d["clipped"] for d in diags]).float()
    out = dict(gamma=1.0, gamma_std=0.0, gamma_floor=0.0, clip_frac=float(clipped.mean()))
    if diags[0]["gamma"] is not None:
        g = torch.cat([d["gamma"] for d in diags]).float()
        out.update(gamma=float(g.mean()), gamma_std=float(g.std(unbiased=False)),
                   gamma_floor=float((g <= gamma_min).float().mean()))
    return out


@torch.no_grad()
def expert_share(student, buckets):
    """Per layer, each expert's share of the top-k selections over the valid tokens of all
    buckets (summed over ranks under torchrun): the f of the Switch loss, which is not a sum over
    tokens and so needs a pass of its own before the bucketed backward passes."""
    counts = None
    for b in buckets:
        student(b["idx"])
        vflat = b["valid"].flatten()
        c = [torch.bincount(f.topk_idx[vflat].flatten(), minlength=f.router_probs.size(-1)) for f in student.ffns]
        counts = c if counts is None else [a + n for a, n in zip(counts, c)]
    counts = [common.all_reduce(c.float()) for c in counts]
    return [c / c.sum() for c in counts]


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
    preds = [eval_math.extract_answer(t) for t in texts]
    correct = torch.tensor([float(eval_math.is_equiv(p, g)) for p, g in zip(preds, golds)])
    rewards = correct + args.format_reward * torch.tensor([float(p is not None) for p in preds])
    idx, targets, valid = common.pad_batch(prompts, completions, device)
    ro = dict(idx=idx, targets=targets, valid=valid, correct=correct, rewards=rewards,
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
    device, log = common.setup(args, PRESETS, args.stage)
    if args.mu < 1 or args.minibatches < 1:
        raise common.UserError(f"--mu {args.mu} --minibatches {args.minibatches}: both must be at least 1")
    if args.minibatches > args.prompts // common.world() * args.group:
        # every rank must take the same number of optimiser steps, or the gradient all-reduce hangs
        raise common.UserError(f"--minibatches {args.minibatches} is more than the "
                               f"{args.prompts // common.world() * args.group} samples a rank rolls out per step")
    sckpt = common.load_checkpoint(args.inp, kind="moe")
    after = sckpt["args"]["steps"] if continue_stream and sckpt["stage"] == "stage3" else 0
    stream = args.seed * 1_000_003 + after  # step s draws from stream + s (docstring: continue_stream)
    if "clusters" not in sckpt:
        raise common.UserError(f"{args.inp} has no Stage I clusters (stage {sckpt['stage']})")
    tckpt = common.load_checkpoint(common.teacher_path_for(args.teacher, args.inp), kind="dense")
    enc = data.tokenizer_from_dict(sckpt["tokenizer"])
    student = common.build_model(sckpt, device)
    teacher = common.build_model(tckpt, device).eval()
    ref = common.build_model(sckpt, device).eval() if args.w_ref > 0 else None
    clusters = [c.to(device) for c in sckpt["clusters"]]
    splits = data.split_rows(seed=common.data_seed(tckpt))
    sample = data.subdomain_sampler(splits["train"])
    pool_rng = random.Random(args.seed * 1_000_003 - 1)  # one pool per seed, whatever the stream's offset
    pool = [sample(pool_rng) for _ in range(args.prompt_pool)] if args.prompt_pool > 0 else None
    test, val = splits["test"][:args.n_test], splits["validation"]
    probe = [data.encode_example(enc, ex) for ex in val[:args.n_probe]]
    probe_idx, _, probe_valid = common.pad_batch(*zip(*probe), device)
    probe_valid = probe_valid.flatten()
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, state = common.maybe_resume(args, student, opt)
    gen = torch.Generator(device=device)
    # The old policy's values need a forward of their own only where the first update pass does
    # not run at the rollout's weights and routing: with several minibatches (the second runs
    # after the first's optimiser step), and in Stage IV (its bias moves between the rollout and
    # the updates, and its reward reads the rollout's routing). Otherwise the first pass is it.
    record_old = args.minibatches > 1 or advantages is not None or after_rollout is not None
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
        batch = common.shard(pool_prompts(pool, after + step, args.prompts) if pool
                             else [sample(rng) for _ in range(args.prompts)])
        gen.manual_seed(stream + step + 7919 * common.rank())  # ranks sample apart
        ro = rollout(student, enc, batch, args, gen, device, record_old)
        gold = None
        if args.algo == "prgrpo" and args.w_gold > 0:
            gold = common.pad_batch(*zip(*[data.encode_example(enc, ex) for ex in batch]), device)[:2]
        rewards = ro["rewards"]
        adv = (group_advantages(rewards, args.group) if advantages is None else advantages(student, ro)).to(device)
        tok_adv = adv[ro["sample_of_token"]]
        plans = []  # (buckets, counts) of each minibatch, fixed across the mu passes
        for mb in minibatch_rows(len(rewards), args.minibatches, seed=stream + step):
            lengths = ro["valid"][mb.to(device)].sum(1).tolist()
            buckets = [bucket(ro, tok_adv, mb[rows].to(device), T) for rows, T in length_buckets(lengths, args.micro_tokens)]
            for b in buckets:
                if args.algo == "prgrpo" and (args.w_align > 0 or args.w_distill > 0):
                    with common.autocast(device):
                        t_logits, p_t, _ = teacher_paths(teacher, b["idx"], clusters)
                    b["t_logits"], b["p_t"] = t_logits[b["mask"]], [p[b["mask"].flatten()] for p in p_t]
                if ref is not None:
                    with torch.no_grad():
                        b["ref_logp"] = token_logprobs(ref(b["idx"])[0], b["targets"], args.temperature)
            adv_mb = torch.cat([b["adv"] for b in buckets])
            counts = dict(tokens=len(adv_mb), good=int((adv_mb > 0).sum()),
                          valid=int(sum(b["valid"].sum() for b in buckets)), samples=len(mb))
            if common.world() > 1:  # every term is a mean over the global minibatch
                counts["weight"] = {k: common.global_weight(counts[k], device)
                                    for k in ("tokens", "good", "valid", "samples")}
            plans.append((buckets, counts))
        if after_rollout is not None:
            after_rollout(student, ro)
        stats = {}
        for _ in range(args.mu):
            for buckets, counts in plans:
                if args.w_aux > 0:
                    counts["share"] = expert_share(student, buckets)
                opt.zero_grad(set_to_none=True)
                loss, diags = 0.0, []
                for b in buckets:  # gradient accumulation: each bucket's loss is its share of the minibatch's
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
                               rewards_curve=rewards_curve)

    res = eval_math.evaluate(student, enc, test, device, desc=f"{args.stage} test")
    active, total = count_params(student)
    last = [s for u, s in shifts if u > 2 * args.steps / 3] or [s for _, s in shifts]
    metrics = dict(acc=res["acc"], per_subdomain=res["per_subdomain"], correct=res["correct"], algo=args.algo,
                   kl_to_teacher=eval_math.kl_to_teacher(student, teacher, enc, val[:200], device),
                   routing_entropy=res["routing_entropy"], max_vio=res["max_vio"], max_vio_per_layer=res["max_vio_per_layer"], expert_load=res["load"],
                   heatmap=res["heatmap"], router_shift=sum(last) / max(1, len(last)), router_shift_curve=shifts,
                   train_acc_curve=rewards_curve, active_params=active, total_params=total,
                   seconds=round(time.time() - t0, 1))
    common.append_jsonl(log, dict(stage=args.stage, step=args.steps, final=True,
                                  **{k: v for k, v in metrics.items() if k != "heatmap"}))
    common.save_checkpoint(args.out, common.make_checkpoint(student, sckpt["tokenizer"], args.stage, args, metrics,
                                                            clusters=sckpt["clusters"]))
    common.clear_resume(args)
    eval_math.print_report({sckpt["stage"]: sckpt["metrics"], args.stage: metrics})
    print(f"wrote {args.out} ({metrics['seconds']:.0f} s)")
    return metrics


def main():
    train(parser.parse_args())


if __name__ == "__main__":
    common.run(main)
