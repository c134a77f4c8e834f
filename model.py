"""
The dense teacher and the MoE student: one GPT, nanoGPT-style.

    x -> [ LN -> causal self-attention -> + ] -> [ LN -> FFN -> + ] x n_layer -> LN -> lm_head

With `n_expert == 1` the FFN is the teacher's dense MLP, gelu(x W_fc) W_proj with hidden H = 4d.
With `n_expert > 1` it is the student's MoE layer (PADD_SPEC.md, "Models"):

    p      = softmax(x W_r)                    router distribution over E experts, g_S(e|x)
    top-k  = the k largest (p, or x W_r + b for Stage IV's selection-only bias b)
    gate_j = p_j / sum_{i in top-k} p_i        renormalised so the k gates sum to 1
    y      = sum_j gate_j * gelu(x W_in[e_j]) W_out[e_j]

Each expert has hidden h = H / k, so a token touches k*h = H hidden units: the teacher's FFN
FLOPs plus the d x E router ("equal inference cost"). Total expert parameters are E/k times
the teacher's FFN: the "decompression". The experts run through `moe_kernel.moe_ffn`.

After each forward pass the FFN modules keep what the PADD stages need:
  - MoE: `router_probs` [N, E] (with grad, for path losses) and `topk_idx` [N, k] (for load,
    router shift and MaxVio; under routing replay, `set_replay`, the replayed selection, and
    `topk_natural` the router's own);
  - dense MLP, only while `record` is on: `rec_in`, `rec_act` (post-GELU, the teacher's path
    p_T is built from it) and `rec_out` (Stage I reconstructs it).

Sampling (`generate`) is batched over prompts of different lengths with a KV cache: prompts are
left-padded, each row gets its own positions, and pad keys are masked out. Rows that have
emitted eos leave the batch (and the cache) once they are an eighth of it, and each step draws
one uniform per row (inverse CDF) instead of torch.multinomial's one exponential per vocabulary
entry. Biases are off everywhere and the embedding is tied to the output head, as in nanoGPT.

Deviation from nanoGPT: positions enter through rotary embeddings on q and k (RoPE, as in
nanochat), not a learned position table. Our problems are solved by copying numbers out of the
question; with RoPE attention can find "the number after '='" by relative offset, and the same
teacher at the same budget scored far higher with it (docs/journal.md).
"""

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_kernel import moe_ffn


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 320
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_expert: int = 1      # 1: dense teacher; > 1: MoE student
    top_k: int = 1

    @property
    def ffn_hidden(self):
        """H = 4d for the dense MLP; h = H / k per expert, so k experts cost the teacher's FFN."""
        if self.n_expert == 1:
            return 4 * self.n_embd
        return 4 * self.n_embd // self.top_k

    def to_dict(self):
        return asdict(self)


def rotary_tables(pos, head_dim, base=10000.0):
    """cos, sin [B or 1, 1, T, head_dim/2] for integer positions pos [T] or [B, T].

    Per-row positions ([B, T]) are what packing and left-padded sampling need: a row's tokens
    are rotated by their position in their own example, not by their column."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    ang = pos.float()[..., None] * inv_freq
    if ang.dim() == 2:
        ang = ang[None]
    return ang.cos()[:, None], ang.sin()[:, None]


def apply_rotary(x, cos, sin):
    """Rotate each (x1_i, x2_i) pair of x [B, H, T, hs] by angle pos * freq_i. Then q.k depends
    on the positions only through their difference."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rope, cache=None, layer=0, attn_mask=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)  # before caching: cached keys keep their rotation
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    """The teacher's dense FFN. `record` keeps its input, post-GELU activations and output."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.ffn_hidden, bias=False)
        self.c_proj = nn.Linear(config.ffn_hidden, config.n_embd, bias=False)
        self.record = False

    def forward(self, x):
        a = F.gelu(self.c_fc(x))
        y = self.c_proj(a)
        if self.record:
            self.rec_in, self.rec_act, self.rec_out = x, a, y
        return y


class MoE(nn.Module):
    """The student's FFN: a router and E experts of hidden h, top-k, renormalised gates."""

    def __init__(self, config):
        super().__init__()
        d, E, h = config.n_embd, config.n_expert, config.ffn_hidden
        self.top_k = config.top_k
        self.router = nn.Linear(d, E, bias=False)
        self.w_in = nn.Parameter(torch.empty(E, d, h))
        self.w_out = nn.Parameter(torch.empty(E, h, d))
        # DeepSeek-V3's load-balancing bias: it shifts which experts are *selected* but never
        # enters the gate values, so it balances load without changing what the router learns.
        self.register_buffer("select_bias", torch.zeros(E))
        self.record = False
        # routing replay (R3): an [N, k] selection to use instead of the router's own, set by
        # GPT.set_replay; the gates are still recomputed from this pass's router, so the router
        # keeps its gradient
        self.replay = None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.router(x).float()
        probs = logits.softmax(dim=-1)
        # softmax is monotone, so selecting on biased logits = selecting on biased scores
        natural = torch.topk(logits + self.select_bias, self.top_k, dim=-1).indices
        topk_idx = natural if self.replay is None else self.replay
        gates = probs.gather(1, topk_idx)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        # topk_natural: what the router would pick, which replay overrides (the drift metrics)
        self.router_probs, self.topk_idx, self.topk_natural = probs, topk_idx, natural
        y = moe_ffn(x, topk_idx, gates.to(x.dtype), self.w_in, self.w_out)
        if self.record:
            self.rec_in, self.rec_out = x, y
        return y.view(shape)


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = MoE(config) if config.n_expert > 1 else MLP(config)

    def forward(self, x, rope, cache=None, layer=0, attn_mask=None):
        x = x + self.attn(self.ln_1(x), rope, cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Preallocated keys and values for every layer; `pos` is how many positions are filled."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, batch_size, config.n_head, max_len, hs)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def keep(self, rows):
        """Keep only batch rows `rows` (ascending), in place: generate() drops finished rows."""
        n, filled = len(rows), slice(0, self.pos)
        for buf in (self.k, self.v):
            buf[:, :n, :, filled] = buf[:, rows, :, filled]  # the gather copies first, so overlap is safe
        self.k, self.v = self.k[:, :n], self.v[:, :n]

    def update(self, layer, k, v):
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=False),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        std_proj = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("w_out"):
                nn.init.normal_(p, mean=0.0, std=std_proj)
            elif name.endswith("w_in"):
                nn.init.normal_(p, mean=0.0, std=0.02)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def ffns(self):
        return [block.mlp for block in self.transformer.h]

    def set_record(self, on):
        for ffn in self.ffns:
            ffn.record = on

    def set_replay(self, topk_per_layer):
        """Route the next passes with these [N, k] selections, one per layer (None: the router's own)."""
        for i, ffn in enumerate(self.ffns):
            ffn.replay = None if topk_per_layer is None else topk_per_layer[i]

    def forward(self, idx, targets=None, pos=None, cache=None, attn_mask=None):
        """idx [B, T] -> (logits [B, T, V], loss or None). targets == -1 are ignored."""
        B, T = idx.shape
        if pos is None:
            assert T <= self.config.block_size, f"sequence of {T} > block_size {self.config.block_size}"
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)
        rope = rotary_tables(pos, self.config.n_embd // self.config.n_head)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, rope, cache, layer, attn_mask)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, eos_id=None,
                 generator=None, use_cache=True):
        """Sample continuations for a batch of prompts (lists of token ids, any lengths).

        temperature 0 is greedy. Returns one list of new tokens per prompt, ending with eos_id
        where the row produced it. use_cache=False recomputes the whole sequence for every new
        token (the slow path the KV cache is measured and tested against).
        """
        device = self.lm_head.weight.device
        B, lens = len(prompts), [len(p) for p in prompts]
        P = max(lens)
        if P >= self.config.block_size:  # no room for one new token: the caller must cut or skip it
            raise ValueError(f"a prompt of {P} tokens leaves no room in a context of {self.config.block_size}")
        max_new_tokens = max(0, min(max_new_tokens, self.config.block_size - P))
        # left-pad so that every row's next token is at the same column
        idx = torch.zeros(B, P, dtype=torch.long, device=device)
        valid = torch.zeros(B, P, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            idx[i, P - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
            valid[i, P - len(p):] = True
        cache = KVCache(self.config, B, P + max_new_tokens, device,
                        self.lm_head.weight.dtype) if use_cache else None
        # out[:, j] is token j of every row; a row that finished early holds eos after its end
        out = torch.full((B, max_new_tokens), -1 if eos_id is None else eos_id, dtype=torch.long, device=device)
        live = torch.arange(B, device=device)  # original row of each batch row
        done = torch.zeros(B, dtype=torch.bool, device=device)
        step_idx = idx
        for j in range(max_new_tokens):
            if use_cache and cache.pos > 0:
                logits = self._forward_padded(step_idx, valid, cache, last=1)
            else:
                logits = self._forward_padded(idx, valid, cache, last=idx.size(1))
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, -float("inf"))
                nxt = sample_rows(logits.softmax(dim=-1), generator)
            out[live, j] = nxt
            step_idx = nxt.unsqueeze(1)
            idx = torch.cat([idx, step_idx], dim=1)
            valid = torch.cat([valid, torch.ones(len(live), 1, dtype=torch.bool, device=device)], dim=1)
            if eos_id is not None:
                done |= nxt == eos_id
                n_done = int(done.sum())  # one sync per token
                if n_done == len(live):
                    break
                # drop finished rows once they are an eighth of the batch: a decode step costs
                # about its row count, and the copy of the KV cache is not free either
                if use_cache and 8 * n_done >= len(live):
                    keep = (~done).nonzero().squeeze(1)
                    live, step_idx, idx, valid, done = live[keep], step_idx[keep], idx[keep], valid[keep], done[keep]
                    cache.keep(keep)
        rows = out[:, :idx.size(1) - P].tolist()  # idx has grown by one column per step taken
        if eos_id is not None:
            rows = [r[:r.index(eos_id) + 1] if eos_id in r else r for r in rows]
        return rows

    def _forward_padded(self, idx, valid, cache, last):
        """Forward the last `last` columns of a left-padded batch; `valid` covers all columns."""
        T = valid.size(1)
        pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)[:, T - last:]
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()[T - last:]
        # a pad query sees only pad keys; letting it see itself keeps its softmax finite (an
        # all-masked row is NaN, and NaN values poison real rows even at weight 0)
        diag = torch.eye(T, dtype=torch.bool, device=idx.device)[T - last:]
        mask = causal & (valid[:, None, :] | diag)
        logits, _ = self(idx[:, -last:], pos=pos, cache=cache, attn_mask=mask[:, None])
        return logits


def sample_rows(probs, generator=None):
    """One token per row of probs [B, V] by inverse CDF: one uniform per row. torch.multinomial
    draws one exponential per vocabulary entry instead, ~9% of a decode step at B=128 on CPU.
    right=True never returns a token of probability 0 (its CDF equals its left neighbour's)."""
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(probs.size(0), 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=probs.size(-1) - 1).squeeze(1)


def count_params(model):
    """(active parameters per token, total parameters). A token uses k of E experts."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for ffn in model.ffns:
        if isinstance(ffn, MoE):
            E = ffn.w_in.size(0)
            inactive += (E - ffn.top_k) * (ffn.w_in[0].numel() + ffn.w_out[0].numel())
    return total - inactive, total
