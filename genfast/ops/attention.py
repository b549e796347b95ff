"""Flash attention: checks, backend choice, autograd and the torch.library registration
(genfast::attention_fwd -> (out, lse), genfast::attention_bwd -> (dq, dk, dv)).

    out = softmax(q k^T * scale + mask) v            q [B, H, Nq, D], k/v [B, H, Nk, D]

Masks: causal is top-left aligned, as torch's scaled_dot_product_attention(is_causal=True)
(query i sees keys 0..i, also when Nq != Nk); key_padding_mask [B, Nk] bool, True = a real key,
False = padding. A query row with no key left (a fully padded sample, or causal rows before the
first real key) gives zeros and zero, finite gradients.

The forward keeps the log-sum-exp of each row in fp32 [B, H, Nq] (+inf marks a fully masked row,
so exp(s - lse) = 0 there) and the backward recomputes the probabilities from it: the Nq x Nk
matrix is never stored by the kernels (the reference and the CPU path build it in blocks).

On GPUs, fp16/bf16 calls without a key mask go to torch's scaled_dot_product_attention (the
"sdpa" backend: cuDNN or flash, whichever torch picks), which an H200 measured faster than
genfast's Triton and CUDA kernels at every benchmarked shape; masks, fp32 and a forced
GENFAST_BACKEND=triton|cuda run genfast's kernels.
"""
import torch

from genfast import backends, reference
from genfast.ops import attention_cpu
from genfast.ops import linear as _linear
from genfast.ops._common import (
    LIB, backward_by_reference, check_float_tensor, dispatcher_needed, finite, graph_grads, transformed)

OP = "attention"
MAX_HEAD_DIM = 256
# keep_p: also return the probabilities [B, H, Nq, Nk] for the backward (CPU path only, within its
# memory budget, see attention_cpu.KEEP_P_BYTES); otherwise the third output is empty and the
# backward recomputes them from lse.
LIB.define("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, float scale,"
           " bool keep_p=False) -> (Tensor, Tensor, Tensor)")
LIB.define("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor p,"
           " Tensor? key_padding_mask, bool causal, float scale) -> (Tensor, Tensor, Tensor)")


def attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None):
    """Scaled dot-product attention without the Nq x Nk matrix (online softmax), differentiable.

    Args:
        q: queries [B, H, Nq, D]; k, v: keys and values [B, H, Nk, D] (Nk may differ from Nq:
            cross attention). fp32, fp16 or bf16 (fp64 runs on the reference). Any strides: the
            views `qkv.view(B, N, 3, H, D).permute(2, 0, 3, 1, 4)` of one fused projection are read
            in place, without a transpose copy. 1 <= D <= 256.
        causal: top-left aligned causal mask (query i attends keys 0..i), as SDPA's is_causal.
        scale: multiplies q k^T; default 1 / sqrt(D).
        key_padding_mask: None or bool [B, Nk] on q's device; True = attend, False = padding.
    Returns:
        [B, H, Nq, D] in q's dtype. Rows with every key masked are zeros (and get zero gradients).
    """
    _check(q, k, v, causal, scale, key_padding_mask)
    if transformed():  # torch.func / forward-mode AD: the reference (see genfast.ops._common.transformed)
        return reference.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)
    name = backend_for(q)  # once a call (a lookup costs ~1 us; tiny CPU calls are host-bound)
    if key_padding_mask is None:
        out = sdpa_attention(q, k, v, causal, scale, name)
        if out is not None:
            return out
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if key_padding_mask is None and _fused_directly(q, k, v, causal, grad, name):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        return out if _has_out_layout(q, out) else _out_layout(q).copy_(out)
    if backends.forced() == "sdpa":
        raise ValueError("GENFAST_BACKEND=sdpa runs torch's scaled_dot_product_attention only without a "
                         "key_padding_mask and with at least one key (genfast defines fully masked rows as zeros; "
                         "SDPA does not): pass key_padding_mask=None or unset GENFAST_BACKEND")
    keep_p = grad and _can_keep_p(q, k)
    if dispatcher_needed(q, k, v, key_padding_mask):
        return torch.ops.genfast.attention_fwd(q, k, v, key_padding_mask, bool(causal), scale, keep_p)[0]
    # plain eager: the op's forward and backward without its dispatch and Python autograd wrapper
    # (~60 of ~290 us of a tiny bf16 CPU forward + backward), as genfast.ops.modulate's _route
    if grad:
        return _GenfastAttention.apply(q, k, v, key_padding_mask, bool(causal), scale, keep_p)
    return _fwd_impl(q, k, v, key_padding_mask, bool(causal), scale)[0]


def sdpa_attention(q, k, v, causal=False, scale=None, name=None):
    """The unmasked call on the "sdpa" way (torch's scaled_dot_product_attention, as users call it; scale
    None: SDPA's 1/sqrt(D)), or None where genfast's kernels serve it. For callers whose q, k, v are
    already checked (attention() above, genfast.ops.dit_block); name: backend_for(q) if known."""
    if not _sdpa_way(q, k, name):
        return None
    if q.numel() == 0:  # torch 2.11's CUDA SDPA returned None for an empty fp16/bf16 batch (H200)
        return torch.matmul(q, k.transpose(-2, -1)).softmax(-1).matmul(v)  # empty, with zero grads for k, v
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, scale=None if scale is None else float(scale))


def _sdpa_way(q, k, name=None):
    """Calls that torch's scaled_dot_product_attention serves, forward and backward under its own
    autograd (the backend "sdpa": on GPUs, fp16/bf16, measured faster than genfast's kernels;
    see backends.PREFERENCE). Never with a key mask (the caller checks) or without keys (genfast
    gives zeros there, SDPA NaN)."""
    if k.shape[2] == 0 or (name or backend_for(q)) != "sdpa":
        return False
    return q.numel() > 0 or backends.forced() == "sdpa"


def _fused_directly(q, k, v, causal=False, grad=True, name=None):
    """Eager CPU calls (without a key mask) whose way is torch's fused kernel with nothing around it:
    forward and backward, or (grad False) a forward alone on that kernel, where the forward's way
    says so or attention_cpu.FUSED_WITHOUT_P sends it there (small bf16 cases on AMX CPUs). torch's
    own SDPA runs that same kernel under its C++ autograd, which saves this op's dispatch and Python
    autograd wrapper (~20 us a forward, ~70 us forward and backward). Same kernel, numbers and
    output/gradient layouts as the op (which compiled code keeps using). Unit last strides only (the
    op copies other views first); no key mask: no fully masked row to zero. name: backend_for(q) if
    known (on CPU tensors the same as _kernel_for(q) wherever it is not "sdpa")."""
    if not q.is_cpu or q.numel() == 0 or k.shape[2] == 0 or torch.compiler.is_compiling():
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False
    if (name if name is not None and name != "sdpa" else _kernel_for(q)) != "cpu":
        return False
    if attention_cpu.widened_forward(q.dtype):
        return False  # the op's forward runs torch's kernel in fp32 (attention_cpu.WIDE_FORWARD)
    nk = k.shape[2]
    way = attention_cpu.variant(q, nk, causal=causal)
    if not grad:
        return way == "sdpa" or attention_cpu.fused_without_p(q, way, nk)
    # (16-bit dtypes whose CPU GEMMs genfast widens: the op's backward runs torch's kernel in fp32)
    return (way == "sdpa" and attention_cpu.variant(q, nk, buffers=2, causal=causal) == "sdpa"
            and q.dtype not in _linear.WIDENED)


def cpu_self_attention(q, k, v, out=None, keep_p=False):
    """The op's CPU forward (its default scale, no mask, not causal), for callers whose q, k, v are
    checked views (genfast.ops.dit_block's fused path, which keeps the output in a buffer of its own
    and, training, runs the backward itself: cpu_self_attention_backward). out: None or a buffer in
    the op's output layout (_out_layout). Returns (out, lse, p or None); keep_p: p kept for the
    backward where _can_keep_p allows."""
    keep_p = keep_p and _can_keep_p(q, k)
    out = _out_layout(q) if out is None else out
    out, lse, *p = attention_cpu.forward(q, k, v, None, False, q.shape[-1] ** -0.5, None, out, keep_p=keep_p)
    return out, lse, p[0] if p else None


def cpu_self_attention_backward(dout, q, k, v, out, lse, p, grads):
    """(dq, dk, dv) of cpu_self_attention: written into grads (unit last strides) where the CPU way
    writes given buffers, else the way's own tensors."""
    return attention_cpu.backward(dout, q, k, v, out, lse, None, False, q.shape[-1] ** -0.5, p=p, grads=grads)


def _can_keep_p(q, k):
    """Whether the forward may keep p for the backward: a function of device, dtype and shapes (and
    GENFAST_BACKEND), so eager, the fake and compiled code agree."""
    if q.device.type != "cpu" or q.numel() == 0 or k.shape[2] == 0 or _kernel_for(q) != "cpu":
        return False
    if any(isinstance(n, torch.SymInt) for n in (*q.shape, k.shape[2])):
        return False  # dynamic sizes (export Dims, mark_dynamic): a choice by size would guard them
    return attention_cpu.keeps_p(q, k.shape[2])


def _check(q, k, v, causal, scale, mask):
    if not _plainly_valid(q, k, v, causal, scale, mask):
        _check_each(q, k, v, causal, scale, mask)


_CHECK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _plainly_valid(q, k, v, causal, scale, mask):
    """The common valid call (plain tensors, no mask, a float or no scale), recognised in ~1 us where
    _check_each takes ~2.6 (tiny CPU calls are host-bound); False sends a call to _check_each, which
    names the first problem or passes it."""
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return False
    if mask is not None or type(causal) is not bool or not (scale is None or type(scale) is float and finite(scale)):
        return False
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or ks != v.shape or len(ks) != 4 or qs[0] != ks[0] or qs[1] != ks[1] or qs[3] != ks[3]:
        return False
    if not 1 <= qs[3] <= MAX_HEAD_DIM or q.dtype not in _CHECK_DTYPES or not q.dtype == k.dtype == v.dtype:
        return False
    return (q.is_cpu and k.is_cpu and v.is_cpu) or q.device == k.device == v.device


def _check_each(q, k, v, causal, scale, mask):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; expected the same device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; expected the same dtype")
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
        raise ValueError(f"k and v must have q's batch and heads {(b, h)}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of keys, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"k and v must have q's head dim {d}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim (q.shape[-1]) must be in 1..{MAX_HEAD_DIM}, got {d}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not finite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype bool (True = attend), got {mask.dtype}")
        if mask.shape != (b, k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape [B, Nk] = {[b, k.shape[2]]}, got {list(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}; expected the same device")


# ----------------------------------------------------------------------------------- backends
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_reasons(dtype):
    return [] if dtype in _KERNEL_DTYPES else [f"dtype {dtype} is not supported (fp32, fp16, bf16 only)"]


def _sdpa_reasons(device_type, dtype):
    if device_type not in ("cuda", "cpu"):
        return [f"runs on cuda or cpu tensors, got {device_type} tensors"]
    if dtype not in _KERNEL_DTYPES:
        return _dtype_reasons(dtype)
    if dtype == torch.float32 and backends.forced() != "sdpa":
        return ["fp32: genfast's own kernels (SDPA is preferred for fp16/bf16 only, where it was measured)"]
    return []


def _reasons(device_type, dtype, head_dim=64, kernels=False):
    """{backend: callable -> reasons}. Head dims 1..256 are checked in attention() for every backend.
    kernels=True leaves out "sdpa": the op's own implementations (attention() takes that way itself)."""
    from genfast.ops import attention_cuda  # the CUDA flash kernels (mma.sync) and their emulated twin

    sdpa = {} if kernels else {"sdpa": lambda: _sdpa_reasons(device_type, dtype)}
    return {
        **sdpa,
        "cuda": lambda: attention_cuda.reasons("cuda", device_type, dtype, head_dim),
        "cuda_emu": lambda: attention_cuda.reasons("cuda_emu", device_type, dtype, head_dim),
        # Split head dims (72, 80, 96) in fp16/bf16 read misaligned rows wrongly on Hopper (Triton 3.6):
        # the kernels' launchers copy such q/k/v into aligned rows (kernels/attention.py).
        "triton": lambda: backends.triton_reasons(device_type) + _dtype_reasons(dtype),
        # torch's GEMMs / fused CPU kernel around genfast._C's softmax rows (see attention_cpu.py).
        "cpu": lambda: backends.module_reasons("_C", device_type, "cpu") + _dtype_reasons(dtype),
        "reference": lambda: [],
    }


def backend_name(device_type, dtype, head_dim, kernels=False):
    """The backend for tensors of this device type, dtype and head dim (kernels=True: the op's own
    implementation, never "sdpa"); remembered, as a call asks up to 3 times."""
    return backends.choose_cached(OP, device_type, (dtype, head_dim, kernels), _reasons)


def backend_for(q, kernels=False):
    if type(q) is not torch.Tensor or torch.compiler.is_compiling():  # fake/symbolic sizes stay out of the dict
        return backends.choose(OP, q.device.type, _reasons(q.device.type, q.dtype, q.shape[-1], kernels))
    return backend_name(q.device.type, q.dtype, q.shape[-1], kernels)


def _kernel_for(q):
    return backend_for(q, kernels=True)


def _fully_masked_rows(nq, nk, causal, mask, device):
    """Bool [B or 1, 1, Nq]: rows with no key to attend, or None when there are none."""
    if mask is None:
        return None if nk > 0 else torch.ones(1, 1, nq, dtype=torch.bool, device=device)
    if causal:  # row i sees keys 0..i: masked when none of mask[:, :i+1] is True
        seen = mask[:, :nq].cumsum(1) > 0
        if nq > nk:
            seen = torch.cat([seen, seen[:, -1:].expand(-1, nq - nk)], 1) if nk else seen.new_zeros(mask.shape[0], nq)
        return ~seen[:, None, :]
    return ~mask.any(1)[:, None, None].expand(-1, 1, nq)


def _reference_fwd(q, k, v, mask, causal, scale):
    out = reference.attention(q, k, v, causal=causal, scale=scale, key_padding_mask=mask)
    lse = reference.attention_lse(q, k, causal=causal, scale=scale, key_padding_mask=mask)
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _reference_bwd(dout, q, k, v, mask, causal, scale):
    """The softmax-attention gradients written out in plain PyTorch (fp32, fp64 for fp64): autograd
    does not record inside a custom op's implementation."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc, do = q.to(ct), k.to(ct), v.to(ct), dout.to(ct)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if causal or mask is not None:
        allowed = reference.attention_allowed(q.shape[2], k.shape[2], causal=causal, key_padding_mask=mask,
                                              device=q.device)
        any_key = allowed.any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")).masked_fill(~any_key, 0.0), -1) * any_key
    else:
        p = torch.softmax(s, -1)
    dp = torch.matmul(do, vc.transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
    return (torch.matmul(ds, kc).to(q.dtype), torch.matmul(ds.transpose(-1, -2), qc).to(k.dtype),
            torch.matmul(p.transpose(-1, -2), do).to(v.dtype))


def _fwd_impl(q, k, v, mask, causal, scale, keep_p=False):
    if keep_p and not _can_keep_p(q, k):
        raise ValueError("keep_p=True needs the CPU path and probabilities within attention_cpu.KEEP_P_BYTES")
    out, lse, *p = _fwd_run(q, k, v, mask, causal, scale, keep_p)
    return out, lse, p[0] if p else _no_p(q)


def _no_p(q):
    return q.new_empty((0,))


def _fwd_run(q, k, v, mask, causal, scale, keep_p):
    b, h, nq, d = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to compute, or no key at all: zeros
        return _out_layout(q).zero_(), torch.full((b, h, nq), float("inf"), dtype=lse_dtype, device=q.device)
    name = _kernel_for(q)
    if name == "triton":
        from genfast.kernels.attention import attention_forward

        return attention_forward(q, k, v, mask, causal, scale, out=_out_layout(q))
    if name in ("cuda", "cuda_emu"):
        from genfast.ops import attention_cuda

        return attention_cuda.forward(name, q, k, v, mask, causal, scale, out=_out_layout(q))
    if name == "cpu":
        return attention_cpu.forward(q, k, v, mask, causal, scale,
                                     _fully_masked_rows(nq, k.shape[2], causal, mask, q.device), _out_layout(q),
                                     keep_p=keep_p)
    out, lse = _reference_fwd(q, k, v, mask, causal, scale)
    return _out_layout(q).copy_(out), lse


def _heads_outer(q):
    """The output keeps [B, H, Nq, D] memory (see _out_layout): CPU tensors whose heads are outer to
    their tokens."""
    return q.is_cpu and not q.stride(1) < q.stride(2)


def _has_out_layout(q, out):
    """out [B, H, Nq, D] is laid out as _out_layout(q) promises (checked without allocating)."""
    return out.is_contiguous() if _heads_outer(q) else out.transpose(1, 2).is_contiguous()


def _out_layout(q):
    """The forward's output [B, H, Nq, D]. Its memory is [B, Nq, H, D] (so that
    out.transpose(1, 2).reshape(B, Nq, H * D) before the output projection is free) on every
    backend, except for CPU tensors whose heads are outer to their tokens (q [B, H, Nq, D]
    contiguous): there it is [B, H, Nq, D], the layout torch's fused CPU kernel writes (it follows
    q's, torch 2.13; re-laying it out would cost a transposing copy) and the one in which the
    "heads" way runs each GEMM over all samples at once. A function of device type and q's stride
    order, so the fake and every backend agree (all of them write any output strides)."""
    b, h, nq, d = q.shape
    if _heads_outer(q):
        return torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    return torch.empty((b, nq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def _grad_strides(t):
    """The strides of the backward's gradient of t [B, H, N, D]. CPU tensors of the dtypes torch's
    fused CPU kernel may serve: [B, N, H, D] memory, the layout that kernel's backward returns
    whatever its inputs' (torch 2.13), so that it is returned as it is (as SDPA's own autograd
    does) instead of copied; elsewhere contiguous. A function of device type and dtype only, so
    the fake agrees."""
    b, h, n, d = t.shape
    if t.device.type == "cpu" and attention_cpu.may_use_fused(t.dtype):
        return (n * h * d, d, h * d, 1)
    return (h * n * d, n * d, d, 1)


def _grad_layout(t):
    return torch.empty_strided(t.shape, _grad_strides(t), dtype=t.dtype, device=t.device)


def _in_grad_layout(t, g):
    """g, or a copy of it in t's gradient layout where its strides differ (the fake's promise)."""
    return g if g.stride() == _grad_strides(t) else _grad_layout(t).copy_(g)


def _bwd_impl(dout, q, k, v, out, lse, p, mask, causal, scale):
    if q.numel() == 0 or k.shape[2] == 0:
        return _grad_layout(q).zero_(), _grad_layout(k).zero_(), _grad_layout(v).zero_()
    name = _kernel_for(q)
    if name == "triton":
        from genfast.kernels.attention import attention_backward

        got = attention_backward(dout, q, k, v, out, lse, mask, causal, scale)
    elif name in ("cuda", "cuda_emu"):
        from genfast.ops import attention_cuda

        got = attention_cuda.backward(name, dout, q, k, v, out, lse, mask, causal, scale)
    elif name == "cpu":
        got = attention_cpu.backward(dout, q, k, v, out, lse, mask, causal, scale, p=p if p.numel() else None)
    else:
        got = _reference_bwd(dout, q, k, v, mask, causal, scale)
    return tuple(_in_grad_layout(t, g) for t, g in zip((q, k, v), got))


# ------------------------------------------------------------------------ torch.library glue
for _key in ("CPU", "CUDA"):
    LIB.impl("attention_fwd", _fwd_impl, _key)
    LIB.impl("attention_bwd", _bwd_impl, _key)


@torch.library.register_fake("genfast::attention_fwd")
def _fake_fwd(q, k, v, mask, causal, scale, keep_p=False):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = q.new_empty((*q.shape[:3], k.shape[2])) if keep_p else _no_p(q)
    return _out_layout(q), q.new_empty(q.shape[:3], dtype=lse_dtype), p


@torch.library.register_fake("genfast::attention_bwd")
def _fake_bwd(dout, q, k, v, out, lse, p, mask, causal, scale):
    return _grad_layout(q), _grad_layout(k), _grad_layout(v)


def _save(ctx, inputs, output):
    """What _backward reads, for the op's autograd and its eager twin (_GenfastAttention)."""
    q, k, v, mask, causal, scale, *_ = inputs
    out, lse, p = output
    ctx.causal, ctx.scale = causal, scale
    ctx.save_for_backward(q, k, v, out, lse, p, mask)


def _setup_context(ctx, inputs, output):
    _save(ctx, inputs, output)
    _, lse, p = output
    ctx.mark_non_differentiable(lse, p)
    ctx.set_materialize_grads(False)  # else autograd fills a zero "gradient" of p (B H Nq Nk) per backward


def _backward(ctx, dout, _dlse, _dp, direct=False):
    """direct (the eager twin): the backward's impl without the dispatcher (~4 us a call) where
    dispatcher_needed allows, as the twin's forward."""
    q, k, v, out, lse, p, mask = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None
    if backward_by_reference(dout):  # create_graph or batched grads: genfast.ops._common.backward_by_reference
        fn = lambda q, k, v: reference.attention(q, k, v, causal=ctx.causal, scale=ctx.scale,  # noqa: E731
                                                 key_padding_mask=mask)
        return (*graph_grads(fn, (q, k, v), ctx.needs_input_grad[:3], (dout,)), None, None, None, None)
    # the CPU path reads any strides (dout arrives in [B, N, H, D] memory from a DiT's output projection)
    dout = dout if dout.is_cpu and _kernel_for(q) == "cpu" else dout.contiguous()
    bwd = _bwd_impl if direct and not dispatcher_needed(dout, q) else torch.ops.genfast.attention_bwd
    dq, dk, dv = bwd(dout, q, k, v, out, lse, p, mask, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("genfast::attention_fwd", _backward, setup_context=_setup_context)


class _GenfastAttention(torch.autograd.Function):
    """The eager twin of the registered attention_fwd op + autograd: the same impls, no dispatcher."""

    @staticmethod
    def forward(ctx, q, k, v, mask, causal, scale, keep_p):
        out, lse, p = _fwd_impl(q, k, v, mask, causal, scale, keep_p)
        _save(ctx, (q, k, v, mask, causal, scale), (out, lse, p))  # (lse and p are not outputs here)
        return out

    @staticmethod
    def backward(ctx, dout):
        return _backward(ctx, dout, None, None, direct=True)
