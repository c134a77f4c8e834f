"""
Stage IV: reward-augmented load balancing, on top of PR-GRPO.

The Stage III loop (stage3_prgrpo.train) keeps running, with the load of the experts brought
into the objective in one of these ways (`--balance`):

- none:   PR-GRPO unchanged (baseline).
- aux:    the Switch auxiliary loss  w_aux * sum_l E sum_e f_e P_e  added to every update
          (baseline: what most MoE training does).
- reward: a balance reward *per sample* added to the verifiable reward before the group
          normalisation. For sample i with expert-load histogram c_i,l over its completion
          tokens at layer l,
              b_i = mean_l H(c_i,l / |c_i,l|) / log E        normalised entropy in [0, 1]
              r_i <- r_i + alpha * b_i
          It has to be per sample: a reward equal across a group cancels in the advantage.
          With a 0/1 verifiable reward, a group whose samples are all right (or all wrong) has
          only alpha * b left to tell them apart, and the group normalisation divides that by
          its own spread: in such a group the balance term gets unit-sized advantages whatever
          alpha is. These groups are 40-48% of a Stage IV batch (`uniform_groups` in the log;
          19-69% per step, seeds 0 1 2). `--balance-adv separate` normalises the two apart,
              A_i = norm_G(r)_i + alpha * norm_G(b)_i,
          so alpha weighs the balance against correctness in every group. From the e3346d2
          study's Stage III (all 500 validation problems, seeds 0 / 1 / 2) it measured 50.6 /
          40.6 / 51.6 (47.6), MaxVio 0.12 / 0.08 / 0.11, against the spec's joint reading at
          50.8 / 40.6 / 51.6 (47.7), MaxVio 0.13 / 0.08 / 0.11 (both before Stage IV continued
          Stage III's prompt stream, "Deviations" below): at 8 steps of lr 1e-5 the RL
          steps move little either way (calibration alone also gave 47.7, table below), so the
          default stays the spec's `joint`. The log's `reward` is the verifiable reward alone
          (until the log gained `balance`, it included alpha * b); `balance` is the batch's mean b.
- reward_bias: the reward, plus DeepSeek-V3's selection-only router bias: after each rollout,
          per layer, with load_e the global-batch assignments to e,
              b_e <- b_e + u * sign(mean_e load_e - load_e)
          The bias shifts which experts are *selected* (top-k of logits + b) and never enters
          the gate values or the loss, so it balances without fighting the router's learning.
          Option: --load-ema a makes load_e an exponential moving average over rollout batches
          instead of the last batch (DeepSeek-V3's batches hold millions of tokens, ours 16
          prompts). Default 0, the paper's rule: a = 0.8 measured no better (README).

MaxVio = max_e load_e / mean_e load_e - 1 over the global batch, per layer, is logged every
step (`max_vio_batch`, mean over layers) and measured at the end on the test generations. Load
counts every token the student routes, prompt and completion alike (what inference pays for);
the balance reward looks at completion tokens only, the actions a sample chose.

Bias calibration (`--calibrate N`, reward_bias only): before the first RL step, N bias-only
steps on teacher-forced training problems (prompt + reference solution, drawn subdomain-first
like the RL prompts): route the batch, count the load, take one bias step. It costs forward
passes only (~10 s for 200 steps of 32 problems on CPU) and brings MaxVio from ~0.57 to ~0.1
before any sampling. Without it the sign rule, at u = 0.01 and one step per rollout batch,
needs ~40 RL steps to get there, and those 40 steps cost accuracy (below).

Since Stage II balances as it trains (stage2_distill.py, `--bias-rate`, from commit
ecefe9f), the bias arrives here already set: on its teacher-forced training batches the
calibration starts from MaxVio 0.23-0.30 (0.41-0.49 before; seeds 0 1 2) and still ends near
0.12. The ~1 point it cost on validation is gone (Stage III 46.0 -> Stage IV 46.6;
stage2_distill.py has the table), and on test Stage IV's cost fell from 0.6 to 0.4 points
(README, "The ablation study"). From the same Stage III checkpoints, calibration alone (`--steps
0`) gave 50.0 / 39.4 / 50.6 (46.7, MaxVio 0.09) against the default's 49.8 / 38.8 / 51.2 (46.6,
MaxVio 0.10): the 8 RL steps with the balance reward add nothing measurable at this scale. They
stay, since they are the spec's Stage IV (the per-sample balance reward acts only through them).
Skipping the calibration instead (`--calibrate 0`: the bias starts where Stage II left it and
takes only its per-rollout steps) gave 49.4 / 39.2 / 49.2 (45.9, MaxVio 0.09): the calibration
stays, though Stage II's bias alone already keeps MaxVio under 0.2.
The measurements below predate that change.

The RL steps run at a constant lr of 1e-5 since Stage III's peak fell from 1e-4 to 3e-5 (a
third of Stage III's peak, as 3e-5 had been of 1e-4). From the Stage III checkpoints of the
e3346d2 study (all 500 validation problems, seeds 0 / 1 / 2; Stage III itself 50.6 / 42.0 /
50.4, mean 47.7, MaxVio 0.16 / 0.13 / 0.16):

    | Stage IV                               | validation pass@1         | MaxVio            |
    | default of then: 8 RL steps at 3e-5    | 49.8 / 39.4 / 51.8 (47.0) | 0.13 / 0.07 / 0.11 |
    | 8 RL steps at 1e-5 (now the default)   | 50.8 / 40.6 / 51.6 (47.7) | 0.13 / 0.08 / 0.11 |
    | calibration alone (`--steps 0`)        | 50.8 / 40.8 / 51.6 (47.7) | 0.09 / 0.09 / 0.09 |
    | no calibration (`--calibrate 0`), 3e-5 | 50.4 / 39.8 / 50.0 (46.7) | 0.08 / 0.07 / 0.09 |
    | reward only (`--balance reward`), 3e-5 | 48.4 / 40.4 / 50.6 (46.5) | 0.16 / 0.13 / 0.16 |

The cost was the RL steps at 3e-5, not the calibration: the reward-only row leaves the routing
as it was and still loses 1.2 points. At 1e-5 the balance reward stays in the objective and
Stage IV costs nothing measurable against Stage III or calibration alone.

Defaults before that, chosen on the validation split from one Stage III checkpoint (500 problems; README
has the table): 200 calibration steps, then a quarter of Stage III's RL steps (8 at the default
preset, since Stage III went from 40 steps to 32; it was half, 20, until the table at the end of
this section) at lr 3e-5 instead of the 1e-4 Stage III had then. Validation acc / MaxVio,
Stage III 47.8 / 0.563:
40 steps at 1e-4 without calibration 44.6 / 0.101; calibration alone 46.8 / 0.069; calibration
+ 20 steps at 1e-4 45.0 / 0.072; calibration + 20 steps at 3e-5 48.4 / 0.073.

Measured again from the Stage III of commit f3f75d6 (lr 1e-4 decayed to 10%; all 500 validation problems,
seeds 0 / 1 / 2, single-threaded): Stage III 50.8 / 42.0 / 42.0 (mean 44.9, MaxVio 0.41). The
default Stage IV 49.8 / 41.2 / 40.4 (43.8, MaxVio 0.07); calibration alone (`--steps 0`) 50.0 /
41.2 / 41.2 (44.1); 60 calibration steps instead of 200 49.8 / 41.0 / 41.2 (44.0); the kept
distillation term at 1.0 instead of 0.05 49.8 / 42.0 / 41.0 (44.3); lr 5e-5 decayed to 10%
43.4. Balancing costs this student 0.6-1.1 points on validation whichever way it is done, and
most of it is already there after the calibration, before any RL step: the balanced routing
sends tokens to experts the router did not choose, and 20 RL steps do not retrain the experts
for it. The default is unchanged (the differences between the variants are within a seed's
noise, ~2 points per 500-problem accuracy); from the older, constant-lr Stage III the same
default had cost nothing (43.8 -> 43.9, calibration alone 44.4). After Stage II gained its
gold cross-entropy (0bd093d study, seeds 1 / 2, 500 validation problems) the default Stage IV
went from Stage III's 44.2 / 43.0 to 43.6 / 41.4: the same cost, 0.6 and 1.6 points.

Once Stage III kept its gold cross-entropy on (`--w-gold 1`, inherited here; stage3_prgrpo.py
has the table), from those Stage III checkpoints of the 476f523 study's Stage II (seeds 0 / 1 /
2, all 500 validation problems; Stage III 50.4 / 42.2 / 52.6, mean 48.4):

    | Stage IV                          | validation pass@1         | MaxVio (test)       |
    | 20 RL steps at 3e-5 (the old one) | 49.6 / 41.8 / 50.2 (47.2) | 0.102 / 0.048 / 0.075 |
    | 10 RL steps at 3e-5               | 51.0 / 41.0 / 49.2 (47.1) | 0.121 / 0.066 / 0.114 |
    | 20 RL steps at 1e-4, decayed      | 47.4 / 41.4 / -           | 0.107 / 0.056 / -     |

10 steps cost nothing measurable against 20 (-0.1 on the mean, one seed up, two down) and
leave MaxVio well under the 0.2 target, at half the RL time: the default is now 10. Balancing
still costs about a point against Stage III (48.4 -> 47.1): the calibration's routing, not
the RL steps, is where it goes.

Can supervised training under the balanced routing buy that point back? From the 98ebd2d
study's Stage IV checkpoints (validation 50.4 / 40.0 / 51.6, mean 47.3; its Stage III 48.3), 40
more steps of Stage II's loss, teacher-forced (`stage2_distill.py --in s4.pt --steps 40 --lr
1e-4 --lam-max 0`; the bias stays as calibrated): 52.2 / 39.8 / 51.4 (47.8), MaxVio 0.08-0.12.
One seed up 1.8, two down 0.2: not a repair we can tell from noise, so Stage IV has no such
phase. Stage IV's ~1 point cost (Stage III's table in stage3_prgrpo.py: 48.0 -> 46.9 at 40
steps) stands at this scale.

Deviations: the paper runs Stages II-IV as one pipeline; here Stage IV is a second RL phase
started from the Stage III checkpoint (the same loop, fewer steps, a smaller lr), so each stage
can be ablated on its own. Like one pipeline, it continues Stage III's prompt and sampling
streams: from a Stage III checkpoint of 32 steps, its step s draws what Stage III's step 32 + s
would have. Before, it restarted them and so replayed the prompts (and sampling seeds) of
Stage III's first 8 steps, gold cross-entropy included. From the e3346d2 study's Stage III
(all 500 validation problems, seeds 0 / 1 / 2) the continued streams gave 51.6 / 41.0 / 51.6
(48.1), MaxVio 0.09 / 0.06 / 0.07, against the replayed ones' 50.8 / 40.6 / 51.6 (47.7), MaxVio
0.13 / 0.08 / 0.11. With the continued streams, 16 RL steps instead of 8 gave 51.4 / 41.2 /
51.6 (48.1, the same) and lr 2e-5 instead of 1e-5 51.4 on seed 0 (51.6): the defaults stay.
The calibration is ours (DeepSeek-V3 has no need: its batches hold millions of tokens, so the
bias settles early in a long run). Every other flag is Stage III's
(`--algo`, `--mu`, `--w-*`).

    python stage4_balance.py --in out/default/stage3.pt --out out/default/stage4.pt --balance reward_bias
    torchrun --standalone --nproc_per_node=2 stage4_balance.py --in out/default/stage3.pt --out out/default/stage4.pt
"""

import math
import random

import torch

import common
import data
import eval_math
from stage3_prgrpo import PRESETS, group_advantages, make_parser, train

# bias-only calibration steps per preset (tiny: the smoke test's budget)
CALIBRATE = {"tiny": 20, "default": 200, "gpu": 200}

parser = make_parser(__doc__.split("\n\n")[0], "stage4", "out/default/stage3.pt", "out/default/stage4.pt")
parser.set_defaults(lr=1e-5, lr_final=1.0)  # constant 1e-5, chosen on validation (docstring)
parser.add_argument("--balance", choices=["none", "aux", "reward", "reward_bias"], default="reward_bias",
                    help="how load balance enters (see the docstring)")
parser.add_argument("--alpha", type=float, default=0.1, help="weight of the per-sample balance reward")
parser.add_argument("--balance-adv", choices=["joint", "separate"], default="joint",
                    help="joint: alpha*b joins the reward before the group normalisation (the spec); "
                         "separate: alpha times b's own group-normalised advantage (docstring)")
parser.add_argument("--bias-rate", type=float, default=0.01, help="u, step of the selection-bias update")
parser.add_argument("--load-ema", type=float, default=0.0,
                    help="the bias follows an exponential moving average of the global-batch load (0 = this batch only)")
parser.add_argument("--calibrate", type=int,
                    help="reward_bias: bias-only steps on teacher-forced training problems before the RL steps (preset if unset)")
parser.add_argument("--calib-batch", type=int, default=32, help="problems per calibration step")
parser.add_argument("--aux-weight", type=float, default=0.01, help="weight of the Switch loss for --balance aux")


def sample_load(topk_idx, sample_of_token, n_samples, n_expert):
    """Per-sample expert-load histogram: topk_idx [N, k], sample_of_token [N] -> [B, E]."""
    counts = torch.zeros(n_samples, n_expert, device=topk_idx.device)
    rows = sample_of_token[:, None].expand_as(topk_idx)
    return counts.index_put_((rows, topk_idx), torch.ones_like(topk_idx, dtype=counts.dtype), accumulate=True)


def balance_advantages(reward, balance, group, alpha, mode="joint"):
    """Advantages of Stage IV's samples from the verifiable reward [B] and the balance reward b
    [B]. joint: group_advantages(r + alpha b), the spec's reading. separate: group_advantages(r)
    + alpha * group_advantages(b), so alpha is the balance's weight against correctness in
    every group; joint divides a group whose samples are all right (or all wrong) by the
    spread of alpha b alone, which gives the balance term unit advantages whatever alpha is."""
    if mode == "joint":
        return group_advantages(reward + alpha * balance, group)
    return group_advantages(reward, group) + alpha * group_advantages(balance, group)


def balance_reward(loads):
    """Normalised entropy of each sample's load histogram, averaged over layers.
    loads: list over layers of [B, E] counts -> [B] in [0, 1] (1 = perfectly even)."""
    out = []
    for c in loads:
        p = c / c.sum(-1, keepdim=True).clamp(min=1)
        out.append(-(p * p.clamp(min=1e-12).log()).sum(-1) / math.log(c.size(-1)))
    return torch.stack(out).mean(0)


@torch.no_grad()
def calibrate_bias(model, batches, rate):
    """Bias-only balancing: for each (idx, valid) batch, route it (no sampling, no gradient) and
    take one common.bias_update step per layer on its load over the valid tokens, summed over ranks.
    Returns MaxVio per step (mean over layers), measured before that step's update."""
    was_training = model.training
    model.eval()
    curve = []
    for idx, valid in batches:
        model(idx)
        E = model.config.n_expert
        load = common.global_load([f.topk_idx[valid.flatten()] for f in model.ffns], E)
        curve.append(float(eval_math.max_vio(load.cpu()).mean()))
        common.step_select_bias(model.ffns, load, rate)
    model.train(was_training)
    return curve


def main():
    args = parser.parse_args()
    if args.steps is None:
        args.steps = max(1, PRESETS[args.preset]["steps"] // 4)
    if args.calibrate is None:
        args.calibrate = CALIBRATE[args.preset]
    if args.balance == "aux":
        args.w_aux = args.aux_weight

    def loads_of(student, ro):
        B, E = ro["rewards"].numel(), student.config.n_expert
        return [sample_load(k, ro["sample_of_token"], B, E) for k in ro["topk_old"]]

    def advantages(student, ro):
        # global batch, per layer, over prompt and completion tokens alike: evaluation measures
        # MaxVio on both, and balancing completions alone left the prompts' load skewed
        E = student.config.n_expert
        # (summed over ranks under torchrun, so every rank takes the same bias step)
        ro["load"] = common.global_load(ro["topk_all"], E).cpu()
        if args.balance not in ("reward", "reward_bias"):
            return group_advantages(ro["rewards"], args.group)
        ro["balance"] = balance_reward(loads_of(student, ro)).cpu()
        return balance_advantages(ro["rewards"], ro["balance"], args.group, args.alpha, args.balance_adv)

    ema = {}

    def after_rollout(student, ro):
        if args.balance == "reward_bias":
            ema["load"] = ro["load"] if "load" not in ema else args.load_ema * ema["load"] + (1 - args.load_ema) * ro["load"]
            common.step_select_bias(student.ffns, ema["load"], args.bias_rate)

    def before_loop(student, enc, sample, device, log):
        if args.balance != "reward_bias" or args.calibrate <= 0:
            return

        def batches():
            for i in range(args.calibrate):
                rng = random.Random(args.seed * 1_000_003 + 500_009 + i)
                problems = common.shard([sample(rng) for _ in range(args.calib_batch)])
                idx, _, valid = common.pad_batch(*zip(*[data.encode_example(enc, ex) for ex in problems]), device)
                yield idx, valid

        curve = calibrate_bias(student, batches(), args.bias_rate)
        common.append_jsonl(log, dict(stage=args.stage, calibration=True, max_vio_curve=curve))
        if common.is_main():
            print(f"bias calibration: {args.calibrate} steps, MaxVio {curve[0]:.3f} -> {curve[-1]:.3f}")

    train(args, advantages=advantages, after_rollout=after_rollout, before_loop=before_loop, continue_stream=True)


if __name__ == "__main__":
    common.run(main)
