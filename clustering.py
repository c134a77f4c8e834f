"""
Stage I's pieces: how a dense FFN becomes E experts (the tests check each by hand).

Per layer, with the teacher's post-GELU activations a(x) in R^H on recorded tokens:
1. neuron_profiles + balanced_kmeans: each neuron's |a_i| over the tokens, centred and
   L2-normalised (cosine = co-activation correlation), clustered into E equal clusters.
2. expert_neurons + decompress: expert e = its cluster C_e plus the h - |C_e| outside neurons
   with the largest  score_e(i) = E_x[p_T(e|x) |a_i(x)|] * ||W_proj[:, i]||,  copied rows of
   W_fc and columns of W_proj (h = H/k, so experts overlap).
3. router_from_centroids + fit_router: W_r[e] = centroid of the centred FFN inputs whose path
   peaks at e, then Adam on the cross-entropy against p_T (losses.teacher_path).
build_student puts them together; the `random_subsets` and `random` inits are the baselines.
"""

import torch
import torch.nn.functional as F

from losses import teacher_path
from model import GPT, GPTConfig


def neuron_profiles(act):
    """act [N, H] -> [H, N]: each neuron's |activation| over tokens, centred, unit norm."""
    prof = act.abs().T.double()
    prof = prof - prof.mean(dim=1, keepdim=True)
    return prof / prof.norm(dim=1, keepdim=True).clamp(min=1e-12)


def balanced_assign(sim, capacity):
    """Give each row the best column that still has room: greedy over (row, col) pairs by
    decreasing similarity. sim [H, E] -> assign [H]; every column gets exactly `capacity`."""
    H, E = sim.shape
    assign, room, left = [-1] * H, [capacity] * E, H
    # plain lists, not tensor indexing: at the gpu preset (2048 neurons x 16 experts x 25
    # k-means iterations x 8 layers) element-wise tensor indexing here cost tens of seconds
    for flat in torch.argsort(sim.flatten(), descending=True).tolist():
        i, e = divmod(flat, E)
        if assign[i] < 0 and room[e] > 0:
            assign[i], room[e], left = e, room[e] - 1, left - 1
            if not left:
                break
    return torch.tensor(assign, dtype=torch.long)


def balanced_kmeans(feats, n_clusters, iters=25, seed=0):
    """Spherical k-means whose assignment step is balanced: feats [H, D] (unit rows) ->
    assign [H] with exactly H / n_clusters members per cluster."""
    H = feats.size(0)
    assert H % n_clusters == 0, f"{H} neurons do not split into {n_clusters} equal clusters"
    g = torch.Generator().manual_seed(seed)
    centroids = feats[torch.randperm(H, generator=g)[:n_clusters]]
    assign = None
    for _ in range(iters):
        new = balanced_assign(feats @ centroids.T, H // n_clusters)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        centroids = torch.stack([feats[assign == e].mean(0) for e in range(n_clusters)])
        centroids = centroids / centroids.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return assign


def expert_neurons(act, assign, n_expert, h, w_proj_norm):
    """Each expert: its cluster, then the h - |C_e| outside neurons with the largest
    E_x[p_T(e|x) |a_i(x)|] * ||W_proj[:, i]||. Returns [E, h] neuron indices."""
    p = teacher_path(act, assign, n_expert)                          # [N, E]
    score = (p.T @ act.abs()) / p.sum(0)[:, None].clamp(min=1e-12)  # [E, H]
    score = score * w_proj_norm[None, :]
    rows = []
    for e in range(n_expert):
        members = (assign == e).nonzero().flatten()
        if len(members) >= h:  # more members than room: keep the strongest
            rows.append(members[torch.argsort(score[e, members], descending=True)[:h]])
            continue
        outside = score[e].clone()
        outside[members] = -float("inf")
        extra = torch.topk(outside, h - len(members)).indices
        rows.append(torch.cat([members, extra]))
    return torch.stack(rows)


def decompress(w_fc, w_proj, neurons):
    """Copy T's neurons into experts. w_fc [H, d] (nn.Linear layout), w_proj [d, H],
    neurons [E, h] -> w_in [E, d, h], w_out [E, h, d]."""
    w_in = w_fc[neurons].transpose(1, 2)        # [E, h, d] -> [E, d, h]
    w_out = w_proj.T[neurons]                   # [E, h, d]
    return w_in.contiguous(), w_out.contiguous()


def router_from_centroids(x, p):
    """W_r [E, d]: centroid of the centred inputs whose path peaks at e (0 if none does)."""
    xc = x - x.mean(0)
    peak = F.one_hot(p.argmax(-1), p.size(1)).to(x.dtype)   # [N, E]
    cent = (peak.T @ xc) / peak.sum(0)[:, None].clamp(min=1)
    return cent / cent.norm(dim=1, keepdim=True).clamp(min=1e-12)


def fit_router(w, x, p, steps, lr=1e-2):
    """Cross-entropy of softmax(x W_r^T) against p_T, by Adam on W_r alone."""
    w = w.clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():  # callers copy weights under no_grad
        for _ in range(steps):
            loss = -(p * (x @ w.T).log_softmax(-1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach()


@torch.no_grad()
def expert_diversity(moe, x):
    """Mean pairwise cosine similarity of the E experts' outputs on the same inputs (lower =
    more diverse)."""
    outs = torch.stack([F.gelu(x @ moe.w_in[e]) @ moe.w_out[e] for e in range(moe.w_in.size(0))])
    outs = F.normalize(outs, dim=-1)                     # [E, N, d]
    sim = torch.einsum("ind,jnd->ijn", outs, outs).mean(-1)
    E = sim.size(0)
    return float((sim.sum() - sim.diagonal().sum()) / (E * (E - 1)))


def build_student(teacher, n_expert, top_k, init, clusters, acts, xs, router_steps, seed):
    """The MoE student: T's embeddings and attention, experts and router per `init`."""
    cfg = dict(teacher.config.to_dict(), n_expert=n_expert, top_k=top_k)
    torch.manual_seed(seed)
    student = GPT(GPTConfig(**cfg))
    own = student.state_dict()
    own.update({k: v for k, v in teacher.state_dict().items() if ".mlp." not in k})
    student.load_state_dict(own)
    H, h = teacher.config.ffn_hidden, student.config.ffn_hidden
    g = torch.Generator().manual_seed(seed)
    for l, (tf, sf) in enumerate(zip(teacher.ffns, student.ffns)):
        w_fc, w_proj = tf.c_fc.weight.detach().cpu(), tf.c_proj.weight.detach().cpu()
        if init == "random":
            continue  # GPT's own random init of experts and router
        if init == "cluster":
            neurons = expert_neurons(acts[l], clusters[l], n_expert, h, w_proj.norm(dim=0))
        else:
            neurons = torch.stack([torch.randperm(H, generator=g)[:h] for _ in range(n_expert)])
        w_in, w_out = decompress(w_fc, w_proj, neurons)
        with torch.no_grad():
            sf.w_in.copy_(w_in)
            sf.w_out.copy_(w_out)
            if init == "cluster":
                p = teacher_path(acts[l], clusters[l], n_expert)
                w = router_from_centroids(xs[l], p)
                sf.router.weight.copy_(fit_router(w, xs[l], p, router_steps))
    return student
