"""GELU(tanh) backward fused with the bias gradient, as Triton kernels (math: csrc/gelu.h).

    dh = grad * gelu'(h)         [M, K], rounded to the dtype
    dbias = dh.sum(0)            [K]: the column sums of the rounded dh values

In a DiT MLP backward the bias gradient of fc1 would re-read the whole [M, 4C] dh; here one pass
writes dh and sums it. Deterministic and device independent: program (chunk, column block) walks
its chunk of `rows` rows in order and writes fp32 sums to partial[chunk, K]; the chunk-reduction
kernel of kernels/modulate.py adds the chunks in groups of chunk_group, then the groups, in order
(reduce_groups, as csrc/cuda/gelu.cu does, so both give the same dbias bits wherever their dh bits
agree). The grid puts chunks on axis 0 (up to 2^31 - 1) because axis 1 stops at 65535.

The kernel launches with enable_fp_fusion=False: in fp32 the store's "rounding" is a no-op, and a
contracted fma(grad, gelu'(h), acc) would sum unrounded products (the fp32 PTX had 40 fma.rn.f32
with fusion on, none without). The interpreter ignores the option.

gpu_compile (Triton 3.6 and 3.9, sm_80 / sm_90): 32 registers, no spills; 2 KB shared memory in
fp16 / bf16 (a layout conversion before the store). Not yet run or timed on a GPU.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from . import modulate as _modulate  # its chunk reduction (compiled by gpu_compile with modulate's list)
from .modulate import _out_value

BLOCK_K = 512  # columns per program: 2 warps x 8 elements (16-byte bf16 accesses); K = 4608 -> 9 programs
WARPS = 2

_ALPHA = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_BETA = tl.constexpr(0.044715)


@triton.jit
def _gelu_grad(x):
    """gelu'(x) in fp32; tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|) <= 1 never overflows."""
    u = _ALPHA * (x + _BETA * x * x * x)
    e = tl.exp(-2.0 * tl.abs(u))
    a = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0.0, -a, a)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _ALPHA * (1.0 + 3.0 * _BETA * x * x)


@triton.jit
def gelu_bias_bwd_kernel(
    dh_ptr,  # [M, K] contiguous, written (ACT)
    partial_ptr,  # [nchunks, p_stride] fp32 (from this call's first column), written
    g_ptr,  # [M, K] contiguous: the activation's gradient
    h_ptr,  # [M, K] contiguous: the pre-activation (ACT)
    M, K,  # scalar ints
    rows,  # scalar int: rows per chunk (grid: chunks x column blocks)
    p_stride,  # scalar int: partial's row stride (K, or the total width of column_sums' tensors)
    BLOCK: tl.constexpr,  # columns per program
    ACT: tl.constexpr,  # bool: dh = g * gelu'(h) and its sums; False: the column sums of g (column_sums)
    BF16_RTNE: tl.constexpr,  # bool: round to bf16 by hand (interpreter only)
):
    k = tl.program_id(0).to(tl.int64)  # int64 before any pointer arithmetic
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < K
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for m in range(k * rows, tl.minimum(k * rows + rows, M)):
        off = m * K + cols
        g = tl.load(g_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if ACT:
            x = tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
            v = _out_value(g * _gelu_grad(x), dh_ptr, BF16_RTNE)  # dh in the dtype
            tl.store(dh_ptr + off, v, mask=mask)
            acc += v.to(tl.float32)  # rows in order: the sum of what was stored
        else:
            acc += g
    tl.store(partial_ptr + k * p_stride + cols, acc, mask=mask)


# Under TRITON_INTERPRET=1 (read when triton.jit ran) the kernels are InterpretedFunctions.
_INTERPRETED = isinstance(gelu_bias_bwd_kernel, InterpretedFunction)


def gelu_tanh_backward_bias(dh, dbias, partial, grad, h, *, M, K, chunk_rows, chunk_group, dtype=None):
    """Same argument order as the compiled modules' function (tensors instead of pointers): writes dh
    [M, K], dbias [K] and the workspace partial [ngroups * chunk_group + ngroups, K] fp32 (csrc/gelu.h).
    M, K > 0; contiguous tensors of one dtype (checked by the caller)."""
    ngroups = triton.cdiv(triton.cdiv(M, chunk_rows), chunk_group)
    nchunks = ngroups * chunk_group  # the chunks past M write zero sums
    rtne = _INTERPRETED and dh.dtype == torch.bfloat16
    gelu_bias_bwd_kernel[(nchunks, triton.cdiv(K, BLOCK_K))](
        dh, partial, grad, h, M, K, chunk_rows, K, BLOCK=BLOCK_K, ACT=True, BF16_RTNE=rtne, num_warps=WARPS,
        enable_fp_fusion=False)
    _modulate.reduce_groups(dbias, partial, ngroups, chunk_group, K)


def column_sums(srcs, out, partial, *, M, chunk_rows, chunk_group, dtype=None):
    """out [sum of widths] = the column sums of [srcs[0] | srcs[1] | ...] ([M, width_i] contiguous each),
    in the chunks and groups of gelu_tanh_backward_bias (csrc/gelu.h ColumnSumsParams); partial:
    [ngroups * chunk_group + ngroups, sum of widths] fp32. One chunk launch per tensor here."""
    total = sum(s.shape[1] for s in srcs)
    ngroups = triton.cdiv(triton.cdiv(M, chunk_rows), chunk_group)
    nchunks = ngroups * chunk_group
    col = 0
    for s in srcs:
        w = s.shape[1]
        gelu_bias_bwd_kernel[(nchunks, triton.cdiv(w, BLOCK_K))](
            s, partial[:, col:], s, s, M, w, chunk_rows, total, BLOCK=BLOCK_K, ACT=False, BF16_RTNE=False,
            num_warps=WARPS, enable_fp_fusion=False)
        col += w
    _modulate.reduce_groups(out, partial, ngroups, chunk_group, total)


# Ahead-of-time compile list for genfast/devtools/gpu_compile.py (format documented there); the
# chunk reduction is compiled with kernels/modulate.py's list.
def _aot(dtype, act=True):
    ptrs = {"dh_ptr": f"*{dtype}", "partial_ptr": "*fp32", "g_ptr": f"*{dtype}", "h_ptr": f"*{dtype}"}
    return {"name": f"gelu_bias_bwd[{dtype}{'' if act else ',column_sums'}]", "kernel": gelu_bias_bwd_kernel,
            "signature": {**ptrs, "M": "i64", "K": "i64", "rows": "i64", "p_stride": "i64"},
            "constexprs": {"BLOCK": BLOCK_K, "ACT": act, "BF16_RTNE": False},
            "divisible_by_16": list(ptrs) + ["K"], "num_warps": WARPS, "num_stages": 1,
            "options": {"enable_fp_fusion": False}}


AOT_CONFIGS = [_aot(dt) for dt in ("fp32", "fp16", "bf16")] + [_aot("bf16", act=False)]
