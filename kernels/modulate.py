"""adaLN modulate and gated residual (DiT adaLN-Zero) as Triton kernels, forward and backward.

    modulate:        out = norm(x) * (1 + scale) + shift     layer: (x - mean) * rstd, rms: x * rstd
    gated residual:  out = x + gate * y

x / y / out are [B, N, C] with strides (sb, sn, 1); shift / scale / gate are [B, N, C] with
sn = 0 for a per-sample [B, C] tensor. Statistics in fp32, the variance as mean((x - mean)^2);
the forward saves mean and rstd ([B * N] fp32) for the backward. Per-sample gradients are sums
over N: each program of the backward sums a fixed chunk of rows into one fp32 partial row, and
a second kernel adds the chunks in order (deterministic, no atomics), as the C++ and CUDA
kernels do (csrc/modulate.h).

References: Peebles & Xie, "Scalable Diffusion Models with Transformers" (DiT, adaLN-Zero),
arXiv:2212.09748; Ba et al., "Layer Normalization", arXiv:1607.06450.

Configuration: a whole row per program (BLOCK_C = next power of two >= C, at most MAX_C), warps
by row width (4 up to 1024 columns, 8 up to 2048, 16 above: with 8 warps at 4096, ptxas
kept fp16 on sm_80 at 64 registers and spilled). No autotune: the forward is one
read and one write per element, and a first-call stall or host sync inside a DiT block is not
worth the few percent a tuned warp count might give; the GPU benchmarks will say otherwise.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MAX_C = 65536  # widest row one program holds (Triton's block limit leaves room for 2^20 elements)
COL_BLOCK = 128  # columns per program in the column-sum kernels (gated backward, chunk reduction)
GATED_ROWS = 32  # rows per program of the per-token gated backward (any split is exact there)


@triton.jit
def _out_value(y, out_ptr, BF16_RTNE: tl.constexpr):
    """y (fp32) in out's dtype. The interpreter's fp32 -> bf16 cast truncates where the GPU rounds
    to nearest even: BF16_RTNE rounds by hand (interpreter only), so tests see GPU numbers."""
    if BF16_RTNE:
        b = y.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(out_ptr.dtype.element_ty)


@triton.jit
def modulate_fwd_kernel(
    out_ptr,  # [B, N, C] strides (out_sb, out_sn, 1)
    x_ptr,  # [B, N, C] strides (x_sb, x_sn, 1)
    shift_ptr,  # [B, N | 1, C] strides (shift_sb, shift_sn, 1); unused if not HAS_SHIFT
    scale_ptr,  # [B, N | 1, C] strides (scale_sb, scale_sn, 1)
    mean_ptr,  # [B * N] fp32, written (0 for rms); unused if not STATS
    rstd_ptr,  # [B * N] fp32, written; unused if not STATS
    N,  # scalar int: tokens per sample
    C,  # scalar int: channels
    out_sb, out_sn, x_sb, x_sn,  # scalar ints: strides in elements
    shift_sb, shift_sn, scale_sb, scale_sn,  # scalar ints: strides (sn = 0: per sample)
    eps,  # scalar fp32
    HAS_SHIFT: tl.constexpr,  # bool
    RMS: tl.constexpr,  # bool: rms norm (no mean) instead of layer norm
    STATS: tl.constexpr,  # bool: store mean / rstd (False: an inference call, nothing saves them)
    BLOCK_C: tl.constexpr,  # power of two >= C
    BF16_RTNE: tl.constexpr,  # bool: round to bf16 by hand (interpreter only)
):
    r = tl.program_id(0).to(tl.int64)  # int64 before any pointer arithmetic
    b = r // N
    n = r % N
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask = cols < C
    x = tl.load(x_ptr + b * x_sb + n * x_sn + cols, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_C]
    if RMS:
        mean = tl.sum(x * 0.0, axis=0)
        xc = x
    else:
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(xc * xc, axis=0) / C + eps)  # mean((x - mean)^2), never E[x^2] - mean^2
    scale = tl.load(scale_ptr + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale)
    if HAS_SHIFT:
        y += tl.load(shift_ptr + b * shift_sb + n * shift_sn + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * out_sb + n * out_sn + cols, _out_value(y, out_ptr, BF16_RTNE), mask=mask)
    if STATS:
        tl.store(mean_ptr + r, mean)
        tl.store(rstd_ptr + r, rstd)


@triton.jit
def modulate_bwd_kernel(
    dx_ptr,  # [B, N, C] strides (dx_sb, dx_sn, 1); unused if not HAS_DX
    dshift_ptr,  # per token [B, N, C] contiguous; per sample: unused (sums go to partial_ptr)
    dscale_ptr,  # same as dshift_ptr
    partial_ptr,  # per sample: [B, nchunks, 2, C] fp32 (scale sums, shift sums)
    add_ptr,  # HAS_ADD: [B, N, C] strides (dx_sb, dx_sn, 1), added to dx as stored (a separate add's bits)
    g_ptr,  # [B, N, C] strides (g_sb, g_sn, 1): the output's gradient
    x_ptr,  # [B, N, C] strides (x_sb, x_sn, 1)
    scale_ptr,  # [B, N | 1, C] strides (scale_sb, scale_sn, 1)
    mean_ptr,  # [B * N] fp32 from the forward
    rstd_ptr,  # [B * N] fp32 from the forward
    N, C,  # scalar ints
    dx_sb, dx_sn, g_sb, g_sn, x_sb, x_sn, scale_sb, scale_sn,  # scalar ints: strides in elements
    chunk_rows,  # scalar int: rows per program when PER_SAMPLE
    HAS_DX: tl.constexpr, HAS_DSHIFT: tl.constexpr, HAS_DSCALE: tl.constexpr,  # bools: outputs wanted
    HAS_ADD: tl.constexpr,  # bool: dx += add (needs HAS_DX)
    PER_SAMPLE: tl.constexpr,  # bool: grid (nchunks, B) summing rows; else grid (B * N,) one row each
    RMS: tl.constexpr,  # bool
    BLOCK_C: tl.constexpr,  # power of two >= C
    BF16_RTNE: tl.constexpr,  # bool: interpreter only
):
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = g * (1 + scale)
    pid = tl.program_id(0).to(tl.int64)
    if PER_SAMPLE:
        b = tl.program_id(1).to(tl.int64)
        n0 = pid * chunk_rows
        n1 = tl.minimum(n0 + chunk_rows, N)
    else:
        b = pid // N
        n0 = pid % N
        n1 = n0 + 1
    cols = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask = cols < C
    acc_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n in range(n0, n1):
        r = b * N + n
        g = tl.load(g_ptr + b * g_sb + n * g_sn + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * x_sb + n * x_sn + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + b * scale_sb + n * scale_sn + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + r)
        rstd = tl.load(rstd_ptr + r)
        xh = tl.where(mask, (x - mean) * rstd, 0.0)
        dxh = g * (1.0 + scale)
        if HAS_DX:
            mb = tl.sum(dxh * xh, axis=0) / C
            if RMS:
                dx = rstd * (dxh - xh * mb)
            else:
                dx = rstd * (dxh - tl.sum(dxh, axis=0) / C - xh * mb)
            d = _out_value(dx, dx_ptr, BF16_RTNE)
            if HAS_ADD:
                a = tl.load(add_ptr + b * dx_sb + n * dx_sn + cols, mask=mask, other=0.0).to(tl.float32)
                d = _out_value(d.to(tl.float32) + a, dx_ptr, BF16_RTNE)
            tl.store(dx_ptr + b * dx_sb + n * dx_sn + cols, d, mask=mask)
        if PER_SAMPLE:
            acc_scale += g * xh
            acc_shift += g
        else:
            if HAS_DSCALE:
                tl.store(dscale_ptr + r * C + cols, _out_value(g * xh, dscale_ptr, BF16_RTNE), mask=mask)
            if HAS_DSHIFT:
                tl.store(dshift_ptr + r * C + cols, _out_value(g, dshift_ptr, BF16_RTNE), mask=mask)
    if PER_SAMPLE:
        part = partial_ptr + (b * tl.num_programs(0) + pid) * 2 * C
        if HAS_DSCALE:
            tl.store(part + cols, acc_scale, mask=mask)
        if HAS_DSHIFT:
            tl.store(part + C + cols, acc_shift, mask=mask)


@triton.jit
def reduce_partials_kernel(
    out_ptr,  # [B, C] contiguous, the tensors' dtype
    partial_ptr,  # [B, nchunks, ...] fp32: chunk k of sample b at (b * nchunks + k) * stride_k
    nchunks,  # scalar int
    stride_k,  # scalar int: elements between consecutive chunks' rows
    C,  # scalar int
    BLOCK: tl.constexpr,  # columns per program
    BF16_RTNE: tl.constexpr,  # bool: interpreter only
):
    cb = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    cols = cb * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, nchunks):  # in order: the same sum on every run
        acc += tl.load(partial_ptr + (b * nchunks + k) * stride_k + cols, mask=mask, other=0.0)
    tl.store(out_ptr + b * C + cols, _out_value(acc, out_ptr, BF16_RTNE), mask=mask)


@triton.jit
def gated_fwd_kernel(
    out_ptr,  # [B, N, C] strides (out_sb, out_sn, 1); may be x exactly
    x_ptr,  # [B, N, C] strides (x_sb, x_sn, 1)
    gate_ptr,  # [B, N | 1, C] strides (gate_sb, gate_sn, 1)
    y_ptr,  # [B, N, C] strides (y_sb, y_sn, 1)
    N, C,  # scalar ints
    out_sb, out_sn, x_sb, x_sn, gate_sb, gate_sn, y_sb, y_sn,  # scalar ints: strides in elements
    BLOCK_C: tl.constexpr,  # columns per program (grid: rows x column tiles)
    BF16_RTNE: tl.constexpr,  # bool: interpreter only
):
    r = tl.program_id(0).to(tl.int64)
    b = r // N
    n = r % N
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    mask = cols < C
    x = tl.load(x_ptr + b * x_sb + n * x_sn + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_sb + n * gate_sn + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * y_sb + n * y_sn + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * out_sb + n * out_sn + cols, _out_value(x + gate * y, out_ptr, BF16_RTNE), mask=mask)


@triton.jit
def gated_bwd_kernel(
    dy_ptr,  # [B, N, C] contiguous; unused if not HAS_DY
    dgate_ptr,  # per token [B, N, C] contiguous; per sample unused (sums go to partial_ptr)
    partial_ptr,  # per sample: [B, nchunks, C] fp32
    bias_partial_ptr,  # HAS_DBIAS: [B * nchunks (+ B), C] fp32, the chunk's column sums of dy as stored
    g_ptr,  # [B, N, C] strides (g_sb, g_sn, 1)
    gate_ptr,  # [B, N | 1, C] strides (gate_sb, gate_sn, 1)
    y_ptr,  # [B, N, C] strides (y_sb, y_sn, 1)
    N, C,  # scalar ints
    g_sb, g_sn, gate_sb, gate_sn, y_sb, y_sn,  # scalar ints: strides in elements
    rows,  # scalar int: rows per program (grid: column tiles x row chunks x B)
    HAS_DY: tl.constexpr, HAS_DGATE: tl.constexpr, PER_SAMPLE: tl.constexpr,  # bools
    HAS_DBIAS: tl.constexpr,  # bool: needs HAS_DY and PER_SAMPLE
    BLOCK: tl.constexpr,  # columns per program
    BF16_RTNE: tl.constexpr,  # bool: interpreter only
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    k = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    mask = cols < C
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for n in range(k * rows, tl.minimum(k * rows + rows, N)):
        r = b * N + n
        g = tl.load(g_ptr + b * g_sb + n * g_sn + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DY:
            gate = tl.load(gate_ptr + b * gate_sb + n * gate_sn + cols, mask=mask, other=0.0).to(tl.float32)
            d = _out_value(g * gate, dy_ptr, BF16_RTNE)
            tl.store(dy_ptr + r * C + cols, d, mask=mask)
            if HAS_DBIAS:
                bias_acc += d.to(tl.float32)  # the rounded value, as stored
        if HAS_DGATE:
            y = tl.load(y_ptr + b * y_sb + n * y_sn + cols, mask=mask, other=0.0).to(tl.float32)
            if PER_SAMPLE:
                acc += g * y
            else:
                tl.store(dgate_ptr + r * C + cols, _out_value(g * y, dgate_ptr, BF16_RTNE), mask=mask)
    if PER_SAMPLE and HAS_DGATE:
        tl.store(partial_ptr + (b * tl.num_programs(1) + k) * C + cols, acc, mask=mask)
    if HAS_DBIAS:
        tl.store(bias_partial_ptr + (b * tl.num_programs(1) + k) * C + cols, bias_acc, mask=mask)


# Under TRITON_INTERPRET=1 (read when triton.jit ran) the kernels are InterpretedFunctions.
_INTERPRETED = isinstance(modulate_fwd_kernel, InterpretedFunction)


def _warps(block):
    return 4 if block <= 1024 else 8 if block <= 2048 else 16


# The forward's warps per row where measured (H200, bf16, [32, 1024, C], benchmarks/gpu/NOTES.md):
# C = 384 1 warp 66 % of copy bandwidth (4: 42 %); C = 1152 2 warps 64-65 % (8: 42-50 %); C = 3072
# 4 warps 72 % (16: 52 %). Other widths keep _warps.
FWD_WARPS = {512: 1, 2048: 2, 4096: 4}


def _fwd_warps(block):
    return FWD_WARPS.get(block, _warps(block))


def _rtne(t):
    return _INTERPRETED and t.dtype == torch.bfloat16


def _dummy(t, like):
    return t if t is not None else like


# ------------------------------------------------------------------------------------ launchers
# Same argument order as the compiled modules' functions (genfast/ops/modulate.py passes tensors
# here where it passes data pointers there); shapes and strides are checked by the caller.
def modulate_fwd(out, x, shift, scale, mean, rstd, B, N, C, strides, eps, rms, dtype=None):
    if C > MAX_C:
        raise ValueError(f"the Triton modulate kernel holds rows of at most {MAX_C} channels, got C={C}")
    block = triton.next_power_of_2(C)
    modulate_fwd_kernel[(B * N,)](
        out, x, _dummy(shift, scale), scale, _dummy(mean, out), _dummy(rstd, out), N, C, *strides, float(eps),
        HAS_SHIFT=shift is not None, RMS=bool(rms), STATS=mean is not None, BLOCK_C=block, BF16_RTNE=_rtne(out),
        num_warps=_fwd_warps(block))


def _reduce(out, partial, B, nchunks, stride_k, C):
    reduce_partials_kernel[(triton.cdiv(C, COL_BLOCK), B)](
        out, partial, nchunks, stride_k, C, BLOCK=COL_BLOCK, BF16_RTNE=_rtne(out), num_warps=4)


def reduce_groups(out, partial, ngroups, group, width):
    """Every bias gradient's two-level sum: out [width] = partial's first ngroups * group rows added in
    order in groups of `group` (fp32, into the rows after them), then the groups in order (as
    csrc/cuda/common.cuh reduce_groups)."""
    sums = partial[ngroups * group:]
    _reduce(sums, partial, ngroups, group, width, width)
    _reduce(out, sums, 1, ngroups, width, width)


def modulate_bwd(dx, dshift, dscale, partial, grad, x, scale, mean, rstd, B, N, C, strides, chunk_rows,
                 per_sample, rms, dtype=None, addend=None):
    if C > MAX_C:
        raise ValueError(f"the Triton modulate kernel holds rows of at most {MAX_C} channels, got C={C}")
    block = triton.next_power_of_2(C)
    nchunks = triton.cdiv(N, chunk_rows) if per_sample else 0
    grid = (nchunks, B) if per_sample else (B * N,)
    modulate_bwd_kernel[grid](
        _dummy(dx, x), _dummy(dshift, x), _dummy(dscale, x), _dummy(partial, mean), _dummy(addend, x), grad, x, scale,
        mean, rstd, N, C, *strides, chunk_rows,
        HAS_DX=dx is not None, HAS_DSHIFT=dshift is not None, HAS_DSCALE=dscale is not None,
        HAS_ADD=addend is not None,
        PER_SAMPLE=bool(per_sample), RMS=bool(rms), BLOCK_C=block, BF16_RTNE=_rtne(x), num_warps=_warps(block))
    if per_sample and dscale is not None:
        _reduce(dscale, partial, B, nchunks, 2 * C, C)
    if per_sample and dshift is not None:
        _reduce(dshift, partial[:, :, 1], B, nchunks, 2 * C, C)


def gated_residual_fwd(out, x, gate, y, B, N, C, strides, dtype=None):
    block = min(1024, triton.next_power_of_2(C))
    gated_fwd_kernel[(B * N, triton.cdiv(C, block))](
        out, x, gate, y, N, C, *strides, BLOCK_C=block, BF16_RTNE=_rtne(out), num_warps=4)


def gated_residual_bwd(dy, dgate, partial, grad, gate, y, B, N, C, strides, chunk_rows, per_sample,
                       dtype=None, dbias=None, bias_partial=None):
    rows = chunk_rows if per_sample else GATED_ROWS
    nchunks = triton.cdiv(N, rows)
    gated_bwd_kernel[(triton.cdiv(C, COL_BLOCK), nchunks, B)](
        _dummy(dy, grad), _dummy(dgate, grad), _dummy(partial, grad), _dummy(bias_partial, grad), grad, gate, y,
        N, C, *strides, rows,
        HAS_DY=dy is not None, HAS_DGATE=dgate is not None, PER_SAMPLE=bool(per_sample),
        HAS_DBIAS=dbias is not None, BLOCK=COL_BLOCK, BF16_RTNE=_rtne(grad), num_warps=4)
    if per_sample and dgate is not None:
        _reduce(dgate, partial, B, nchunks, C, C)
    if dbias is not None:  # each sample's chunks in order (fp32), then the samples in order
        reduce_groups(dbias, bias_partial, B, nchunks, C)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile list for genfast/devtools/gpu_compile.py (format documented there): the
# DiT width (C = 1152 -> BLOCK_C 2048, 8 warps) and C = 4096 (16 warps) for the row kernels in
# every dtype, per sample (the DiT case) and per token; the column-sum kernels once per dtype.
# Sizes/strides typed i64 (the pessimistic case for registers); pointers and row strides marked
# 16-divisible as aligned launches are.
def _sig(ptrs, ints, floats=()):
    return {**{p: t for p, t in ptrs.items()}, **{i: "i64" for i in ints}, **{f: "fp32" for f in floats}}


def _aot_fwd(dtype, block, has_shift, rms):
    ptrs = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "shift_ptr": f"*{dtype}", "scale_ptr": f"*{dtype}",
            "mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
    ints = ("N", "C", "out_sb", "out_sn", "x_sb", "x_sn", "shift_sb", "shift_sn", "scale_sb", "scale_sn")
    return {"name": f"modulate_fwd[{dtype},C<={block}{',rms' if rms else ''}{'' if has_shift else ',noshift'}]",
            "kernel": modulate_fwd_kernel, "signature": _sig(ptrs, ints, ("eps",)),
            "constexprs": {"HAS_SHIFT": has_shift, "RMS": rms, "STATS": True, "BLOCK_C": block, "BF16_RTNE": False},
            "divisible_by_16": list(ptrs) + ["out_sb", "out_sn", "x_sb", "x_sn", "shift_sb", "scale_sb"],
            "num_warps": _fwd_warps(block), "num_stages": 1}


def _aot_bwd(dtype, block, per_sample):
    ptrs = {"dx_ptr": f"*{dtype}", "dshift_ptr": f"*{dtype}", "dscale_ptr": f"*{dtype}", "partial_ptr": "*fp32",
            "add_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "scale_ptr": f"*{dtype}", "mean_ptr": "*fp32",
            "rstd_ptr": "*fp32"}
    ints = ("N", "C", "dx_sb", "dx_sn", "g_sb", "g_sn", "x_sb", "x_sn", "scale_sb", "scale_sn", "chunk_rows")
    return {"name": f"modulate_bwd[{dtype},C<={block},{'per_sample' if per_sample else 'per_token'}]",
            "kernel": modulate_bwd_kernel, "signature": _sig(ptrs, ints),
            "constexprs": {"HAS_DX": True, "HAS_DSHIFT": True, "HAS_DSCALE": True, "HAS_ADD": per_sample,
                           "PER_SAMPLE": per_sample,
                           "RMS": False, "BLOCK_C": block, "BF16_RTNE": False},
            "divisible_by_16": list(ptrs) + ["dx_sb", "dx_sn", "g_sb", "g_sn", "x_sb", "x_sn", "scale_sb"],
            "num_warps": _warps(block), "num_stages": 1}


def _aot_small(dtype):
    red = {"name": f"reduce_partials[{dtype}]", "kernel": reduce_partials_kernel,
           "signature": _sig({"out_ptr": f"*{dtype}", "partial_ptr": "*fp32"}, ("nchunks", "stride_k", "C")),
           "constexprs": {"BLOCK": COL_BLOCK, "BF16_RTNE": False},
           "divisible_by_16": ["out_ptr", "partial_ptr", "stride_k", "C"], "num_warps": 4, "num_stages": 1}
    gptrs = {"out_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "gate_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
    gints = ("N", "C", "out_sb", "out_sn", "x_sb", "x_sn", "gate_sb", "gate_sn", "y_sb", "y_sn")
    gfwd = {"name": f"gated_fwd[{dtype}]", "kernel": gated_fwd_kernel, "signature": _sig(gptrs, gints),
            "constexprs": {"BLOCK_C": 1024, "BF16_RTNE": False},
            "divisible_by_16": list(gptrs) + ["out_sb", "out_sn", "x_sb", "x_sn", "gate_sb", "y_sb", "y_sn"],
            "num_warps": 4, "num_stages": 1}
    bptrs = {"dy_ptr": f"*{dtype}", "dgate_ptr": f"*{dtype}", "partial_ptr": "*fp32", "bias_partial_ptr": "*fp32",
             "g_ptr": f"*{dtype}",
             "gate_ptr": f"*{dtype}", "y_ptr": f"*{dtype}"}
    bints = ("N", "C", "g_sb", "g_sn", "gate_sb", "gate_sn", "y_sb", "y_sn", "rows")
    gbwd = {"name": f"gated_bwd[{dtype},per_sample]", "kernel": gated_bwd_kernel, "signature": _sig(bptrs, bints),
            "constexprs": {"HAS_DY": True, "HAS_DGATE": True, "PER_SAMPLE": True, "HAS_DBIAS": True,
                           "BLOCK": COL_BLOCK, "BF16_RTNE": False},
            "divisible_by_16": list(bptrs) + ["g_sb", "g_sn", "gate_sb", "y_sb", "y_sn"], "num_warps": 4,
            "num_stages": 1}
    return [red, gfwd, gbwd]


AOT_CONFIGS = (
    [_aot_fwd(dt, block, True, False) for dt in ("fp32", "fp16", "bf16") for block in (2048, 4096)]
    + [_aot_fwd("bf16", 2048, False, True)]
    + [_aot_bwd(dt, block, ps) for dt in ("fp32", "bf16") for block in (2048, 4096) for ps in (True, False)]
    + [cfg for dt in ("fp32", "bf16") for cfg in _aot_small(dt)]
)
