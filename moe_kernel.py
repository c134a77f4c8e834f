"""
Dropless mixture-of-experts FFN, batched for speed, with a hand-written backward.

    y[n] = sum_j topk_weight[n, j] * gelu(x[n] @ w_in[e]) @ w_out[e],   e = topk_idx[n, j]

The naive way (moe_ffn_masked_loop below) scans the whole routing table once per
expert and leaves autograd to record a gather, two matmuls, a GELU, a multiply and
a scatter per expert. Instead, with M = N*k (token, expert) pairs:

1. One stable sort of the M pairs by expert id, so each expert's rows form one
   contiguous block. The layer is then: one gather of x, a grouped GEMM, one GELU
   over everything, a second grouped GEMM, one gate multiply, one index_add_ back
   to token order. Nothing is dropped; an expert with no token is an empty block.
2. The gate multiplies the expert output (width d), not the hidden activation
   (width h, usually larger).
3. The backward is written by hand. It reuses the permutation, does each of its
   four GEMMs (dA, dW_out, dX, dW_in) as one grouped GEMM, and applies GELU's
   exact derivative d/dz gelu(z) = Phi(z) + z*phi(z) in place on dA.

The grouped GEMM, three ways (timings: 2-core CPU, torch 2.13, float32):
- "bmm": pad every expert's block to the largest block size C, then torch.bmm.
  Under roughly balanced routing the padding is ~5-10% of the rows; bmm runs
  ~10-20% faster than a loop of per-expert torch.mm (it gives whole experts to
  threads, where the loop splits each small matmul across the cores) and has no
  Python loop: net ~2-5% on the whole layer. Padding rows read token 0 with
  gate 0, so they add exact zeros (unless dy[0] holds inf/NaN, in which case the
  step is lost anyway).
- "loop": if routing is skewed (padding above PAD_SLACK), a Python loop of torch.mm
  over views from split()/unbind(); it needs the block sizes on the host.
- "grouped": on CUDA, F.grouped_mm (one launch, no host sync; a fused CUTLASS
  kernel for bf16 on sm90+). On CPU it takes float32 only, has no out= argument
  and was no faster than the loop, so it is not used there.
Even so the GEMMs run ~10% (E=8) to ~25% (E=32) slower than the dense FFN's big
GEMMs of equal FLOPs, because each expert's matrices are small. That is the floor
of the kernel/dense ratio; the sort, gathers and scatters add the rest.

Memory. Only the pre-activation z ([M, h]) and index vectors are saved, half of
what the dense FFN keeps; backward recomputes a = gelu(z) (~1.3 ms at the bench
sizes) and re-gathers x. On CPU a fresh multi-MB tensor is expensive: glibc
hands big freed blocks back to the OS, so the next one is page-faulted and zeroed
again, ~0.5 ms per MB here, costlier than the arithmetic done on it. (Where memory
is recycled for free, e.g. with bench.py --keep-freed-memory, also saving a and
the expert outputs would be ~5% faster; under plain glibc it is slower.) For the
same reason every temporary that dies inside forward() or backward() lives in a
per-thread scratch buffer reused across calls (about 2*M*(d+h) floats per thread
and dtype, kept for the process). On CUDA the caching allocator already recycles
memory; there the scratch helper just allocates.
"""

import math
import threading
import warnings

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

PAD_SLACK = 1.1  # use padded bmm while E * max_block <= PAD_SLACK * N * k
_grouped_mm_ok = hasattr(F, "grouped_mm")
_grouped_mm_failed = set()  # (device type, dtype) that F.grouped_mm rejected once: not tried again
_scratch_bufs = threading.local()  # per thread, so concurrent callers never share one


def _scratch(slot, shape, like):
    """Uninitialised tensor valid only until the current forward()/backward() returns."""
    if like.device.type != "cpu":
        return like.new_empty(shape)
    bufs = _scratch_bufs.__dict__.setdefault("bufs", {})
    n, key = math.prod(shape), (slot, like.dtype)
    if key not in bufs or bufs[key].numel() < n:
        bufs[key] = like.new_empty(n)
    return bufs[key][:n].view(shape)


def _use_grouped_mm(x, h):
    if not _grouped_mm_ok or x.device.type != "cuda" or (x.device.type, x.dtype) in _grouped_mm_failed:
        return False
    # grouped_mm wants every row stride to be a multiple of 16 bytes, and has no float64
    align = 16 // x.element_size()
    return x.dtype != torch.float64 and x.shape[1] % align == 0 and h % align == 0


def _grouped_mm(a, b, offs):
    """F.grouped_mm, or None if it rejects these inputs. We then stop trying it for this dtype
    only: a build may take bf16 (the fused sm90 kernel) but not float32, and one float32 call
    (say, an fp32 evaluation) must not cost the bf16 training steps their fast path."""
    key = (a.device.type, a.dtype)
    if key not in _grouped_mm_failed:
        try:
            return F.grouped_mm(a, b, offs=offs)
        except RuntimeError as err:
            _grouped_mm_failed.add(key)
            warnings.warn(f"F.grouped_mm failed for {a.dtype} ({err}); moe_ffn falls back to a torch.mm loop")
    return None


def _gmm(a, b, plan, out=None):
    """Grouped a @ b: the rows of a [M, K] in block e times b[e] [K, n] -> [M, n]."""
    kind, arg = plan
    if kind == "bmm":
        E, C = arg
        out = None if out is None else out.view(E, C, b.shape[2])
        return torch.bmm(a.view(E, C, a.shape[1]), b, out=out).view(E * C, b.shape[2])
    if kind == "grouped":
        res = _grouped_mm(a, b, arg)
        if res is not None:
            return res
        arg = arg.diff(prepend=arg.new_zeros(1)).tolist()
    out = a.new_empty(a.shape[0], b.shape[2]) if out is None else out
    for ai, bi, oi in zip(a.split(arg), b.unbind(0), out.split(arg)):
        torch.mm(ai, bi, out=oi)
    return out


def _gmm_weight(a, g, plan):
    """Per-block weight gradient: out[e] = a[block e].T @ g[block e] -> [E, a.shape[1], g.shape[1]]."""
    kind, arg = plan
    if kind == "bmm":
        E, C = arg
        return torch.bmm(a.view(E, C, a.shape[1]).transpose(1, 2), g.view(E, C, g.shape[1]))
    if kind == "grouped":
        res = _grouped_mm(a.t(), g, arg)
        if res is not None:
            return res
        arg = arg.diff(prepend=arg.new_zeros(1)).tolist()
    out = a.new_empty(len(arg), a.shape[1], g.shape[1])
    for ai, gi, oi in zip(a.split(arg), g.split(arg), out.unbind(0)):
        torch.mm(ai.t(), gi, out=oi)  # an empty block (K=0) writes zeros, as it should
    return out


class _MoEFFN(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, w_in, w_out):
        N, d = x.shape
        E, _, h = w_in.shape
        k = topk_idx.shape[1]
        M = N * k
        flat = topk_idx.reshape(-1)
        # stable: tokens keep their order inside an expert, so results are deterministic
        order = torch.argsort(flat, stable=True)
        tok = torch.div(order, k, rounding_mode="floor")  # token of each sorted row
        gate = topk_weight.reshape(-1).index_select(0, order)
        counts = torch.bincount(flat, minlength=E)
        pos = None  # padded row of each sorted row, bmm layout only
        if _use_grouped_mm(x, h):
            plan = ("grouped", counts.cumsum(0).to(torch.int32))
        else:
            C = int(counts.max()) if M else 0
            if E * C <= PAD_SLACK * M:
                plan = ("bmm", (E, C))
                # sorted row m goes to its expert's block start e*C plus its rank in that block
                e_sorted = flat.index_select(0, order)
                first = (counts.cumsum(0) - counts).index_select(0, e_sorted)
                pos = e_sorted * C + torch.arange(M, device=x.device) - first
                tok = tok.new_zeros(E * C).index_copy_(0, pos, tok)
                gate = gate.new_zeros(E * C).index_copy_(0, pos, gate)
            else:
                plan = ("loop", counts.tolist())

        rows = tok.shape[0]  # M, or E*C with padding
        xs = torch.index_select(x, 0, tok, out=_scratch(0, (rows, d), x))
        z = _gmm(xs, w_in, plan)
        a = torch.ops.aten.gelu.out(z, out=_scratch(2, (rows, h), x))
        ys = _gmm(a, w_out, plan, out=_scratch(1, (rows, d), x)).mul_(gate[:, None])
        y = x.new_zeros(N, d).index_add_(0, tok, ys)

        # only z is saved: recomputing a and re-gathering xs beats keeping them (docstring)
        ctx.save_for_backward(x, order, pos, tok, gate, z, w_in, w_out)
        ctx.plan, ctx.k = plan, k
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, order, pos, tok, gate, z, w_in, w_out = ctx.saved_tensors
        plan, N, k = ctx.plan, x.shape[0], ctx.k
        rows, d = tok.shape[0], x.shape[1]
        need_x, _, need_gate, need_w_in, need_w_out = ctx.needs_input_grad
        dx = dgate = dw_in = dw_out = None
        dy = dy.contiguous()

        dys = torch.index_select(dy, 0, tok, out=_scratch(0, (rows, d), dy))
        a = torch.ops.aten.gelu.out(z, out=_scratch(2, z.shape, dy))
        # un-gated dA first: d(gate) = <dy, a @ w_out[e]> = <dy @ w_out[e].T, a>
        da = _gmm(dys, w_out.transpose(1, 2), plan, out=_scratch(3, z.shape, dy))
        dys.mul_(gate[:, None])  # now the gradient w.r.t. the un-gated expert output
        if need_w_out:
            dw_out = _gmm_weight(a, dys, plan)
        if need_gate:
            dgate_rows = a.mul_(da).sum(1)  # a is not needed any more: multiply in place
            if pos is not None:
                dgate_rows = dgate_rows.index_select(0, pos)  # drop the padding rows
            # undo the sort: sorted row m is flat slot order[m]
            dgate = torch.empty_like(dgate_rows).index_copy_(0, order, dgate_rows).view(N, k)
        if need_x or need_w_in:
            # exact GELU' written over da: aten computes da * (Phi(z) + z*phi(z))
            dz = torch.ops.aten.gelu_backward.grad_input(da, z, grad_input=da).mul_(gate[:, None])
            if need_w_in:
                xs = torch.index_select(x, 0, tok, out=_scratch(1, (rows, d), x))
                dw_in = _gmm_weight(xs, dz, plan)
            if need_x:
                dxs = _gmm(dz, w_in.transpose(1, 2), plan, out=_scratch(0, (rows, d), dy))
                dx = torch.zeros_like(dy).index_add_(0, tok, dxs)
        return dx, None, dgate, dw_in, dw_out


def moe_ffn(x, topk_idx, topk_weight, w_in, w_out):
    """Dropless top-k MoE FFN. x [N, d], topk_idx [N, k] int64 (distinct within a row),
    topk_weight [N, k], w_in [E, d, h], w_out [E, h, d] -> y [N, d].
    Leading dims are flattened: x [..., d] with topk [..., k] gives y [..., d]."""
    shape, k = x.shape, topk_idx.shape[-1]
    x, topk_idx, topk_weight = x.reshape(-1, shape[-1]), topk_idx.reshape(-1, k), topk_weight.reshape(-1, k)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        # autocast does not reach inside a custom Function, so apply its matmul policy
        # here (compute in the autocast dtype) and switch it off inside
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(torch.promote_types(x.dtype, w_in.dtype), w_out.dtype)
    # casts sit outside the Function, so autograd casts the gradients back for us
    args = (x.to(dtype).contiguous(), topk_idx.long(), topk_weight.to(dtype),
            w_in.to(dtype).contiguous(), w_out.to(dtype).contiguous())
    with torch.autocast(dev, enabled=False):
        y = _MoEFFN.apply(*args)
    return y if len(shape) == 2 else y.view(shape)


# ----------------------------------------------------------------------------
# slow references, for tests and the benchmark

def _gelu_exact(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def moe_ffn_reference(x, topk_idx, topk_weight, w_in, w_out):
    """One token, one expert at a time: obviously correct, very slow."""
    rows = []
    for n in range(x.shape[0]):
        acc = torch.zeros_like(x[n])
        for j in range(topk_idx.shape[1]):
            e = int(topk_idx[n, j])
            acc = acc + topk_weight[n, j] * (_gelu_exact(x[n] @ w_in[e]) @ w_out[e])
        rows.append(acc)
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])


def moe_ffn_masked_loop(x, topk_idx, topk_weight, w_in, w_out):
    """What most codebases write: one boolean scan of the routing table per expert."""
    out = torch.zeros_like(x)
    for e in range(w_in.shape[0]):
        rows, slot = torch.where(topk_idx == e)
        h = F.gelu(x[rows] @ w_in[e])
        out.index_add_(0, rows, topk_weight[rows, slot, None] * (h @ w_out[e]))
    return out
