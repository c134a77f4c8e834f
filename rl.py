"""
The pieces of the RL stages (III and IV) as small pure functions (the tests check each by hand).

    A_i   = (r_i - mean_group(r)) / (std_group(r) + eps)                  group_advantages
    rho_t = gamma_t * pi_theta(y_t) / pi_old(y_t)                         importance_ratio
    L_t   = -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i)            clipped_surrogate
    gamma_t = sg(max(gamma_min, exp(-mean_l mean_{e in TopK_old}
                 |log g_theta(e|x_t) - log g_old(e|x_t)|)))               router_shift_weight (RSPO)
    RS(u, u') = mean_l E_t sum_j |G_u(x_t)_j - G_u'(x_t)_j|               router_shift
    b_i   = mean_l H(load_i,l) / log E                                    balance_reward (Stage IV)
    logits = exp(s) * lm_head(ln_f(x))                                    add_logit_scale (a learned 1/T)
    logits / exp(s), no gradient to s                                     unscaled (the Stage II terms')

The updates run on length-sorted micro-batches (length_buckets, bucket) whose token sums are
divided by the whole batch's counts, so accumulated gradients are the full batch's.
"""

import collections
import math

import torch
from torch.nn.utils import parametrize

import common
import eval_math


def group_advantages(rewards, group, eps=1e-6):
    """(r - mean_G) / (std_G + eps) within each consecutive group of G samples. [B] -> [B]."""
    r = rewards.view(-1, group)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True, unbiased=False) + eps)).view(-1)


def importance_ratio(logp, logp_old, gamma=None):
    """rho_t = gamma_t * pi_theta(y_t) / pi_old(y_t) (gamma None: 1)."""
    rho = torch.exp(logp - logp_old)
    return rho if gamma is None else gamma * rho


def sequence_logp(logp, logp_old, seq):
    """GSPO's sequence-level ratio as per-token log-probs: logp_old + the mean over the token's
    sequence (seq [N], its sample's id) of log pi_theta - log pi_old, so that
    importance_ratio(result, logp_old) is s_i = (pi_theta(y_i) / pi_old(y_i))^(1/|y_i|) on every
    token of sample i, and its gradient is the sequence's mean token gradient."""
    _, inv = torch.unique(seq, return_inverse=True)
    diff = logp - logp_old
    sums = torch.zeros(int(inv.max()) + 1 if len(inv) else 0, dtype=diff.dtype, device=diff.device)
    sums = sums.index_add(0, inv, diff)
    mean = sums / torch.bincount(inv, minlength=len(sums)).to(diff.dtype)
    return logp_old + mean[inv]


def clipped_surrogate(logp, logp_old, adv, clip, gamma=None, clip_high=None):
    """Per-token PPO/GRPO objective to *minimise*: -min(rho A, clip(rho) A), rho = gamma * ratio,
    clipped to [1 - clip, 1 + clip_high] (clip_high None: clip; DAPO's clip-higher sets it larger)."""
    rho = importance_ratio(logp, logp_old, gamma)
    hi = clip if clip_high is None else clip_high
    return -torch.min(rho * adv, rho.clamp(1 - clip, 1 + hi) * adv)


def topk_changed(topk_new, topk_old):
    """Per token, whether the top-k *set* differs (order ignored): [N, k] x [N, k] -> [N] bool."""
    return (topk_new.sort(-1).values != topk_old.sort(-1).values).any(-1)


def extreme_ratio(logp, logp_old, lo=0.5, hi=2.0):
    """Per token, whether pi_theta / pi_old lies outside [lo, hi]: the tokens on which the
    updated and the sampling policy disagree by a factor of 2 or more (the drift metric
    `extreme_ratio`)."""
    rho = torch.exp(logp.detach() - logp_old)
    return (rho < lo) | (rho > hi)


def clipped_tokens(logp, logp_old, adv, clip, gamma=None, clip_high=None):
    """Tokens on the clipped branch of the surrogate, which carry no policy gradient: A > 0 with
    rho > 1 + eps, A < 0 with rho < 1 - eps. Logged as clip_frac because it is where RSPO acts
    hardest: a gamma below the lower bound puts a token of negative advantage there whatever
    its ratio."""
    rho = importance_ratio(logp, logp_old, gamma).detach()
    hi = clip if clip_high is None else clip_high
    return ((adv > 0) & (rho > 1 + hi)) | ((adv < 0) & (rho < 1 - clip))


def router_shift_weight(logg_new, logg_old, topk_old, gamma_min):
    """RSPO's gamma_t: lists over layers of log g [N, E] (new, old) and old top-k [N, k] ->
    [N], floored at gamma_min, and with no gradient."""
    dev = torch.stack([(ln.gather(1, k) - lo.gather(1, k)).abs().mean(1)
                       for ln, lo, k in zip(logg_new, logg_old, topk_old)]).mean(0)
    return torch.exp(-dev).clamp(min=gamma_min).detach()


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
    in that order and the rows must be too: rows given in another order would pair each token's
    new log-prob with another token's old one."""
    rows = rows.sort().values
    pos = torch.isin(ro["sample_of_token"], rows).nonzero().squeeze(1)
    targets = ro["targets"][rows, :T]
    b = dict(pos=pos, idx=ro["idx"][rows, :T], targets=targets, mask=targets >= 0, valid=ro["valid"][rows, :T],
             adv=tok_adv[pos], seq=ro["sample_of_token"][pos])
    if "topk_full" in ro:  # the rollout's selection at every position, for routing replay
        b["replay"] = [t[rows, :T].reshape(-1, t.size(-1)) for t in ro["topk_full"]]
    if "logp_old" in ro:  # else the first update pass supplies them (policy_loss)
        b.update(logp_old=ro["logp_old"][pos], logg_old=[g[pos] for g in ro["logg_old"]],
                 topk_old=[k[pos] for k in ro["topk_old"]])
    return b


class LogitScale(torch.nn.Module):
    """ln_f's gain times exp(log_scale). ln_f and lm_head have no bias, so every logit is
    multiplied by exp(log_scale): a learned inverse temperature, which never moves the argmax."""

    def __init__(self):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.zeros(()))

    def forward(self, gain):
        return gain * self.log_scale.exp()


def add_logit_scale(model, value=1.0):
    """Give model a learned logit scale (torch parametrize on ln_f's weight) that reads `value`
    with the logits unchanged (ln_f's gain divided by it: a scale a previous stage baked in,
    taken out again), and return its parameter, log_scale. The state dict then names ln_f's gain
    transformer.ln_f.parametrizations.weight.original; bake_logit_scale makes it plain again."""
    ln_f = model.transformer.ln_f
    with torch.no_grad():
        ln_f.weight.div_(value)
    parametrize.register_parametrization(ln_f, "weight", LogitScale().to(ln_f.weight.device))
    log_scale = ln_f.parametrizations.weight[0].log_scale
    with torch.no_grad():
        log_scale.fill_(math.log(value))
    return log_scale


def unscaled(model, logits):
    """The logits without the model's learned scale, logits / exp(s), which do not depend on s:
    a loss on them moves the weights only (the gradients reaching s through the scale and through
    the division cancel, to rounding)."""
    ln_f = model.transformer.ln_f
    if not parametrize.is_parametrized(ln_f, "weight"):
        return logits
    return logits.float() * (-ln_f.parametrizations.weight[0].log_scale).exp()  # fp32: bf16 would not cancel


def bake_logit_scale(model):
    """Fold a learned logit scale into ln_f's gain (the same logits), leaving a plain GPT."""
    if parametrize.is_parametrized(model.transformer.ln_f, "weight"):
        parametrize.remove_parametrizations(model.transformer.ln_f, "weight", leave_parametrized=True)
    return model


class RolloutCopy:
    """The policy the rollouts come from where it is not the updated policy itself: a copy `lag`
    rollout steps (lag x mu updates) behind (asynchronous RL's staleness) and/or in bf16 (an
    inference engine's precision), as large systems have it. Called before each rollout with
    the student, it keeps the student's weights and loads those of `lag` calls ago (fewer at the
    start) into the copy; `history` is what a resume file stores to go on with the same lag."""

    def __init__(self, model, lag, dtype=torch.float32, history=()):
        self.model = model.to(dtype)
        self.history = collections.deque(history, maxlen=lag + 1)

    def __call__(self, student):
        if self.history.maxlen == 1:  # lag 0 (bf16 only): copy straight across, nothing to keep
            self.model.load_state_dict(student.state_dict())
            return self.model
        self.history.append({k: v.detach().clone() for k, v in student.state_dict().items()})
        self.model.load_state_dict(self.history[0])
        return self.model


def update_stats(diags, gamma_min):
    """What the log says of one update, from its buckets' policy_loss diagnostics: the mean RSPO
    weight gamma, its spread over tokens, the share of tokens held at the floor gamma_min, and
    the share on the clipped branch. A near-uniform gamma only rescales the step, which AdamW's
    per-parameter normalisation undoes, so gamma_std says whether RSPO can act at all."""
    clipped = torch.cat([d["clipped"] for d in diags]).float()
    out = dict(gamma=1.0, gamma_std=0.0, gamma_floor=0.0, clip_frac=float(clipped.mean()))
    if "topk_changed" in diags[0]:  # the drift of the updated policy from the rollout's
        n = sum(len(d["extreme"]) for d in diags)
        out.update(topk_changed=float(torch.cat([d["topk_changed"] for d in diags]).mean()),
                   extreme_ratio=float(torch.cat([d["extreme"] for d in diags]).float().mean()),
                   rs_samples=float(sum(d["shift"] for d in diags)) / max(1, n))
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


def balance_advantages(reward, balance, group, alpha):
    """Advantages of Stage IV's samples from the verifiable reward r [B] and the balance reward
    b [B]: group_advantages(r + alpha b), the spec's joint reading. In a group whose samples are
    all right (or all wrong) only alpha b varies, so the normalisation gives the balance term
    unit advantages there whatever alpha is."""
    return group_advantages(reward + alpha * balance, group)


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
