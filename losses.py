"""
The loss terms that several stages share, as small pure functions (the tests check each by hand).

The teacher has no router, but its FFN neurons define one. With post-GELU activations a(x) of a
layer's H neurons grouped by Stage I into E clusters C_1..C_E, the teacher's path is

    p_T(e | x) = sum_{i in C_e} |a_i(x)| / sum_i |a_i(x)|

and the student follows it (Stage I: cross-entropy; Stage II: L_path; Stage III: PR-GRPO's
alignment term). With T's and S's next-token distributions p_t, q_t on a token t:

    token KL   beta_t * KL(q_t || p_t) + (1 - beta_t) * KL(p_t || q_t)     beta_t = max_v p_t(v)
    path KL    KL(p_T,l(.|x_t) || g_S,l(.|x_t))                             per layer l
    Switch     E * sum_e f_e P_e                                            f_e: share of selections
    gold CE    mean over gold tokens of -log q_t(y_t)                       the data's own labels
"""

import torch
import torch.nn.functional as F

import common


def teacher_path(act, assign, n_expert):
    """p_T(e|x) = sum_{i in C_e} |a_i| / sum_i |a_i|.  act [..., H], assign [H] -> [..., E]."""
    mass = act.abs() @ F.one_hot(assign, n_expert).to(act.dtype)
    return mass / mass.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def teacher_paths(teacher, idx, clusters):
    """Run T on idx (no grad) and return its per-layer path p_T [B*T, E] and FFN in/out."""
    E = int(max(int(c.max()) for c in clusters)) + 1
    with torch.no_grad():
        teacher.set_record(True)
        logits, _ = teacher(idx)
        teacher.set_record(False)
        paths = [teacher_path(f.rec_act.reshape(-1, f.rec_act.size(-1)).float(), c.to(idx.device), E)
                 for f, c in zip(teacher.ffns, clusters)]
        ios = [(f.rec_in.reshape(-1, f.rec_in.size(-1)), f.rec_out.reshape(-1, f.rec_out.size(-1)))
               for f in teacher.ffns]
    return logits, paths, ios


def token_kl_loss(t_logits, s_logits, beta=None):
    """Per-token beta * KL(S||T) + (1 - beta) * KL(T||S); beta=None uses T's confidence.
    Logits [N, V] -> [N]."""
    lt, ls = t_logits.float().log_softmax(-1), s_logits.float().log_softmax(-1)
    pt, ps = lt.exp(), ls.exp()
    fkl = (pt * (lt - ls)).sum(-1)
    rkl = (ps * (ls - lt)).sum(-1)
    if beta is None:
        beta = pt.max(-1).values.detach()
    return beta * rkl + (1 - beta) * fkl


def path_kl(p_teacher, g_student):
    """KL(p_T || g_S) per token, [N, E] -> [N]."""
    p = p_teacher.clamp(min=1e-9)
    return (p * (p.log() - g_student.clamp(min=1e-9).log())).sum(-1)


def gold_ce(s_logits, targets, on_rows, device):
    """Cross-entropy of S on the gold continuations (rows not in on_rows, whose targets are S's
    own samples), as a mean over the global batch's gold tokens."""
    gold = targets.clone()
    gold[on_rows] = -1
    n = int((gold >= 0).sum())
    ce = F.cross_entropy(s_logits.float().flatten(0, 1), gold.flatten(), ignore_index=-1, reduction="sum")
    return ce / max(n, 1) * common.global_weight(n, device)


def switch_aux_loss(router_probs, topk_idx):
    """E * sum_e f_e P_e (Switch Transformer): 1 when perfectly balanced, larger otherwise."""
    E = router_probs.size(-1)
    f = torch.bincount(topk_idx.flatten(), minlength=E).to(router_probs.dtype) / topk_idx.numel()
    return E * (f * router_probs.mean(0)).sum()


def adaptive_lambda(kl, kl0, lam_max):
    """On-policy share: 0 at the start, lam_max once the held-out KL has halved."""
    if kl0 <= 0:
        return lam_max
    return lam_max * min(1.0, max(0.0, (kl0 - kl) / (0.5 * kl0)))
