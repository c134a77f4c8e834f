"""
Stage 0: the dense teacher T.

Supervised fine-tuning of a small dense GPT (model.py, n_expert = 1) on the training split of
the built-in math suite (data.py). Each example is

    <|bos|> question \\n  |  step-by-step solution ... #### answer <|eos|>

and the loss is next-token cross-entropy on the solution tokens only (right of the bar): the
model is never asked to predict the question. Examples (~50 tokens) are packed whole into rows
of block_size tokens, each with its own positions and a block-diagonal causal mask
(common.pack_batch), so no compute goes to padding; `--batch-size` counts rows. AdamW, linear
warmup then cosine decay to 10%, periodic validation loss, and at the end greedy pass@1 on the
test split, overall and per subdomain (eval_math.evaluate, the same grader Stage III uses as
its reward).

The checkpoint holds an exponential moving average of the weights, not the last step's:
    avg <- d * avg + (1 - d) * theta,    d = min(ema, (1 + step) / (10 + step))      ema_update
With 8-row batches the last steps' weights still jitter, and greedy decoding turns that jitter
into whole answers; the average smooths it.

Defaults (the runs: docs/journal.md):
- 4 layers, d = 128, rotary positions: rotary lifted test accuracy far above learned positions.
- 8 packed rows a step, 2,400 steps, lr 3e-3: at a fixed CPU budget small batches and many
  steps learned faster than 32 or 64 rows; 6e-3 was worse. 2,400 steps are short of
  convergence, for the study's time budget; `--steps 4800` lifts every variant and changes
  none of the study's conclusions.
- --ema 0.99 (a horizon of ~100 steps): beat the last weights on every seed; 0.995 and longer
  horizons did worse.
- The teacher has to leave room above it: the suite and the preset put its greedy test
  accuracy between 40% and 80% with every subdomain above 10%.

Deviation from the paper: the paper's teachers are pretrained LLMs (Qwen) fine-tuned on
competition math; ours is trained from scratch on a synthetic suite, in minutes, on a CPU.
Teachers are not interchangeable at this scale: the same seed on another machine or thread
count rounds differently and lands elsewhere, so studies average over one teacher per seed.

    python train_teacher.py --out out/default/teacher.pt            # ~4 min on 2 CPU cores
    python train_teacher.py --preset tiny --out out/smoke/teacher.pt
    torchrun --standalone --nproc_per_node=2 train_teacher.py --out out/default/teacher.pt   # 2 ranks

Under torchrun every rank packs the same global batch of `--batch-size` rows and trains on its
share of the rows; gradients are averaged over ranks (common.sync_grads), so 2 ranks take the
same steps as 1 (tests/test_ddp.py). Only rank 0 writes the checkpoint and the log.
"""

import argparse
import random
import time

import torch
from tqdm import tqdm

import common
import data
import eval_math
from model import GPT, GPTConfig, count_params

PRESETS = {
    # model size, optimisation budget, and how many test problems to grade
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, steps=40, batch_size=32, lr=3e-3, n_test=42,
                 n_train=4000, eval_every=30),
    "default": dict(n_layer=4, n_head=4, n_embd=128, steps=2400, batch_size=8, lr=3e-3, n_test=700,
                    n_train=20000, eval_every=400),
    # for a GPU (bf16 autocast): 8 layers, d=512, 25M parameters; Stage I makes it E=16, k=2
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, steps=3000, batch_size=64, lr=1e-3, n_test=700,
                n_train=20000, eval_every=500),
}

parser = common.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="out/default/teacher.pt", help="where to write the teacher checkpoint")
parser.add_argument("--preset", choices=PRESETS, default="default", help="model size and training budget")
parser.add_argument("--steps", type=int, help="optimiser steps (preset if unset)")
parser.add_argument("--batch-size", type=int, help="packed rows of block_size tokens per step (preset if unset)")
parser.add_argument("--lr", type=float, help="peak learning rate (preset if unset)")
parser.add_argument("--eval-every", type=int, help="validation (and resume point) every this many steps (preset if unset)")
parser.add_argument("--ema", type=float, default=0.99,
                    help="decay of the weight average the checkpoint holds (0 = the last weights)")
parser.add_argument("--stop-after", type=int,
                    help="stop at the first resume point at or after this step; --resume continues (a run in parts)")
parser.add_argument("--data-seed", type=int, default=0,
                    help="seed of the suite's splits; later stages use the teacher's (keep it fixed across --seed)")
common.add_run_args(parser, seed_help="seed for the init and the order of training batches")
# what each flag may be (common.check_args); a step count of 0 would write a teacher of NaN loss
LIMITS = dict(steps=(1, None), batch_size=(1, None), lr=(0, None), eval_every=(1, None), ema=(0, 0.9999),
              stop_after=(1, None), n_train=(1, None))


def ema_update(avg, params, decay, step):
    """avg <- d * avg + (1 - d) * params, in place, with d = min(decay, (1 + step) / (10 + step)):
    the early steps' average follows the weights closely instead of holding the random init."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for a, p in zip(avg, params):
            a.lerp_(p.detach(), 1 - d)


def main():
    args = parser.parse_args()
    device, log = common.setup(args, PRESETS, "teacher", LIMITS)

    enc = data.get_tokenizer()
    # the same test set for every n_train and every --seed: seeds vary the training, not the exam
    splits = data.split_rows(n_train=max(args.n_train, 20000), seed=args.data_seed)
    train, val = splits["train"][:args.n_train], splits["validation"]
    test = splits["test"][:args.n_test]
    config = GPTConfig(vocab_size=data.vocab_size_padded(enc), n_layer=args.n_layer,
                       n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start, state = common.maybe_resume(args, model, opt)
    # the weight average starts as the weights themselves; a resumed run picks up its average
    avg = [p.detach().clone() for p in model.parameters()] if args.ema else None
    if avg is not None and "ema" in state:
        for a, saved in zip(avg, state["ema"]):
            a.copy_(saved)

    active, total = count_params(model)
    print(f"teacher: {total:,} parameters, {len(train):,} training problems, device {device}"
          + (f", {common.world()} ranks" if common.world() > 1 else ""))
    t0 = time.time()
    pbar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="teacher", disable=not common.is_main())
    for step in pbar:
        rng = random.Random(args.seed * 1_000_003 + step)  # per-step stream: resuming replays the same batches
        draw = lambda: data.encode_example(enc, train[rng.randrange(len(train))])
        idx, targets, pos, mask, _ = common.pack_batch(draw, args.batch_size, config.block_size, device)
        # under torchrun each rank trains on its slice of the same global batch, its loss weighted
        # so that the averaged gradient is the gradient of the global batch's mean loss
        idx, targets, pos, mask = (common.shard(t) for t in (idx, targets, pos, mask))
        for group in opt.param_groups:
            group["lr"] = common.lr_at(step, args.steps, args.lr, warmup=max(1, args.steps // 20))
        with common.autocast(device):
            _, loss = model(idx, targets, pos=pos, attn_mask=mask)
        loss = loss * common.global_weight(int((targets >= 0).sum()), device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        common.optimizer_step(model, opt)
        if avg is not None:
            ema_update(avg, model.parameters(), args.ema, step)
        loss = common.all_reduce(loss.detach()) / common.world()  # the global batch's mean loss
        pbar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            vl = eval_math.lm_loss(model, enc, val, device)
            common.append_jsonl(log, dict(stage="teacher", step=step + 1, train_loss=loss.item(), val_loss=vl))
            pbar.write(f"step {step + 1}: train loss {loss.item():.4f}, val loss {vl:.4f}")
            if step + 1 < args.steps:
                common.save_resume(args, model, opt, step + 1, data.tokenizer_to_dict(enc), made_from={},
                                   **({"ema": [a.cpu() for a in avg]} if avg is not None else {}))
                if args.stop_after is not None and step + 1 >= args.stop_after:
                    print(f"stopped after step {step + 1}; --resume continues")
                    return

    train_time = time.time() - t0
    if avg is not None:  # the teacher is the average: every later stage and the test see it
        with torch.no_grad():
            for p, a in zip(model.parameters(), avg):
                p.copy_(a)
    res = eval_math.evaluate(model, enc, test, device)
    metrics = dict(**eval_math.stored(res), val_loss=eval_math.lm_loss(model, enc, val, device),
                   active_params=active, total_params=total, train_seconds=round(train_time, 1))
    common.save_checkpoint(args.out, common.make_checkpoint(model, data.tokenizer_to_dict(enc), "teacher", args, metrics,
                                                            made_from={}))
    common.append_jsonl(log, dict(stage="teacher", step=args.steps, **metrics))  # after the save: a record means a checkpoint
    common.clear_resume(args)
    eval_math.print_report({"teacher": metrics})
    print(f"wrote {args.out} (trained {train_time:.0f} s)")


if __name__ == "__main__":
    common.run(main)
