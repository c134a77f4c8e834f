"""
Stage I: teacher neuron clustering, decompression into experts, router init, expert warmup.

The dense teacher T has no router, but its FFN neurons define one. Per layer, with post-GELU
activations a(x) in R^H (H = 4d) and the H neurons grouped into E clusters C_1..C_E,

    p_T(e | x) = sum_{i in C_e} |a_i(x)| / sum_i |a_i(x)|               losses.teacher_path

1. Record T's FFN inputs x, activations a and outputs y on training text (prompt + gold
   solution, ~25k tokens on the default preset).
2. Cluster each layer's neurons into E *balanced* clusters (|C_e| = H/E) by balanced k-means
   on their activation profiles: |a_i| over the recorded tokens, centred and L2-normalised, so
   neurons that fire on the same tokens land together (clustering.balanced_kmeans).
3. Decompress: expert e = C_e plus the h - |C_e| other neurons that matter most on e's tokens,
       score_e(i) = E_x[ p_T(e|x) |a_i(x)| ] * ||W_proj[:, i]||       clustering.expert_neurons
   (how much neuron i writes into the output where the path goes through e). h = H/k, so
   experts overlap; rows of W_fc and columns of W_proj are copied. On a token routed to e,
   expert e alone computes most of T's FFN, and the renormalised mix of k of them ~ T's FFN.
4. Router: W_r[e] = centroid of the (centred) FFN inputs whose path peaks at e, then a few
   hundred Adam steps of cross-entropy against p_T (clustering.fit_router).
5. Warmup, all parameters, for `--steps` steps of
       L = L_LM  +  w_recon * sum_l ||MoE_l(x_l^T) - y_l^T||^2 / ||y_l^T||^2
                 +  w_router * sum_l CE(p_T,l, g_S,l(x_l^T))
   where x_l^T, y_l^T are T's FFN input and output on the same batch, and L_LM is the
   completion-only LM loss of the whole student.

Everything but the FFNs (embeddings, attention, norms) is copied from T. The clusters go into
the checkpoint (`clusters`: per layer, the cluster id of each of T's neurons): Stages II-IV
compute p_T from them.

Baselines (--init): `random_subsets` gives each expert h neurons drawn at random (upcycling
without clustering) and a random router; `random` gives fresh random experts and router. Both
get the same warmup (the clusters still define p_T), so the comparison isolates the init.

Defaults (the runs: docs/journal.md):
- E = 8, k = 2 (gpu: E = 16): expert hidden 4d/k keeps the active FFN FLOPs of the teacher.
- 40 warmup steps of 32 examples at lr 1e-3: a short warmup, where the cluster init is ahead
  of random subsets on validation loss; after 120 steps the two were level.
- --w-recon 1, --w-router 0.1: set once, not swept.

Reports: validation LM loss and test accuracy of student vs teacher, expert diversity (mean
pairwise cosine of expert outputs on the same inputs), routing entropy, MaxVio, and a
subdomain x expert heatmap for T's clusters (mean p_T) and the student (routed share).

Deviations from the paper:
1. Profiles are taken on the suite's training text, not a pretraining corpus.
2. Clusters are balanced exactly (the paper does not say).
3. The warmup is short. At this scale p_T comes out close to uniform (router CE ~1.8 nats per
   layer against log 8 = 2.08), so the path carries little information, and with wide experts
   (h = H/2) a longer warmup repairs even a random half-FFN.

    python stage1_cluster.py --in out/default/teacher.pt --out out/default/stage1.pt
    python stage1_cluster.py --init random_subsets --out out/abl/stage1_rs.pt   # baseline
    torchrun --standalone --nproc_per_node=2 stage1_cluster.py --in out/default/teacher.pt --out out/default/stage1.pt

Under torchrun every rank records and clusters the same sample (deterministic, so the clusters
agree without a broadcast) and the warmup batch is split over ranks, gradients averaged.
"""

import argparse
import os
import random
import time

import torch
from tqdm import tqdm

import common
import data
import eval_math
from clustering import balanced_kmeans, build_student, expert_diversity, neuron_profiles
from losses import teacher_path, teacher_paths
from model import count_params

PRESETS = {
    "tiny": dict(n_expert=8, top_k=2, n_record=96, steps=20, batch_size=16, router_steps=50, n_test=42, n_val=100),
    "default": dict(n_expert=8, top_k=2, n_record=400, steps=40, batch_size=32, router_steps=300, n_test=700, n_val=300),
    "gpu": dict(n_expert=16, top_k=2, n_record=800, steps=200, batch_size=64, router_steps=300, n_test=700, n_val=300),
}

parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--in", dest="inp", default="out/default/teacher.pt", help="the dense teacher checkpoint")
parser.add_argument("--out", default="out/default/stage1.pt", help="where to write the student checkpoint")
parser.add_argument("--init", choices=["cluster", "random_subsets", "random"], default="cluster",
                    help="how experts and router start (cluster = PADD; the others are baselines)")
parser.add_argument("--n-expert", type=int, help="E, experts per layer (preset if unset: 8; gpu 16)")
parser.add_argument("--top-k", type=int, help="k, experts per token, expert hidden = 4d/k (preset if unset: 2)")
parser.add_argument("--preset", choices=PRESETS, default="default", help="budget preset")
parser.add_argument("--steps", type=int, help="warmup steps (preset if unset)")
parser.add_argument("--batch-size", type=int, help="warmup batch (preset if unset)")
parser.add_argument("--lr", type=float, default=1e-3, help="warmup learning rate")
parser.add_argument("--w-recon", type=float, default=1.0, help="weight of FFN reconstruction")
parser.add_argument("--w-router", type=float, default=0.1, help="weight of router CE against p_T")
common.add_run_args(parser)
# what each flag may be (common.check_args); the teacher's FFN width is checked once it is read
LIMITS = dict(n_expert=(2, None), top_k=(1, None), steps=(1, None), batch_size=(1, None), lr=(0, None),
              w_recon=(0, None), w_router=(0, None), n_record=(1, None), router_steps=(0, None))


# ----------------------------------------------------------------------------- recording

@torch.no_grad()
def record_teacher(teacher, enc, examples, device, batch_size=64):
    """T's per-layer FFN input, activation and output on the completion-and-prompt tokens.
    Returns lists over layers of [N, d], [N, H], [N, d] tensors and the subdomain per token."""
    teacher.set_record(True)
    L = len(teacher.ffns)
    xs, acts, ys, subs = [[] for _ in range(L)], [[] for _ in range(L)], [[] for _ in range(L)], []
    for b in range(0, len(examples), batch_size):
        batch = examples[b:b + batch_size]
        pairs = [data.encode_example(enc, ex) for ex in batch]
        idx, _, valid = common.pad_batch(*zip(*pairs), device)
        teacher(idx)
        for ex, n in zip(batch, valid.sum(1).tolist()):
            subs += [ex["subdomain"]] * n
        for l, ffn in enumerate(teacher.ffns):
            xs[l].append(ffn.rec_in[valid].cpu())
            acts[l].append(ffn.rec_act[valid].cpu())
            ys[l].append(ffn.rec_out[valid].cpu())
    teacher.set_record(False)
    cat = lambda z: [torch.cat(t) for t in z]
    return cat(xs), cat(acts), cat(ys), subs


# ----------------------------------------------------------------------------- heatmap

def plot_heatmaps(panels, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, table) in zip(axes[0], panels.items()):
        subs = [s for s in data.SUBDOMAINS if s in table]
        m = torch.tensor([table[s] for s in subs])
        im = ax.imshow(m.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(subs)), [s.replace("_", " ") for s in subs], fontsize=7)
        ax.set_xticks(range(m.size(1)))
        ax.set_xlabel("expert / cluster")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def subdomain_table(p, subs):
    """Mean of p [N, E] over each subdomain's tokens -> {subdomain: [E]}."""
    out = {}
    for s in data.SUBDOMAINS:
        m = torch.tensor([x == s for x in subs])
        if m.any():
            out[s] = p[m].mean(0).tolist()
    return out


# ----------------------------------------------------------------------------- main

def main():
    args = parser.parse_args()
    device, log = common.setup(args, PRESETS, "stage1", LIMITS)
    tckpt = common.load_checkpoint(args.inp, kind="dense")
    inputs = common.made_from(args)
    H = 4 * tckpt["config"].get("n_embd", 0)
    if args.top_k > args.n_expert:
        raise common.UserError(f"--top-k {args.top_k}: must be at most --n-expert {args.n_expert}")
    if H % args.top_k:
        raise common.UserError(f"--top-k {args.top_k} does not divide the teacher's FFN hidden size {H}")
    if H % args.n_expert:  # balanced clusters: H / E neurons each
        raise common.UserError(f"--n-expert {args.n_expert} does not divide the teacher's FFN hidden size {H}")
    enc = data.tokenizer_from_dict(tckpt["tokenizer"])
    teacher = common.build_model(tckpt, device).eval()
    splits = data.split_rows(seed=common.data_seed(tckpt))
    train, val = splits["train"], splits["validation"][:args.n_val]
    test = splits["test"][:args.n_test]
    t0 = time.time()

    # 1-2. record and cluster
    rec = random.Random(args.seed).sample(train, args.n_record)
    xs, acts, ys, subs = record_teacher(teacher, enc, rec, device)
    clusters = [balanced_kmeans(neuron_profiles(a).float(), args.n_expert, seed=args.seed) for a in acts]
    print(f"recorded {acts[0].size(0):,} tokens; clustered {acts[0].size(1)} neurons x {len(acts)} layers into {args.n_expert}")
    paths = [teacher_path(a, c, args.n_expert) for a, c in zip(acts, clusters)]
    teacher_heat = subdomain_table(torch.stack(paths).mean(0), subs)

    # 3-4. decompress and initialise the router
    student = build_student(teacher, args.n_expert, args.top_k, args.init, clusters, acts, xs,
                            args.router_steps, args.seed).to(device)
    active, total = count_params(student)
    t_active, _ = count_params(teacher)
    print(f"student: {active:,} active / {total:,} total parameters (teacher {t_active:,})")
    val_loss0 = eval_math.lm_loss(student, enc, val, device)

    # 5. warmup
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, _ = common.maybe_resume(args, student, opt, inputs)
    clusters_dev = [c.to(device) for c in clusters]
    pbar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="stage1 warmup", disable=not common.is_main())
    for step in pbar:
        rng = random.Random(args.seed * 1_000_003 + step)
        batch = common.shard([train[rng.randrange(len(train))] for _ in range(args.batch_size)])
        idx, targets, valid = common.pad_batch(*zip(*[data.encode_example(enc, ex) for ex in batch]), device)
        with common.autocast(device):
            _, p_t, ios = teacher_paths(teacher, idx, clusters_dev)
            _, lm = student(idx, targets)
            valid = valid.flatten()
            recon, route = 0.0, 0.0
            for ffn, p, (x_t, y_t) in zip(student.ffns, p_t, ios):
                y_s = ffn(x_t[valid]).float()
                recon = recon + ((y_s - y_t[valid].float()) ** 2).sum() / (y_t[valid].float() ** 2).sum()
                route = route - (p[valid] * ffn.router_probs.clamp(min=1e-9).log()).sum(-1).mean()
        loss = lm + args.w_recon * recon + args.w_router * route
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.optimizer_step(student, opt)
        pbar.set_postfix(lm=f"{lm.item():.3f}", recon=f"{common.item(recon):.3f}", route=f"{common.item(route):.3f}")
        if (step + 1) % 20 == 0 or step + 1 == args.steps:
            common.append_jsonl(log, dict(stage="stage1", init=args.init, step=step + 1, lm=lm.item(),
                                          recon=common.item(recon), router_ce=common.item(route)))
            if step + 1 < args.steps:
                common.save_resume(args, student, opt, step + 1, tckpt["tokenizer"], made_from=inputs)

    # report
    res = eval_math.evaluate(student, enc, test, device, desc="stage1 test")
    div = sum(expert_diversity(f, x.to(device)[:2000]) for f, x in zip(student.ffns, xs)) / len(xs)
    metrics = dict(**eval_math.stored(res), val_loss=eval_math.lm_loss(student, enc, val, device),
                   val_loss_at_init=val_loss0, teacher_val_loss=eval_math.lm_loss(teacher, enc, val, device),
                   teacher_acc=tckpt["metrics"].get("acc"), kl_to_teacher=eval_math.kl_to_teacher(student, teacher, enc, val, device),
                   expert_diversity=div, routing_entropy=res["routing_entropy"], max_vio=res["max_vio"],
                   max_vio_per_layer=res["max_vio_per_layer"], expert_load=res["load"], heatmap=res["heatmap"], teacher_heatmap=teacher_heat,
                   active_params=active, total_params=total, seconds=round(time.time() - t0, 1))
    common.save_checkpoint(args.out, common.make_checkpoint(student, tckpt["tokenizer"], "stage1", args, metrics,
                                                            clusters=clusters, made_from=inputs))
    common.append_jsonl(log, dict(stage="stage1", init=args.init, step=args.steps,  # after the save
                                  **{k: v for k, v in metrics.items() if "heatmap" not in k}))
    common.clear_resume(args)
    plot_heatmaps({"teacher clusters (mean p_T)": teacher_heat, f"student after Stage I ({args.init})": res["heatmap"]},
                  os.path.splitext(args.out)[0] + "_heatmap.png")
    print(f"val loss: teacher {metrics['teacher_val_loss']:.4f} | student at init {val_loss0:.4f} -> after warmup {metrics['val_loss']:.4f}")
    print(f"expert diversity (mean pairwise cosine) {div:.3f}, routing entropy {res['routing_entropy']:.3f}, MaxVio {res['max_vio']:.3f}")
    eval_math.print_report({"teacher": tckpt["metrics"], "stage1": metrics})
    print(f"wrote {args.out} ({metrics['seconds']:.0f} s)")


if __name__ == "__main__":
    common.run(main)
