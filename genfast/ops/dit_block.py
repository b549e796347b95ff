"""The DiT block (adaLN-Zero) in three autograd nodes instead of ~25 (two on CPU kernels, where the
attention joins the first): genfast.nn.DiTBlock's eager path.

    attention half, in:   q, k, v = views of modulate(x, shift1, scale1) Wqkv^T + bqkv  (_AttnIn)
    attention:            o = attention(q, k, v)       (torch's SDPA on GPUs, its C++ autograd node;
                                                        CPU training: inside the first node, _AttnHalf)
    the rest:             x1 = x + gate1 * (o Wp^T + bp)                                (_BlockOut)
                          out = x1 + gate2 * fc2(gelu_tanh(fc1(modulate(x1, shift2, scale2))))

Each Python node's backward calls the kernels and GEMMs in a row: the same kernels as the per-op
path (genfast's modulate and gated residual, GELU(tanh), torch's GEMMs; oneDNN's for fp32 on the
CPU, as genfast.ops.linear), the same arithmetic (fp32 CPU: the per-op path's bits, tested). What
it saves (H200, bf16, DiT-XL/2, batch 32, benchmarks/gpu/NOTES.md "fourth GPU session"):
  - host time: ~25 autograd nodes (4 of them Python) become 3 (2 Python), and the forward skips
    genfast.attention's checks; the GPUs' hosts spend ~12 us per aten op from Python;
  - the q/k/v gradients are read in place by three K = C GEMMs (dm accumulates, dW rows written in
    place): the per-op graph stacks dq, dk, dv and copies the stack into the qkv layout first
    (109 + 87 us of 1.9 ms of GPU time per block at 256 tokens);
  - inference: fc1 + GELU(tanh) as one cuBLASLt GEMM with its GELU epilogue (torch._addmm_activation;
    tanh form, applied to the fp32 accumulator): -45 us of a 0.5 ms forward at 256 tokens.
  - bias gradients from passes that read the gradient anyway (GPUs: 8.22 vs 8.50 ms a 1024-token step
    with all off, H200 session 17; Intel CPUs): proj's and
    fc2's from the gated-residual backwards (BIAS_IN_GATED), fc1's from the GELU backward
    (GELU_BIAS_IN_BWD); qkv's as one pass over the q, k, v gradients (QKV_BIAS_ONE_PASS); dx1's
    residual gradient added inside the modulate backward (ADD_IN_MODULATE). Torch's column sums over
    [B*N, C], [B*N, C] and [B*N, 4C] and one add over [B*N, C] fewer; three sums become one launch.
Measured (harness, same run; H200, session 25): forward 1.35x / 1.30x eager and 1.04x / 1.12x
torch.compile at 256 / 1024 tokens; forward + backward 0.89x / 1.22x eager, 0.82x / 1.04x compile (the
per-op path: 1.16x / 1.12x slower than this one). The 256-token training step is bound by host time, and
this path's two Python backward nodes cost the host more than eager's C++ nodes there.

Only plain eager calls come here (see fused_block_ok): torch.compile, tensor subclasses, functorch
transforms, autocast, fp64, LoRA-style wrapped Linears and the padded qkv projection of the Triton
way take the per-op path of genfast.nn.DiTBlock, whose ops are registered for compile.
"""
import torch
import torch.nn.functional as F

from genfast.ops import attention as _attention_ops
from genfast.ops import gelu as _gelu
from genfast.ops import linear as _linear
from genfast import reference
from genfast.ops._common import (
    KERNEL_DTYPES, backward_by_reference, cpu_flags, cpu_vendor, dispatcher_needed, graph_grads, pooled_buffer,
    reused_buffer)
from genfast.ops.modulate import (
    _gated_impl, _modulate_bwd_impl, _modulate_grads, _modulate_impl, gated_bias_fp32, gated_bwd)
from genfast.ops.qkv import qkv_head_width

_PLAIN = (torch.Tensor, torch.nn.Parameter)
# fc1 + GELU in one cuBLASLt GEMM (its GELU epilogue is the tanh form, applied to the fp32 accumulator)
# for GPU inference, where the pre-activation is not needed for a backward.
EPILOGUE_GELU = True
# Where the fused path is the default, per device type (tests and A/B timings flip these).
USE_FUSED = {"cuda": True, "cpu": True}
# The CPU's GEMMs are torch's BLAS (MKL) on Intel, oneDNN elsewhere (genfast.ops.linear.USE_ONEDNN),
# whose fp32 backward makes the bias gradients itself: the bias fusions below are on for the CPU
# where the GEMMs are MKL's (measured there), off where they are oneDNN's (unmeasured).
_CPU_BIAS_PASSES = not _linear.default_use_onednn()
# The proj and fc2 bias gradients from the gated-residual backward's pass over its gradient
# (genfast.ops.modulate.gated_bwd) instead of a column-sum pass over dp / df each: on GPUs those
# sums were 7 reductions at ~1 TB/s, 7.3 % of the step (H200, 256 tokens). Per device type.
BIAS_IN_GATED = {"cuda": True, "cpu": _CPU_BIAS_PASSES}
# fc1's bias gradient from the GELU backward's pass (genfast.ops.gelu.gelu_tanh_backward_bias)
# instead of a column-sum pass over the [B*N, 4C] dh. Per device type. Xeon, 2 threads, the
# 2048 x 1536 dh of DiT-S out of cache: 1.8 ms vs 2.5 ms for the GELU backward and torch's sum.
GELU_BIAS_IN_BWD = {"cuda": True, "cpu": _CPU_BIAS_PASSES}
# proj's, fc1's and fc2's biases added by the passes after their GEMMs where the GEMM is torch's BLAS
# on fp32 CPU tensors (_folds_bias): DiT-S fp32 forward -0.7-1.0 ms of ~27 on the Xeon. Only where
# MKL's addmm was measured to give mm + bias's bits (its AVX-512 code on Intel CPUs): on an AVX2-only
# AMD EPYC, MKL's addmm adds the bias in another order (outputs 1 ulp apart), so it stays off there.
FOLD_BIAS = cpu_vendor() == "GenuineIntel" and "avx512f" in cpu_flags()
# dx1 = modulate's dx + dout inside the modulate backward (its addend) instead of a separate add.
ADD_IN_MODULATE = True
# CPU training where genfast's CPU attention serves the heads: the attention inside the first node
# (_AttnHalf), whose backward has the q, k, v gradients written into one [B*N, 3C] buffer in the qkv
# projection's layout, so that dm, dW and db of the projection are one GEMM, one GEMM and one sum.
# DiT-S fp32 forward + backward on the Xeon: 0.2-1.1 % faster in 5 of 6 paired A/B runs of 60 steps.
ATTENTION_IN_NODE = True
# qkv's bias gradient as one column-sum pass over the q, k and v gradients (genfast.ops.gelu.column_sums)
# instead of three torch sums (~1 TB/s each over [B*N, C] on an H200). Per device type: on the Xeon
# the C++ pass ties torch's three sums (0.49 vs 0.48 ms over DiT-S's 3 x 2048 x 384 out of cache).
QKV_BIAS_ONE_PASS = {"cuda": True, "cpu": False}


def fused_block_ok(block, x, c):
    """Whether block(x, c) may take the fused path: plain eager call, kernel dtypes, plain Linears
    (plain_linear: no hooks, no parametrizations), no hooks on attn / mlp / adaLN_modulation (whose
    calls the fused path skips). Submodules and parameters are read from the modules' dicts: nn.Module
    attribute access costs ~1 us each, and this runs on every call of a host-bound block."""
    if not USE_FUSED.get(x.device.type, False) or x.dtype not in KERNEL_DTYPES or c.dtype != x.dtype:
        return False
    if x.dim() != 3 or c.dim() != 2 or torch.is_autocast_enabled(x.device.type):
        return False
    mods = block._modules
    attn, mlp, ada = mods["attn"], mods["mlp"], mods["adaLN_modulation"]  # (a Sequential of SiLU, Linear)
    silu, ada_lin = ada._modules["0"], ada._modules["1"]
    linears = (attn._modules["qkv"], attn._modules["proj"], mlp._modules["fc1"], mlp._modules["fc2"], ada_lin)
    # hooks (the global ones checked once) and plain Linears (_linear.plain_linear)
    own_hooks = _linear.own_hooks
    if _linear.global_hooks() or own_hooks(attn) or own_hooks(mlp) or own_hooks(ada) or own_hooks(silu):
        return False
    for m in linears:
        if not _linear.plain_linear_own(m):
            return False
        w, b = m._parameters["weight"], m._parameters.get("bias")
        if b is None or w.dtype != x.dtype or type(w) not in _PLAIN or type(b) not in _PLAIN:  # DTensor, fake, ...
            return False
    if dispatcher_needed(x, c):
        return False
    d = attn.head_dim
    return x.device.type != "cuda" or qkv_head_width(d, x.dtype, x.device) == d


def block_forward(block, x, c, eps=1e-6):
    """genfast.nn.DiTBlock.forward(x, c) on the fused path (callers check fused_block_ok first)."""
    import genfast

    b, n, ch = x.shape
    # modules and parameters from the modules' dicts (checked plain by fused_block_ok): nn.Module
    # attribute access costs ~1 us each on a host-bound path
    mods = block._modules
    attn, mlp = mods["attn"], mods["mlp"]
    am, mm = attn._modules, mlp._modules
    ada = mods["adaLN_modulation"]._modules["1"]._parameters
    qkv_p = am["qkv"]._parameters
    wq, bq = qkv_p["weight"], qkv_p["bias"]
    weights = tuple(lin._parameters[name] for lin in (am["proj"], mm["fc1"], mm["fc2"]) for name in ("weight", "bias"))
    # six [B, 1, C] views of the adaLN output (one view + unbind: fewer ops on the host-bound path)
    # (on the CPU through genfast.ops.linear: a bf16 dX GEMM of this shape took 9 ms in torch on an AVX2 CPU)
    ada_linear = _linear.linear if c.device.type == "cpu" else F.linear
    shift1, scale1, gate1, shift2, scale2, gate2 = ada_linear(F.silu(c), ada["weight"], ada["bias"]).view(b, 6, 1, ch).unbind(1)
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, c, ada["weight"], ada["bias"], wq, bq, *weights))
    heads = attn.num_heads
    d = ch // heads
    cpu_kernels = _cpu_kernels(x, d)
    if grad and cpu_kernels and ATTENTION_IN_NODE:
        o = _AttnHalf.apply(x, shift1, scale1, wq, bq, eps, heads)
    else:
        if grad:
            q, k, v = _AttnIn.apply(x, shift1, scale1, wq, bq, eps, heads)
        else:  # inference: every intermediate is dropped by the next step, so each is a reused buffer (_temp)
            m, _, _, qkv = _modulated_qkv(x, shift1, scale1, wq, bq, eps, _temp, stats=False)
            q, k, v = _heads(qkv, b, n, heads)
        # q, k, v are well-formed views here: genfast.attention's checks can be skipped
        o = _attention_ops.sdpa_attention(q, k, v)
        if o is None and not grad and cpu_kernels:  # the output into a reused buffer, [B, N, H, D] memory
            o = _attention_ops.cpu_self_attention(q, k, v, _temp("o", (b, n, heads, d), x).transpose(1, 2))[0]
        elif o is None:
            o = genfast.attention(q, k, v)
    o = _token_rows(o, b, n, ch)
    if grad:
        return _BlockOut.apply(o, x, gate1, shift2, scale2, gate2, eps, *weights)
    # (the second modulation into the first's buffer, which the qkv GEMM has read: an allocation fewer)
    return _block_out(o, x, gate1, shift2, scale2, gate2, eps, *weights, inference=True, m2_buf=m)[0]


def _cpu_kernels(x, d):
    """genfast's own CPU attention kernels serve this block's heads (not torch's SDPA call, not the
    reference): the fused path may call them directly (genfast.ops.attention.cpu_self_attention)."""
    if x.device.type != "cpu" or x.numel() == 0 or _attention_ops.backend_name("cpu", x.dtype, d) == "sdpa":
        return False
    return _attention_ops.backend_name("cpu", x.dtype, d, kernels=True) == "cpu"


def _heads(t2, b, n, heads):
    """q, k, v [B, H, N, D]: views of a [B*N, 3C] qkv projection (or of its gradient)."""
    return t2.view(b, n, 3, heads, t2.shape[1] // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _token_rows(t, b, n, ch):
    """[B, H, N, D] -> its [B*N, C] token rows (a view where t is [B, N, H, D] in memory, as SDPA's
    outputs and cuDNN's gradients are): one as_strided call instead of a transpose and a reshape
    (host calls) where nothing records it for autograd (as_strided's backward is a scatter)."""
    h, d = t.shape[1], t.shape[3]
    if not t.requires_grad and t.stride() == (n * ch, d, ch, 1) and h * d == ch:
        return t.as_strided((b * n, ch), (ch, 1))
    return t.transpose(1, 2).reshape(b * n, ch)


# Temporaries on the CPU: the backward's (gradients a node makes and drops: da, dm2, dp, do, df, dm)
# and inference's intermediates (m, qkv, p, x1, m2, h, f), one buffer per name and dtype, reused by
# the next block or step once nothing holds it. Fresh buffers of these sizes page-faulted in every
# step (glibc trims the heap between steps): 500-1800 faults a DiT-S step on the Xeon VM, ~1-3 us
# each. GPUs have torch's caching allocator. Freed by free_workspace().
_temps = {}


def free_workspace():
    _temps.clear()
    _saved.clear()


def _temp(name, shape, like):
    """An uninitialised [shape] buffer of like's dtype and device for a temporary."""
    if like.device.type != "cpu":
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return reused_buffer(_temps, (name, like.dtype), shape, like.dtype, like.device)


# The training forward's saved activations on the CPU (m, qkv, p, x1, m2, h, a, f): a pool per name and
# dtype, as many buffers as blocks hold them at once (one each until its backward), up to SAVED_POOL;
# the memory is the forward's peak anyway, kept between steps instead of page-faulted in again.
SAVED_POOL = 64
_saved = {}


def _saved_buf(name, shape, like):
    if like.device.type != "cpu":
        return None
    return pooled_buffer(_saved, (name, like.dtype), shape, like.dtype, like.device, SAVED_POOL)


def _out(buf):
    return {} if buf is None else {"out": buf}


# ----------------------------------------------------------------------------------- GEMMs
def _lin(x2, w, b, out=None):
    """x2 [M, K] W^T + b (F.linear; genfast.ops.linear's CPU GEMMs where it has them: oneDNN for fp32,
    widened to fp32 for 16-bit dtypes on CPUs without 16-bit GEMM instructions); out: None or
    a callable making a contiguous [M, N] buffer for torch's fp32 GEMM (_out_ok)."""
    if x2.numel() and _linear.own_gemm_case(x2, w, b):
        return _linear._forward_2d(x2, w, b)
    buf = out() if out is not None and b is not None and x2.numel() and _out_ok(x2) else None
    return F.linear(x2, w, b) if buf is None else torch.addmm(b, x2, w.t(), out=buf)


def _out_ok(t):
    """Whether torch's GEMM writes t's product into a given buffer (out=) here: fp32 (MKL's sgemm on
    the CPU). bf16 CPU GEMMs with out= ran ~1.4 ms slower per DiT-S forward than F.linear's (which
    reuses oneDNN's cached primitives) in the benchmark run beside torch.compile (Xeon, AMX)."""
    return t.dtype == torch.float32


def _lin_grads(dy2, x2, w, need_x, need_w, need_b, dx_name=None):
    """(dx2, dw, db) of _lin, None where not needed; dx_name: dx2 is a temporary (_temp) of that name."""
    if dy2.numel() and x2.numel() and _linear.own_gemm_case(x2, w, None):
        return _linear._grads(dy2, x2, w, (need_x, need_w, need_b))
    dx = None
    if need_x:
        named = dx_name is not None and _out_ok(dy2)
        dx = torch.mm(dy2, w, out=_temp(dx_name, x2.shape, dy2)) if named else torch.mm(dy2, w)
    # bias gradients: torch's column sums (cuBLAS's dy^T @ ones measured no faster in the block: 8.149 vs
    # 8.153 ms at DiT-XL/2, 1024 tokens, H200)
    return dx, torch.mm(dy2.t(), x2) if need_w else None, torch.sum(dy2, 0) if need_b else None


# ------------------------------------------------------------------------- attention half, in
class _AttnIn(torch.autograd.Function):
    """q, k, v [B, H, N, D] = views of modulate(x, shift, scale) Wqkv^T + b: one node for both. Returned
    as three outputs, so their gradients arrive as three tensors: the GEMMs read them in place (three
    K = C GEMMs accumulating dm), where a [B*N, 3C] dqkv would take a stack and a transpose copy
    (measured 109 + 87 us per block at DiT-XL/2, 256 tokens, H200)."""

    @staticmethod
    def forward(ctx, x, shift, scale, w, bias, eps, heads):
        b, n, _ = x.shape
        m2, mean, rstd, qkv = _modulated_qkv(x, shift, scale, w, bias, eps, _saved_buf)
        ctx.save_for_backward(x, shift, scale, mean, rstd, m2, w, bias)  # (bias: for a double backward)
        ctx.eps, ctx.has_bias, ctx.heads = eps, bias is not None, heads
        return _heads(qkv, b, n, heads)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, shift, scale, mean, rstd, m2, w, bias = ctx.saved_tensors
        if backward_by_reference(dq, dk, dv):  # create_graph or batched grads: see _graph_grads
            return _graph_grads(ctx, _ref_attn_in, (x, shift, scale, w, bias), (dq, dk, dv), _IN_ORDER)
        return _in_grads(ctx.needs_input_grad, (dq, dk, dv), None, x, shift, scale, mean, rstd, m2, w, ctx.eps,
                         ctx.has_bias)


def _modulated_qkv(x, shift, scale, w, bias, eps, buffer, stats=True):
    """(m2 [B*N, C], mean, rstd, qkv [B*N, 3C]): modulate(x, shift, scale) and its qkv projection, in
    buffers from buffer(name, shape, like): _saved_buf when training (the backward reads them), _temp
    for inference (stats=False: no mean / rstd)."""
    b, n, ch = x.shape
    m2, mean, rstd = _modulate_impl(x, shift, scale, eps, False, _rows_buf(buffer("m", (b * n, ch), x), x), stats)
    return m2, mean, rstd, _lin(m2, w, bias, lambda: buffer("qkv", (b * n, w.shape[0]), x))


def _rows_buf(buf, x):
    """buf, or (None from _saved_buf off the CPU) a new [B*N, C] buffer: the modulate kernels write
    the GEMMs' 2-D input directly, without a view of a [B, N, C] output (a host call fewer)."""
    return buf if buf is not None else torch.empty(x.shape[0] * x.shape[1], x.shape[2], dtype=x.dtype, device=x.device)


def _in_grads(need, grads, dqkv, x, shift, scale, mean, rstd, m2, w, eps, has_bias):
    """The gradients of (x, shift, scale, w, bias, eps, heads) from the q, k, v gradients [B, H, N, D]:
    read from one [B*N, 3C] buffer dqkv when it holds them (one GEMM each for dm and dW, one sum
    for db), else as three [B*N, C] row views (three GEMMs accumulating dm, see _AttnIn)."""
    b, n, ch = x.shape
    need_m, need_b = any(need[:3]), need[4] and has_bias
    if dqkv is not None:
        dm, dw, db = _lin_grads(dqkv, m2, w, need_m, need[3], need_b, "dm")
    else:
        # [B, H, N, D] -> [B*N, C] rows: free when the grad is [B, N, H, D] in memory (cuDNN's matches q's)
        rows = [_token_rows(g, b, n, ch) for g in grads]
        dm, dw, db = _qkv_grads(rows, m2, w, need_m, need[3], need_b)
    dx = dshift = dscale = None
    if need_m:  # (dm as the GEMM's [B*N, C] rows: the kernels take them as they are)
        dx, dshift, dscale = _modulate_grads(_modulate_bwd_impl, need[:3], dm, x, shift, scale, mean, rstd, eps,
                                             False)
    return dx, dshift, dscale, dw, db, None, None


class _AttnHalf(torch.autograd.Function):
    """_AttnIn and the attention in one node (CPU training on genfast's CPU kernels, _cpu_kernels):
    o [B, H, N, D] ([B, N, H, D] memory). Its backward has the attention write dq, dk, dv into one
    reused [B*N, 3C] buffer in the qkv layout, so that the projection's gradients are one GEMM, one
    GEMM and one sum (_in_grads): 3 x 3 GEMMs and sums of [B*N, C] took 12.5 vs 12.0 ms at DiT-S
    fp32 (Xeon, 2 threads); also one Python node and the attention op's wrapper fewer."""

    @staticmethod
    def forward(ctx, x, shift, scale, w, bias, eps, heads):
        b, n, ch = x.shape
        m2, mean, rstd, qkv = _modulated_qkv(x, shift, scale, w, bias, eps, _saved_buf)
        q, k, v = _heads(qkv, b, n, heads)
        buf = _saved_buf("o", (b, n, heads, ch // heads), x)
        o, lse, p = _attention_ops.cpu_self_attention(q, k, v, buf.transpose(1, 2) if buf is not None else None,
                                                      keep_p=True)
        ctx.save_for_backward(x, shift, scale, mean, rstd, m2, w, qkv, o, lse, p, bias)
        ctx.eps, ctx.heads = eps, heads
        return o

    @staticmethod
    def backward(ctx, do):
        x, shift, scale, mean, rstd, m2, w, qkv, o, lse, p, bias = ctx.saved_tensors
        if backward_by_reference(do):  # create_graph or batched grads: see _graph_grads
            fn = lambda ctx, *args: reference.attention(*_ref_attn_in(ctx, *args))  # noqa: E731
            return _graph_grads(ctx, fn, (x, shift, scale, w, bias), (do,), _IN_ORDER)
        b, n, _ = x.shape
        dqkv = _temp("dqkv", qkv.shape, qkv)
        given = _heads(dqkv, b, n, ctx.heads)
        got = _attention_ops.cpu_self_attention_backward(do, *_heads(qkv, b, n, ctx.heads), o, lse, p, given)
        one = all(g is t for g, t in zip(got, given))
        return _in_grads(ctx.needs_input_grad, got, dqkv if one else None, x, shift, scale, mean, rstd, m2, w,
                         ctx.eps, True)


def _qkv_grads(grads, m2, w, need_m, need_w, need_b):
    """(dm, dw, db) of m2 Wqkv^T + b from the q, k, v row grads [B*N, C] each."""
    if m2.numel() == 0 or _linear.own_gemm_case(m2, w, None):  # genfast.ops.linear's GEMMs, empty: one dqkv
        return _lin_grads(torch.cat(grads, 1), m2, w, need_m, need_w, need_b)
    ch = m2.shape[1]
    dm = dw = db = None
    if need_m:
        wq, wk, wv = w.view(3, ch, -1).unbind(0)  # (three views in one call: an aten call costs ~12 us on a GPU host)
        dm = torch.mm(grads[0], wq, **_out(_temp("dm", m2.shape, m2) if _out_ok(m2) else None))
        dm = dm.addmm_(grads[1], wk).addmm_(grads[2], wv)
    if need_w:
        dw = torch.empty_like(w)
        for g, out in zip(grads, dw.view(3, ch, -1).unbind(0)):
            torch.mm(g.t(), m2, out=out)
    if need_b and QKV_BIAS_ONE_PASS.get(m2.device.type, False):
        db = _gelu.column_sums(grads)
    elif need_b:
        db = torch.empty(3 * ch, device=m2.device, dtype=m2.dtype)
        for g, out in zip(grads, db.view(3, ch).unbind(0)):
            torch.sum(g, 0, out=out)
    return dm, dw, db


# ------------------------------------------------------------------------------ the rest
def _folds_bias(x, o, wp, gates, biases):
    """Whether proj's, fc1's and fc2's biases go into the passes after their GEMMs (gated residual,
    GELU) instead of the GEMMs: fp32 CPU tensors on torch's BLAS (a BLAS addmm copies the bias into
    its output first, an extra pass over it: 4 % of a DiT-S forward on the Xeon's MKL; oneDNN adds
    it in its epilogue), contiguous, per-sample gates. Same bits: MKL's addmm equals mm + bias."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or not FOLD_BIAS or any(b is None for b in biases):
        return False
    if _linear.own_gemm_case(o, wp, biases[0]) or not _gelu._uses_kernel(x) or not (x.is_contiguous() and o.is_contiguous()):
        return False
    return all(g.dim() == 3 and g.shape[1] == 1 and g.stride(-1) == 1 for g in gates)


def _block_out(o, x, gate1, shift2, scale2, gate2, eps, wp, bp, w1, b1, w2, b2, inference=False, m2_buf=None):
    """(out, saved): the block after attention. o [B*N, C]; saved is what _BlockOut's backward reads.
    The GEMMs' [B*N, C] outputs go to the kernels as they are (no views to [B, N, C]: host calls).
    m2_buf: a [B*N, C] buffer for the second modulation (inference), or None."""
    b, n, ch = x.shape
    fold = _folds_bias(x, o, wp, (gate1, gate2), (bp, b1, b2))
    # inference: p, x1, m2, h and f are dropped by the block's next steps (_temp); training saves them
    # for the backward (_saved_buf)
    temp = (lambda name, shape: (_temp if inference else _saved_buf)(name, shape, x))
    if fold:  # biases in the gated residual / GELU passes (see _folds_bias); p, h, f still get them
        p = torch.mm(o, wp.t(), **_out(temp("p", (b * n, ch))))
        x1 = gated_bias_fp32(x, gate1, p, bp, keep_y=not inference, out=temp("x1", x.shape))
    else:
        p = _lin(o, wp, bp, lambda: temp("p", (b * n, ch)))
        x1 = _gated_impl(x, gate1, p, temp("x1", x.shape))
    m2_buf = _rows_buf(temp("m2", (b * n, ch)) if m2_buf is None else m2_buf, x)
    m2, mean2, rstd2 = _modulate_impl(x1, shift2, scale2, eps, False, m2_buf, stats=not inference)
    if inference and EPILOGUE_GELU and m2.is_cuda and m2.numel():
        h = None
        a = torch._addmm_activation(b1, m2, w1.t(), use_gelu=True)
    elif fold:
        h = torch.mm(m2, w1.t(), **_out(temp("h", (b * n, w1.shape[0]))))
        a = _gelu.fwd_bias_fp32(h, b1, inplace=inference, out=None if inference else temp("a", h.shape))
    else:
        h = _lin(m2, w1, b1, lambda: temp("h", (b * n, w1.shape[0])))
        a = _gelu.gelu_tanh_inference(h) if inference else _gelu._fwd_impl(h)
    if fold:
        f = torch.mm(a, w2.t(), **_out(temp("f", (b * n, ch))))
        out = gated_bias_fp32(x1, gate2, f, b2, keep_y=not inference)
    else:
        f = _lin(a, w2, b2, lambda: temp("f", (b * n, ch)))
        out = _gated_impl(x1, gate2, f)
    return out, (o, p, x1, mean2, rstd2, m2, h, a, f)


class _BlockOut(torch.autograd.Function):
    """x1 = x + gate1 * proj(o); out = x1 + gate2 * mlp(modulate(x1, shift2, scale2)): one node."""

    @staticmethod
    def forward(ctx, o, x, gate1, shift2, scale2, gate2, eps, wp, bp, w1, b1, w2, b2):
        out, saved = _block_out(o, x, gate1, shift2, scale2, gate2, eps, wp, bp, w1, b1, w2, b2)
        # x and the biases only for a double backward (held anyway: the block's input, parameters)
        ctx.save_for_backward(*saved, gate1, shift2, scale2, gate2, wp, w1, w2, x, bp, b1, b2)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, dout):
        o, p, x1, mean2, rstd2, m2, h, a, f, gate1, shift2, scale2, gate2, wp, w1, w2, x, bp, b1, b2 = ctx.saved_tensors
        if backward_by_reference(dout):  # create_graph or batched grads: see _graph_grads
            return _graph_grads(ctx, _ref_block_out, (o, x, gate1, shift2, scale2, gate2, wp, bp, w1, b1, w2, b2),
                                (dout,), _OUT_ORDER)
        need = ctx.needs_input_grad  # o, x, gate1, shift2, scale2, gate2, eps, wp, bp, w1, b1, w2, b2
        dout = dout if dout.is_contiguous() else dout.contiguous()
        fuse = BIAS_IN_GATED.get(dout.device.type, False)
        # (p, f and their gradients are [B*N, C] rows: the kernels and GEMMs take them without views)
        df, dgate2, db2 = gated_bwd(dout, gate2, f, True, need[5], need[12] and fuse, _temp("df", f.shape, f))
        da, dw2, db2_sum = _lin_grads(df, a, w2, True, need[11], need[12] and db2 is None, "da")
        db2 = db2 if db2 is not None else db2_sum
        if need[10] and GELU_BIAS_IN_BWD.get(da.device.type, False):
            dh, db1 = _gelu._bwd_bias_impl(da, h)
            dm2, dw1, _ = _lin_grads(dh, m2, w1, True, need[9], False, "dm2")
        else:
            dh = _gelu._bwd_impl(da, h)
            dm2, dw1, db1 = _lin_grads(dh, m2, w1, True, need[9], need[10], "dm2")
        # x1 feeds the modulation and the output's residual: dx1 = modulate's dx + dout, one pass
        dx1, dshift2, dscale2 = _modulate_grads(_modulate_bwd_impl, (True, need[3], need[4]), dm2,
                                                x1, shift2, scale2, mean2, rstd2, ctx.eps, False,
                                                addend=dout if ADD_IN_MODULATE else None)
        if not ADD_IN_MODULATE:
            dx1 += dout
        need_p = need[0] or need[7] or need[8]
        dp, dgate1, dbp = gated_bwd(dx1, gate1, p, need_p, need[2], need[8] and fuse,
                                    _temp("dp", p.shape, p) if need_p else None)
        do = dwp = None
        if need[0] or need[7] or (need[8] and dbp is None):
            do, dwp, dbp_sum = _lin_grads(dp, o, wp, need[0], need[7], need[8] and dbp is None, "do")
            dbp = dbp if dbp is not None else dbp_sum
        return (do, dx1 if need[1] else None, dgate1, dshift2, dscale2, dgate2, None, dwp, dbp, dw1, db1, dw2, db2)


# ------------------------------------------------------------------- double backward (reference)
def _graph_grads(ctx, fn, inputs, grads, order):
    """A backward called with create_graph=True (a gradient penalty through the block): the node's
    gradients recomputed through its plain-PyTorch reference so that they are differentiable
    (genfast.ops._common.graph_grads). fn(ctx, *inputs) -> the node's outputs; order: the forward
    argument index of each input (eps, heads and the like get None)."""
    need = ctx.needs_input_grad
    got = graph_grads(lambda *args: fn(ctx, *args), inputs, [need[i] for i in order], grads)
    out = [None] * len(need)
    for i, g in zip(order, got):
        out[i] = g
    return tuple(out)


def _ref_attn_in(ctx, x, shift, scale, w, bias):
    """_AttnIn's q, k, v in plain PyTorch."""
    b, n, ch = x.shape
    m = reference.adaln_modulate(x, shift, scale, eps=ctx.eps)
    return _heads(F.linear(m.reshape(b * n, ch), w, bias), b, n, ctx.heads)


def _ref_block_out(ctx, o, x, gate1, shift2, scale2, gate2, wp, bp, w1, b1, w2, b2):
    """_BlockOut's output in plain PyTorch."""
    b, n, ch = x.shape
    x1 = reference.gated_residual(x, gate1, F.linear(o, wp, bp).view(b, n, ch))
    m2 = reference.adaln_modulate(x1, shift2, scale2, eps=ctx.eps)
    f = F.linear(F.gelu(F.linear(m2, w1, b1), approximate="tanh"), w2, b2)
    return reference.gated_residual(x1, gate2, f)


# the forward-argument index of each input the reference functions take
_IN_ORDER = (0, 1, 2, 3, 4)  # x, shift, scale, w, bias (then eps, heads)
_OUT_ORDER = (0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12)  # o, x, gate1, shift2, scale2, gate2, (eps,) wp .. b2
