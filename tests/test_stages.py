"""The pure pieces of each PADD stage, against hand computations."""

import argparse
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import common
from model import GPT, GPTConfig, count_params
from clustering import balanced_assign, balanced_kmeans, build_student, decompress, expert_neurons, neuron_profiles
from losses import adaptive_lambda, gold_ce, path_kl, switch_aux_loss, teacher_path, token_kl_loss
from rl import (balance_advantages, balance_reward, bucket, calibrate_bias, clipped_surrogate, clipped_tokens,
                expert_share, group_advantages, length_buckets, router_shift, router_shift_weight, sample_load,
                token_logprobs, update_stats)
from stage3_prgrpo import policy_loss
from eval_math import max_vio
from train_teacher import ema_update


# ----------------------------------------------------------------------------- Stage 0

def test_lr_at_warmup_then_cosine_to_the_final_fraction():
    assert common.lr_at(0, 100, 2.0, warmup=10) == pytest.approx(0.2)  # linear warmup
    assert common.lr_at(10, 100, 2.0, warmup=10) == pytest.approx(2.0)  # the peak right after it
    assert common.lr_at(55, 100, 2.0, warmup=10) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half-way down
    assert common.lr_at(100, 100, 2.0, warmup=10) == pytest.approx(0.2)  # final = 10% by default
    assert common.lr_at(100, 100, 2.0, final=0.0) == pytest.approx(0.0, abs=1e-12)
    assert [common.lr_at(s, 50, 1.0, final=1.0) for s in range(50)] == [1.0] * 50  # final 1: constant


def test_ema_update_matches_the_recurrence():
    """The in-place average against the recurrence written out, warm-up of the decay included."""
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(3, 2, generator=g), torch.randn(4, generator=g)] for _ in range(30)]
    avg = [w.clone() for w in weights[0]]
    ref = [w.double() for w in weights[0]]
    for step, ws in enumerate(weights):
        ema_update(avg, ws, 0.9, step)
        d = min(0.9, (1 + step) / (10 + step))  # 0.1 at step 0, the full 0.9 from step 80 on
        ref = [d * r + (1 - d) * w.double() for r, w in zip(ref, ws)]
    for a, r in zip(avg, ref):
        torch.testing.assert_close(a.double(), r, rtol=0, atol=1e-6)
    assert not torch.allclose(avg[0], weights[-1][0])  # an average, not the last weights
    ema_update(avg, [torch.zeros(3, 2), torch.zeros(4)], 0.9, 10_000)
    torch.testing.assert_close(avg[0].double(), 0.9 * ref[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- Stage I

def test_balanced_assign_hand_case():
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6], [0.1, 0.0]])
    # rows 0, 1 take column 0 first; column 0 is then full, so rows 2 and 3 go to column 1
    assert balanced_assign(sim, 2).tolist() == [0, 0, 1, 1]


def test_balanced_kmeans_sizes_and_planted_clusters():
    g = torch.Generator().manual_seed(0)
    E, per, D = 4, 16, 64
    centres = F.normalize(torch.randn(E, D, generator=g), dim=1)
    truth = torch.arange(E).repeat_interleave(per)
    feats = F.normalize(centres[truth] + 0.1 * torch.randn(E * per, D, generator=g), dim=1)
    assign = balanced_kmeans(feats, E, seed=1)
    assert torch.bincount(assign, minlength=E).tolist() == [per] * E
    # the planted grouping is recovered up to a relabelling
    for e in range(E):
        assert len(set(assign[truth == e].tolist())) == 1


def test_neuron_profiles_are_centred_unit_rows():
    prof = neuron_profiles(torch.randn(50, 12))
    assert prof.shape == (12, 50)
    assert torch.allclose(prof.norm(dim=1), torch.ones(12, dtype=prof.dtype))
    assert torch.allclose(prof.mean(dim=1), torch.zeros(12, dtype=prof.dtype), atol=1e-12)


def test_teacher_path_hand_case_and_sums_to_one():
    act = torch.tensor([[1.0, -3.0, 0.0, 4.0]])
    assign = torch.tensor([0, 1, 1, 0])
    assert torch.allclose(teacher_path(act, assign, 2), torch.tensor([[5 / 8, 3 / 8]]))
    p = teacher_path(torch.randn(7, 3, 32), torch.arange(32) % 4, 4)
    assert p.shape == (7, 3, 4) and torch.allclose(p.sum(-1), torch.ones(7, 3))


def test_decompress_experts_compute_the_teachers_neurons():
    torch.manual_seed(0)
    H, d, E, h = 16, 6, 4, 8
    w_fc, w_proj = torch.randn(H, d), torch.randn(d, H)
    neurons = torch.stack([torch.randperm(H)[:h] for _ in range(E)])
    w_in, w_out = decompress(w_fc, w_proj, neurons)
    assert w_in.shape == (E, d, h) and w_out.shape == (E, h, d)
    x = torch.randn(5, d)
    for e in range(E):
        sel = neurons[e]
        want = F.gelu(x @ w_fc[sel].T) @ w_proj[:, sel].T
        assert torch.allclose(F.gelu(x @ w_in[e]) @ w_out[e], want, atol=1e-5)
    # one expert holding every neuron is exactly the dense FFN
    w_in, w_out = decompress(w_fc, w_proj, torch.arange(H)[None])
    assert torch.allclose(F.gelu(x @ w_in[0]) @ w_out[0], F.gelu(x @ w_fc.T) @ w_proj.T, atol=1e-5)


def test_expert_neurons_start_with_their_cluster_and_are_distinct():
    torch.manual_seed(0)
    H, E, h = 32, 4, 16
    act = torch.randn(200, H)
    assign = torch.arange(H) % E
    rows = expert_neurons(act, assign, E, h, torch.ones(H))
    assert rows.shape == (E, h)
    for e in range(E):
        members = set((assign == e).nonzero().flatten().tolist())
        assert set(rows[e, :len(members)].tolist()) == members
        assert len(set(rows[e].tolist())) == h


@pytest.mark.parametrize("init", ["cluster", "random_subsets", "random"])
def test_build_student_equal_active_params_and_copied_attention(init):
    torch.manual_seed(0)
    teacher = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    H, E, k = 128, 8, 2
    acts = [torch.randn(300, H) for _ in range(2)]
    xs = [torch.randn(300, 32) for _ in range(2)]
    clusters = [torch.arange(H) % E for _ in range(2)]
    student = build_student(teacher, E, k, init, clusters, acts, xs, router_steps=5, seed=0)
    a_t, _ = count_params(teacher)
    a_s, t_s = count_params(student)
    assert abs(a_s - a_t) / a_t < 0.02 and t_s > a_t
    assert torch.equal(student.transformer.h[1].attn.c_attn.weight, teacher.transformer.h[1].attn.c_attn.weight)
    assert torch.equal(student.transformer.wte.weight, teacher.transformer.wte.weight)


# ----------------------------------------------------------------------------- Stage II

def test_token_kl_loss_forward_reverse_and_zero():
    t, s = torch.randn(5, 11), torch.randn(5, 11)
    lt, ls = t.log_softmax(-1), s.log_softmax(-1)
    fkl = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
    rkl = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(token_kl_loss(t, s, beta=0.0), fkl, atol=1e-6)
    assert torch.allclose(token_kl_loss(t, s, beta=1.0), rkl, atol=1e-6)
    beta = lt.exp().max(-1).values
    assert torch.allclose(token_kl_loss(t, s), beta * rkl + (1 - beta) * fkl, atol=1e-6)
    assert torch.allclose(token_kl_loss(t, t), torch.zeros(5), atol=1e-6)


def test_path_kl_hand_case():
    p, g = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(float(path_kl(p, g)), want, rel_tol=1e-5)


def test_switch_aux_loss_is_one_when_balanced_and_larger_when_not():
    probs = torch.full((4, 4), 0.25)
    assert math.isclose(float(switch_aux_loss(probs, torch.tensor([[0], [1], [2], [3]]))), 1.0, rel_tol=1e-6)
    skew = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    assert float(switch_aux_loss(skew, torch.zeros(4, 1, dtype=torch.long))) == pytest.approx(4 * 0.7)


def test_adaptive_lambda_ramps_with_kl():
    assert adaptive_lambda(1.0, 1.0, 0.5) == 0.0
    assert adaptive_lambda(0.75, 1.0, 0.5) == pytest.approx(0.25)
    assert adaptive_lambda(0.2, 1.0, 0.5) == 0.5
    assert adaptive_lambda(1.5, 1.0, 0.5) == 0.0


# ----------------------------------------------------------------------------- Stage III

def test_group_advantages_hand_case():
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), 4)
    std = math.sqrt(0.25 * 0.75)
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-6), atol=1e-5)
    assert torch.equal(adv[4:], torch.zeros(4))  # an all-correct group teaches nothing


def test_clipped_surrogate_hand_cases():
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    got = clipped_surrogate(lp, torch.zeros(5), adv, 0.2)
    # ratio 1.5, A>0: clipped to 1.2 | ratio 1.5, A<0: unclipped 1.5 | ratio .5, A>0: .5 |
    # ratio .5, A<0: clipped .8 | ratio 1: plain
    assert torch.allclose(got, torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.0]), atol=1e-6)
    g = torch.tensor([0.5, 1, 1, 1, 1])
    assert float(clipped_surrogate(lp, torch.zeros(5), adv, 0.2, g)[0]) == pytest.approx(-0.75)


def test_clipped_surrogate_gradient_vanishes_outside_the_clip():
    lp = torch.log(torch.tensor([1.5, 1.1])).requires_grad_(True)
    clipped_surrogate(lp, torch.zeros(2), torch.ones(2), 0.2).sum().backward()
    assert lp.grad[0] == 0 and lp.grad[1] != 0


def test_clipped_tokens_are_those_whose_gradient_vanishes():
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0, 1.0, 1.0])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, -1.0, 0.0])
    g = torch.tensor([1, 1, 1, 1, 1, 0.5, 0.5])  # a gamma at the floor clips an A < 0 token at ratio 1
    mask = clipped_tokens(lp, torch.zeros(7), adv, 0.2, g)
    assert mask.tolist() == [True, False, False, True, False, True, False]
    clipped_surrogate(lp, torch.zeros(7), adv, 0.2, g).sum().backward()
    assert torch.equal(lp.grad[:6] == 0, mask[:6])  # A = 0 (last) has no gradient on either branch
    assert clipped_tokens(lp, torch.zeros(7), adv, 0.2)[5].item() is False


def test_update_stats_spread_floor_and_clip_share():
    d = [dict(gamma=torch.tensor([0.5, 1.0]), clipped=torch.tensor([True, False])),
         dict(gamma=torch.tensor([0.5, 1.0]), clipped=torch.tensor([False, False]))]
    s = update_stats(d, 0.5)
    assert s == pytest.approx(dict(gamma=0.75, gamma_std=0.25, gamma_floor=0.5, clip_frac=0.25))
    s = update_stats([dict(gamma=None, clipped=torch.tensor([False, True]))], 0.5)
    assert s == dict(gamma=1.0, gamma_std=0.0, gamma_floor=0.0, clip_frac=0.5)


def test_router_shift_hand_distributions():
    a = [torch.tensor([[0.5, 0.5], [1.0, 0.0]])]
    b = [torch.tensor([[1.0, 0.0], [1.0, 0.0]])]
    assert router_shift(a, b) == pytest.approx(0.5)   # (1.0 + 0.0) / 2 tokens
    assert router_shift(a, a) == 0.0
    two_layers = router_shift(a + a, b + a)
    assert two_layers == pytest.approx(0.25)           # mean over layers


def test_router_shift_weight_floor_and_stop_gradient():
    old = [torch.log(torch.tensor([[0.5, 0.3, 0.2]]))]
    topk = [torch.tensor([[0, 1]])]
    same = old[0].clone().requires_grad_(True)
    g = router_shift_weight([same], old, topk, 0.1)
    assert torch.allclose(g, torch.ones(1)) and not g.requires_grad
    moved = [torch.log(torch.tensor([[0.25, 0.6, 0.15]]))]
    want = math.exp(-(abs(math.log(0.25 / 0.5)) + abs(math.log(0.6 / 0.3))) / 2)
    assert float(router_shift_weight(moved, old, topk, 0.1)) == pytest.approx(want, rel=1e-5)
    far = [torch.log(torch.tensor([[0.001, 0.001, 0.998]]))]
    assert float(router_shift_weight(far, old, topk, 0.3)) == pytest.approx(0.3)


def test_length_buckets_cover_every_row_once_and_cut_the_padding():
    lengths = [30, 7, 12, 30, 5, 22, 9, 17, 25, 6]
    buckets = length_buckets(lengths, max_tokens=60)
    rows = torch.cat([r for r, _ in buckets]).tolist()
    assert sorted(rows) == list(range(len(lengths)))
    for r, T in buckets:
        assert r.tolist() == sorted(r.tolist()) and T == max(lengths[i] for i in r)
        assert len(r) * T <= 60 or len(r) == 1
    assert sum(len(r) * T for r, T in buckets) < len(lengths) * max(lengths)
    assert len(length_buckets(lengths, max_tokens=10_000)) == 1


def test_bucket_lines_up_its_tokens_with_the_rollout_whatever_the_row_order():
    # rows given out of order must still pair each token's new log-prob with its own old one
    # (the per-token tensors list the rollout's tokens in ascending row order)
    model, ro = small_rollout(moved=False)  # the rollout's own weights: ratio 1, gamma 1
    tok_adv = torch.arange(len(ro["logp_old"]), dtype=torch.float)
    for rows in (torch.tensor([4, 1, 3]), torch.tensor([5, 0, 2, 1])):
        b = bucket(ro, tok_adv, rows, int(ro["valid"][rows].sum(1).max()))
        with torch.no_grad():
            logits, _ = model(b["idx"])
            logp = token_logprobs(logits, b["targets"])
            logg = [f.router_probs[b["mask"].flatten()].log() for f in model.ffns]
        assert torch.allclose(logp, b["logp_old"], atol=1e-6)
        assert torch.equal(ro["sample_of_token"][b["pos"]], ro["sample_of_token"][b["pos"]].sort().values)
        g = router_shift_weight(logg, b["logg_old"], b["topk_old"], 0.5)
        assert torch.allclose(g, torch.ones_like(g), atol=1e-5)


def small_rollout(moved=True):
    """A tiny MoE student and a rollout-like batch of six rows of different lengths, the policy
    moved a little since (so ratios and gamma differ from 1) unless moved=False."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_expert=4, top_k=2))
    lens = [(3, 9), (5, 2), (4, 14), (2, 6), (6, 11), (3, 3)]
    prompts = [torch.randint(1, 64, (p,)).tolist() for p, _ in lens]
    comps = [torch.randint(1, 64, (c,)).tolist() for _, c in lens]
    idx, targets, valid = common.pad_batch(prompts, comps, torch.device("cpu"))
    mflat = (targets >= 0).flatten()
    with torch.no_grad():
        logits, _ = model(idx)
        ro = dict(idx=idx, targets=targets, valid=valid, logp_old=token_logprobs(logits, targets),
                  logg_old=[f.router_probs[mflat].log() for f in model.ffns],
                  topk_old=[f.topk_idx[mflat] for f in model.ffns],
                  # every position's selection, for r3's replay (the rollout records it so)
                  topk_full=[f.topk_idx.view(*idx.shape, -1) for f in model.ffns],
                  sample_of_token=torch.arange(len(lens))[:, None].expand_as(targets)[targets >= 0])
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p) * moved)
    return model, ro


@pytest.mark.parametrize("algo", ["grpo", "gspo", "r3", "rspo", "prgrpo"])
def test_bucketed_policy_loss_has_the_full_batch_gradient(algo):
    # the updates run on length-sorted micro-batches; their summed gradient must be the one
    # the whole padded batch gives (the slow reference: one bucket holding every row)
    model, ro = small_rollout()
    valid, n = ro["valid"], len(ro["logp_old"])
    tok_adv = torch.randn(valid.size(0))[ro["sample_of_token"]]
    extra = dict(t_logits=torch.randn(n, 64), p_t=[torch.softmax(torch.randn(n, 4), -1) for _ in range(2)])
    args = argparse.Namespace(algo=algo, gamma_min=0.5, epsilon=0.2, epsilon_high=0.2, w_anchor=0.5,
                              w_align=0.3, w_distill=0.2, w_aux=0.4, temperature=1.0)
    counts = dict(tokens=n, good=int((tok_adv > 0).sum()), valid=int(valid.sum()))

    def grads(max_tokens):
        buckets = []
        for rows, T in length_buckets(valid.sum(1).tolist(), max_tokens):
            b = bucket(ro, tok_adv, rows, T)
            b.update(t_logits=extra["t_logits"][b["pos"]], p_t=[p[b["pos"]] for p in extra["p_t"]])
            buckets.append(b)
        counts["share"] = expert_share(model, buckets)
        model.zero_grad()
        total = 0.0
        for b in buckets:
            loss, _ = policy_loss(model, b, args, counts)
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    if algo == "r3":  # the replay must matter: the moved router picks other experts somewhere
        with torch.no_grad():
            model(ro["idx"])
        assert any(not torch.equal(f.topk_idx.view_as(t), t) for f, t in zip(model.ffns, ro["topk_full"]))
    loss_full, g_full = grads(10_000)
    loss_split, g_split = grads(40)
    assert len(length_buckets(valid.sum(1).tolist(), 40)) >= 3
    assert loss_split == pytest.approx(loss_full, rel=1e-5)
    assert len(g_split) == len(g_full)
    for a, b in zip(g_split, g_full):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("algo", ["grpo", "gspo", "r3", "rspo", "prgrpo"])
def test_first_pass_stands_in_for_the_rollout_forward(algo):
    # Stage III takes the old policy's values from the first update pass instead of a forward
    # of its own: at the rollout's weights that must give the same loss and gradient
    model, ro = small_rollout(moved=False)
    n = len(ro["logp_old"])
    tok_adv = torch.randn(ro["valid"].size(0), generator=torch.Generator().manual_seed(1))[ro["sample_of_token"]]
    args = argparse.Namespace(algo=algo, gamma_min=0.5, epsilon=0.2, epsilon_high=0.2, w_anchor=0.0,
                              w_align=0.0, w_distill=0.0, w_aux=0.0, temperature=1.0)
    counts = dict(tokens=n, good=int((tok_adv > 0).sum()), valid=int(ro["valid"].sum()))
    bare = {k: v for k, v in ro.items() if k not in ("logp_old", "logg_old", "topk_old")}

    def run(r, **kw):
        buckets = [bucket(r, tok_adv, rows, T) for rows, T in length_buckets(ro["valid"].sum(1).tolist(), 40)]
        model.zero_grad()
        loss = 0.0
        for b in buckets:
            part, _ = policy_loss(model, b, argparse.Namespace(**{**vars(args), **kw}), counts)
            part.backward()
            loss += part.item()
        return loss, [p.grad.clone() for p in model.parameters() if p.grad is not None], buckets

    loss_sep, g_sep, _ = run(ro)
    loss_first, g_first, buckets = run(bare)
    assert loss_first == pytest.approx(loss_sep, rel=1e-5)
    for a, b in zip(g_first, g_sep):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert all("logp_old" in b for b in buckets)  # kept for the second pass
    if algo == "prgrpo":  # the anchor is exactly 0 on the first pass, not rounding noise
        assert run(bare, w_anchor=0.5)[0] == run(bare)[0]


@pytest.mark.parametrize("algo", ["prgrpo", "rspo"])
def test_ranks_weighted_shares_average_to_the_global_batch_loss(algo):
    # under torchrun each rank holds some rows, counts its own tokens and weighs each term by
    # common.global_weight of its count; averaging the ranks' gradients must then give the
    # one-process loss and gradient of the whole batch (two ranks simulated in one process)
    model, ro = small_rollout()
    valid, n = ro["valid"], len(ro["logp_old"])
    tok_adv = torch.randn(valid.size(0), generator=torch.Generator().manual_seed(2))[ro["sample_of_token"]]
    extra = dict(t_logits=torch.randn(n, 64), p_t=[torch.softmax(torch.randn(n, 4), -1) for _ in range(2)])
    args = argparse.Namespace(algo=algo, gamma_min=0.5, epsilon=0.2, epsilon_high=0.2, w_anchor=0.5,
                              w_align=0.3, w_distill=0.2, w_aux=0.4, temperature=1.0)

    def buckets_of(rows):
        out = []
        for r, T in length_buckets(valid[rows].sum(1).tolist(), 40):
            b = bucket(ro, tok_adv, rows[r], T)
            b.update(t_logits=extra["t_logits"][b["pos"]], p_t=[p[b["pos"]] for p in extra["p_t"]])
            out.append(b)
        return out

    def count(buckets):
        adv = torch.cat([b["adv"] for b in buckets])
        return dict(tokens=len(adv), good=int((adv > 0).sum()), valid=int(sum(b["valid"].sum() for b in buckets)))

    def loss_and_grad(buckets, counts):
        model.zero_grad()
        loss = sum(policy_loss(model, b, args, counts)[0] for b in buckets)
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    everything = buckets_of(torch.arange(valid.size(0)))
    share = expert_share(model, everything)  # what expert_share's all-reduce gives every rank
    full = count(everything)
    loss_full, g_full = loss_and_grad(everything, dict(full, share=share))
    losses, grads = [], []
    for rows in (torch.tensor([0, 2, 4]), torch.tensor([1, 5, 3])):
        buckets = buckets_of(rows)
        c = count(buckets)
        w = {k: c[k] * 2 / full[k] for k in c}  # common.global_weight with 2 ranks
        c.update(share=share, weight=w)
        loss, g = loss_and_grad(buckets, c)
        losses.append(loss)
        grads.append(g)
    assert sum(losses) / 2 == pytest.approx(loss_full, rel=1e-5)
    for a, b, want in zip(*grads, g_full):
        assert torch.allclose((a + b) / 2, want, atol=1e-6, rtol=1e-4)


def test_token_logprobs_are_the_tempered_policys():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, -1, 4], [0, 2, -1]])
    got = token_logprobs(logits, targets, temperature=0.5)
    want = (2 * logits).log_softmax(-1)[targets >= 0].gather(1, targets[targets >= 0][:, None]).squeeze(1)
    assert torch.allclose(got, want) and len(got) == 4
    assert torch.equal(token_logprobs(logits, targets), token_logprobs(logits, targets, 1.0))
    assert not torch.allclose(got, token_logprobs(logits, targets))


def test_bucketed_switch_loss_is_the_full_batch_switch_loss():
    # the one term that is not a sum over tokens: against losses.switch_aux_loss on the whole batch
    model, ro = small_rollout()
    valid = ro["valid"]
    tok_adv = torch.zeros(len(ro["logp_old"]))  # A = 0: the surrogate is 0, the loss is the Switch term
    args = argparse.Namespace(algo="grpo", epsilon=0.2, epsilon_high=0.2, w_distill=0.0, w_aux=1.0, temperature=1.0)
    buckets = [bucket(ro, tok_adv, rows, T) for rows, T in length_buckets(valid.sum(1).tolist(), 40)]
    counts = dict(tokens=len(tok_adv), good=0, valid=int(valid.sum()), share=expert_share(model, buckets))
    got = sum(policy_loss(model, b, args, counts)[0] for b in buckets)
    with torch.no_grad():
        model(ro["idx"])
    vflat = valid.flatten()
    want = sum(switch_aux_loss(f.router_probs[vflat], f.topk_idx[vflat]) for f in model.ffns)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    assert sum(float(c.sum()) for c in counts["share"]) == pytest.approx(len(model.ffns))


# ----------------------------------------------------------------------------- Stage IV


def test_balance_advantage_normalises_the_joint_reward_per_group():
    # group 0: every sample right, so only the balance reward tells them apart; group 1: mixed
    r = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    b = torch.tensor([0.90, 0.92, 0.95, 0.91, 0.90, 0.92, 0.95, 0.91])
    for alpha in (0.1, 0.01):
        joint = balance_advantages(r, b, 4, alpha)
        assert torch.equal(joint, group_advantages(r + alpha * b, 4))
        # the spec's reading: the all-right group's balance term is normalised to unit spread
        assert float(joint[:4].std(unbiased=False)) == pytest.approx(1.0, rel=1e-2)
        assert torch.equal(joint[:4].argsort(), b[:4].argsort())  # the more even sample wins
        # in the mixed group correctness dominates: both right samples above both wrong ones
        assert float(joint[[4, 7]].min()) > float(joint[[5, 6]].max())

def test_balance_reward_per_sample():
    topk = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 1]])
    sample = torch.tensor([0, 0, 1, 1])
    loads = sample_load(topk, sample, 2, 4)
    assert loads.tolist() == [[1, 1, 1, 1], [2, 2, 0, 0]]
    r = balance_reward([loads])
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(math.log(2) / math.log(4))
    # differs across the samples of one group, so it survives the group normalisation
    assert group_advantages(r, 2).abs().sum() > 0


def test_bias_update_moves_toward_underloaded_experts():
    b = common.bias_update(torch.zeros(4), torch.tensor([6.0, 2.0, 2.0, 2.0]), 0.01)
    assert torch.allclose(b, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert torch.equal(common.bias_update(torch.zeros(2), torch.tensor([3.0, 3.0]), 0.5), torch.zeros(2))


def test_calibrate_bias_balances_a_skewed_router_without_touching_the_gates():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_expert=4, top_k=1))
    for f in model.ffns:  # a skew toward expert 0 for the calibration to undo
        f.select_bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 64, (8, 16), generator=g), torch.ones(8, 16, dtype=torch.bool)) for _ in range(150)]
    idx = batches[0][0]
    model(idx)
    gates_before = [f.router_probs.detach().clone() for f in model.ffns]
    curve = calibrate_bias(model, batches, 0.02)
    assert len(curve) == 150 and curve[0] > 1.0  # one expert took most tokens
    assert max(curve[-20:]) < 0.5 * curve[0]
    model(idx)
    # the bias moves the selection only: layer 0 sees the same input, so the same gate values
    # (deeper layers see outputs of other experts)
    assert torch.equal(model.ffns[0].router_probs, gates_before[0])
    assert all(f.select_bias[0] - f.select_bias[1:].mean() < 0.5 for f in model.ffns)  # from 1.0


def test_max_vio():
    assert float(max_vio(torch.tensor([5.0, 5, 5, 5]))) == 0.0
    assert float(max_vio(torch.tensor([2.0, 1, 1, 0]))) == pytest.approx(1.0)
    assert max_vio(torch.tensor([[2.0, 2], [3.0, 1]])).tolist() == pytest.approx([0.0, 0.5])


FUSED_ATTENTION = ("cudnn", "flash", "mem_efficient")


@contextlib.contextmanager
def restored_determinism_switches():
    """common.deterministic_cuda flips process-wide switches: put them back for later tests."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              [getattr(torch.backends.cuda, f"{f}_sdp_enabled")() for f in FUSED_ATTENTION],
              torch.utils.deterministic.fill_uninitialized_memory)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        for f, on in zip(FUSED_ATTENTION, before[2]):
            getattr(torch.backends.cuda, f"enable_{f}_sdp")(on)
        torch.utils.deterministic.fill_uninitialized_memory = before[3]


def test_deterministic_cuda_mode_leaves_only_deterministic_kernels():
    """What every script sets on CUDA (set here on any machine: the switches are global)."""
    with restored_determinism_switches():
        common.deterministic_cuda()
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.utils.deterministic.fill_uninitialized_memory
        assert not any(getattr(torch.backends.cuda, f"{f}_sdp_enabled")() for f in FUSED_ATTENTION)
        assert torch.backends.cuda.math_sdp_enabled()


def test_gold_ce_averages_over_gold_tokens_only():
    """Rows the student wrote itself (on-policy) and padding (-1) carry no gold loss."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, generator=g)
    targets = torch.tensor([[1, 2, -1, -1], [0, 4, 4, 3], [2, -1, -1, -1]])
    want = [-logits[b, t].log_softmax(-1)[targets[b, t]] for b in (0, 2) for t in range(4) if targets[b, t] >= 0]
    got = gold_ce(logits, targets, [1], torch.device("cpu"))
    assert got.item() == pytest.approx(float(sum(want) / len(want)), rel=1e-6)
    assert gold_ce(logits, targets, [0, 1, 2], torch.device("cpu")).item() == 0.0  # nothing gold left
