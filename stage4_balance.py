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

Deviations: the paper runs Stages II-IV as one pipeline; here Stage IV is a second RL phase
started from the Stage III checkpoint (the same loop, fewer steps), so each stage can be
ablated on its own. Every other flag is Stage III's (`--algo`, `--mu`, `--w-*`).

    python stage4_balance.py --in out/default/stage3.pt --out out/default/stage4.pt --balance reward_bias
    torchrun --standalone --nproc_per_node=2 stage4_balance.py --in out/default/stage3.pt --out out/default/stage4.pt
"""

import math

import torch

import common
from stage3_prgrpo import make_parser, train

parser = make_parser(__doc__.split("\n\n")[0], "stage4", "out/default/stage3.pt", "out/default/stage4.pt")
parser.add_argument("--balance", choices=["none", "aux", "reward", "reward_bias"], default="reward_bias",
                    help="how load balance enters (see the docstring)")
parser.add_argument("--alpha", type=float, default=0.1, help="weight of the per-sample balance reward")
parser.add_argument("--bias-rate", type=float, default=0.01, help="u, step of the selection-bias update")
parser.add_argument("--load-ema", type=float, default=0.0,
                    help="the bias follows an exponential moving average of the global-batch load (0 = this batch only)")
parser.add_argument("--aux-weight", type=float, default=0.01, help="weight of the Switch loss for --balance aux")


def sample_load(topk_idx, sample_of_token, n_samples, n_expert):
    """Per-sample expert-load histogram: topk_idx [N, k], sample_of_token [N] -> [B, E]."""
    counts = torch.zeros(n_samples, n_expert, device=topk_idx.device)
    rows = sample_of_token[:, None].expand_as(topk_idx)
    return counts.index_put_((rows, topk_idx), torch.ones_like(topk_idx, dtype=counts.dtype), accumulate=True)


def balance_reward(loads):
    """Normalised entropy of each sample's load histogram, averaged over layers.
    loads: list over layers of [B, E] counts -> [B] in [0, 1] (1 = perfectly even)."""
    out = []
    for c in loads:
        p = c / c.sum(-1, keepdim=True).clamp(min=1)
        out.append(-(p * p.clamp(min=1e-12).log()).sum(-1) / math.log(c.size(-1)))
    return torch.stack(out).mean(0)


def bias_update(bias, load, rate):
    """DeepSeek-V3: b_e += u * sign(mean load - load_e). Returns the new bias."""
    return bias + rate * torch.sign(load.float().mean() - load.float())


def main():
    args = parser.parse_args()
    if args.balance == "aux":
        args.w_aux = args.aux_weight

    def loads_of(student, ro):
        B, E = ro["rewards"].numel(), student.config.n_expert
        return [sample_load(k, ro["sample_of_token"], B, E) for k in ro["topk_old"]]

    def sample_reward(student, ro):
        loads = loads_of(student, ro)
        # global batch, per layer, over prompt and completion tokens alike: evaluation measures
        # MaxVio on both, and balancing completions alone left the prompts' load skewed
        E = student.config.n_expert
        # (summed over ranks under torchrun, so every rank takes the same bias step)
        load = torch.stack([torch.bincount(k.flatten(), minlength=E) for k in ro["topk_all"]]).float()
        ro["load"] = common.all_reduce(load).cpu()
        if args.balance in ("reward", "reward_bias"):
            return args.alpha * balance_reward(loads).cpu()
        return torch.zeros(ro["rewards"].numel())

    ema = {}

    def after_rollout(student, ro):
        if args.balance == "reward_bias":
            ema["load"] = ro["load"] if "load" not in ema else args.load_ema * ema["load"] + (1 - args.load_ema) * ro["load"]
            for ffn, load in zip(student.ffns, ema["load"]):
                ffn.select_bias.copy_(bias_update(ffn.select_bias, load.to(ffn.select_bias.device), args.bias_rate))

    train(args, sample_reward=sample_reward, after_rollout=after_rollout)


if __name__ == "__main__":
    common.run(main)
