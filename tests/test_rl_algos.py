"""The Stage III baselines' pieces by hand: GSPO's sequence ratio, routing replay (R3),
clip-higher, and the drift metrics; and the rollout/update mismatch of --lag / --rollout-dtype."""

import math

import pytest
import torch

from model import GPT, GPTConfig
from rl import (RolloutCopy, add_logit_scale, bake_logit_scale, clipped_surrogate, clipped_tokens, extreme_ratio,
                importance_ratio, sequence_logp, topk_changed, unscaled)


def test_sequence_logp_gives_every_token_its_sequences_geometric_mean_ratio():
    logp_old = torch.tensor([-1.0, -2.0, -0.5, -0.5, -3.0])
    logp = torch.tensor([-0.8, -2.4, -0.5, -0.1, -3.0])  # log-ratios 0.2, -0.4 | 0, 0.4, 0
    seq = torch.tensor([7, 7, 2, 2, 2])  # any ids, not sorted, not from 0
    rho = importance_ratio(sequence_logp(logp, logp_old, seq), logp_old)
    want = torch.tensor([math.exp(-0.1)] * 2 + [math.exp(0.4 / 3)] * 3)
    assert torch.allclose(rho, want, atol=1e-6)


def test_sequence_logp_gradient_is_the_sequences_mean_token_gradient():
    logp = torch.tensor([-0.8, -2.4, -0.5, -0.1, -3.0], requires_grad=True)
    seq = torch.tensor([0, 0, 1, 1, 1])
    sequence_logp(logp, torch.zeros(5), seq)[0].backward()  # token 0 carries its sequence's mean
    assert torch.allclose(logp.grad, torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))


def test_clip_higher_widens_only_the_upper_bound():
    lp_old = torch.zeros(4)
    lp = torch.log(torch.tensor([1.25, 1.25, 0.75, 0.75]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    sym = clipped_surrogate(lp, lp_old, adv, 0.2)
    hi = clipped_surrogate(lp, lp_old, adv, 0.2, clip_high=0.28)
    assert torch.allclose(sym, torch.tensor([-1.2, 1.25, -0.75, 0.8]))
    assert torch.allclose(hi, torch.tensor([-1.25, 1.25, -0.75, 0.8]))  # 1.25 < 1.28: unclipped
    assert clipped_tokens(lp, lp_old, adv, 0.2).tolist() == [True, False, False, True]
    assert clipped_tokens(lp, lp_old, adv, 0.2, clip_high=0.28).tolist() == [False, False, False, True]


def test_topk_changed_compares_sets_not_orders():
    new = torch.tensor([[0, 1], [1, 0], [2, 3], [0, 3]])
    old = torch.tensor([[0, 1], [0, 1], [2, 1], [1, 2]])
    assert topk_changed(new, old).tolist() == [False, False, True, True]


def test_extreme_ratio_outside_half_to_double():
    lp_old = torch.zeros(5)
    lp = torch.log(torch.tensor([0.49, 0.5, 1.0, 2.0, 2.01]))
    assert extreme_ratio(lp, lp_old).tolist() == [True, False, False, False, True]


def tiny_moe(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=16, n_expert=4, top_k=2))


def test_replay_routes_with_the_given_experts_and_still_trains_the_router():
    model = tiny_moe()
    idx = torch.randint(0, 32, (2, 8))
    model(idx)
    natural = [f.topk_idx.clone() for f in model.ffns]
    forced = [(k + 1) % 4 for k in natural]  # another expert everywhere
    model.set_replay(forced)
    logits, _ = model(idx)
    for f, want in zip(model.ffns, forced):
        assert torch.equal(f.topk_idx, want)
    # what the router would have picked is kept (layer 0's input does not depend on the replay)
    assert torch.equal(model.ffns[0].topk_natural, natural[0])
    logits.square().sum().backward()
    assert all(f.router.weight.grad is not None and f.router.weight.grad.abs().sum() > 0 for f in model.ffns)
    model.set_replay(natural)  # replaying the router's own choice changes nothing
    replayed_natural = model(idx)[0]
    model.set_replay(None)
    assert torch.equal(replayed_natural, model(idx)[0])
    assert not torch.equal(logits.detach(), replayed_natural.detach())


def test_replayed_gates_are_the_routers_renormalised_probabilities():
    model = tiny_moe(1)
    x = torch.randn(5, 16)
    ffn = model.ffns[0]
    forced = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]])
    ffn.replay = forced
    y = ffn(x)
    ffn.replay = None
    p = (x @ ffn.router.weight.T).softmax(-1)
    g = p.gather(1, forced)
    g = g / g.sum(1, keepdim=True)
    want = torch.zeros_like(x)
    for n in range(5):  # the slow reference: each token's two experts, one at a time
        for j in range(2):
            e = forced[n, j]
            want[n] += g[n, j] * (torch.nn.functional.gelu(x[n] @ ffn.w_in[e]) @ ffn.w_out[e])
    assert torch.allclose(y, want, atol=1e-5)


def test_rollout_copy_lags_the_policy_by_n_rollout_steps_in_its_own_dtype():
    student, copy = tiny_moe(2), RolloutCopy(tiny_moe(3), lag=2, dtype=torch.bfloat16)
    seen = []
    for step in range(5):
        with torch.no_grad():
            student.lm_head.weight.fill_(float(step))  # the policy after `step` updates
        seen.append(copy(student).lm_head.weight[0, 0].item())
    assert seen == [0.0, 0.0, 0.0, 1.0, 2.0]  # step s rolls out with the policy of step max(0, s - 2)
    assert copy.model.lm_head.weight.dtype == torch.bfloat16 and student.lm_head.weight.dtype == torch.float32
    resumed = RolloutCopy(tiny_moe(3), lag=2, history=list(copy.history))  # a resume goes on with the same lag
    with torch.no_grad():
        student.lm_head.weight.fill_(5.0)
    assert resumed(student).lm_head.weight[0, 0].item() == 3.0
    idx, student = torch.randint(0, 32, (2, 8)), tiny_moe(4)
    with torch.no_grad():  # bf16 routing and log-probs differ from fp32's: the mismatch the flag adds
        copy.model.load_state_dict(student.state_dict())
        assert not torch.equal(copy.model(idx)[0].float(), student(idx)[0])


def test_rollout_copy_at_lag_0_is_the_policy_itself_in_bf16():
    student, copy = tiny_moe(2), RolloutCopy(tiny_moe(3), lag=0, dtype=torch.bfloat16)
    for step in range(3):
        with torch.no_grad():
            student.lm_head.weight.fill_(float(step) + 0.5)
        model = copy(student)
        assert model.lm_head.weight[0, 0].item() == step + 0.5 and model.lm_head.weight.dtype == torch.bfloat16
    assert len(copy.history) == 0  # nothing kept: lag 0 needs no past weights


def test_logit_scale_multiplies_every_logit_and_bakes_into_a_plain_model():
    model, idx = tiny_moe(), torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        before = model(idx)[0]
    body = list(model.parameters())
    scale = add_logit_scale(model)
    assert all(any(p is q for q in model.parameters()) for p in body)  # the gain is still trained, as itself
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in body) + 1
    with torch.no_grad():
        assert torch.equal(model(idx)[0], before)  # it starts at 1
        scale.fill_(0.3)
        scaled = model(idx)[0]
    assert torch.allclose(scaled, math.exp(0.3) * before, atol=1e-5)
    assert torch.equal(scaled.argmax(-1), before.argmax(-1))  # greedy decoding cannot move
    loss = torch.nn.functional.cross_entropy(model(idx)[0].flatten(0, 1), idx.flatten())
    loss.backward()
    assert scale.grad is not None and scale.grad != 0
    keys = set(model.state_dict())
    bake_logit_scale(model)
    assert set(model.state_dict()) == set(tiny_moe().state_dict()) != keys  # a plain GPT's names again
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], scaled, atol=1e-6)
    fresh = tiny_moe()
    fresh.load_state_dict(model.state_dict())  # it loads as any checkpoint does
    assert bake_logit_scale(fresh) is fresh  # and baking a plain model changes nothing


def test_a_loss_on_the_unscaled_logits_moves_the_weights_as_without_the_scale_and_not_the_scale():
    """Stage III's gold and distillation terms see logits / exp(s): their gradient on the weights
    is the plain model's, and none (to rounding) reaches s, which only the RL then sets."""
    idx = torch.randint(0, 32, (2, 8))
    plain, scaled = tiny_moe(), tiny_moe()
    x = plain(idx)[0]
    assert unscaled(plain, x) is x  # a model without the scale: its logits as they are
    scale = add_logit_scale(scaled)
    with torch.no_grad():
        scale.fill_(0.7)
    for model in (plain, scaled):
        logits = unscaled(model, model(idx)[0])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()
    assert abs(float(scale.grad)) < 1e-6
    grads = {n.replace("parametrizations.weight.original", "weight"): p.grad for n, p in scaled.named_parameters()
             if n != "transformer.ln_f.parametrizations.weight.0.log_scale"}
    for n, p in plain.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_a_scale_added_at_a_value_leaves_the_logits_and_reads_that_value():
    """Stage IV (and any stage after Stage III) takes Stage III's baked scale back out of ln_f's
    gain: the same logits, the scale at Stage III's value, and baking returns the model it got."""
    model, idx = tiny_moe(), torch.randint(0, 32, (2, 8))
    with torch.no_grad():
        before = model(idx)[0]
    gain = model.transformer.ln_f.weight.detach().clone()
    scale = add_logit_scale(model, 1.8)
    assert float(scale.detach().exp()) == pytest.approx(1.8)
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], before, atol=1e-5)
        assert torch.allclose(unscaled(model, model(idx)[0]), before / 1.8, atol=1e-5)
    bake_logit_scale(model)
    assert torch.allclose(model.transformer.ln_f.weight, gain, atol=1e-6)
