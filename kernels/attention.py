"""Flash attention forward and backward (Triton): self, cross (Nq != Nk), causal, key padding mask.

    out = softmax(q k^T * scale + mask) v       q [B, H, Nq, D], k/v [B, H, Nk, D], any strides

Forward: one program per (query block, batch*head); keys stream through in blocks with the online
softmax (exp2, the scale folded into log2(e) * scale), and the row's log-sum-exp is stored in fp32
(natural log; +inf marks a row with no key, so exp(s - lse) = 0 in the backward). Backward (FA2):
delta = rowsum(dout * out) in torch, then one kernel per key block for dk/dv (queries stream) and one
per query block for dq (keys stream): no atomics, probabilities recomputed from the lse.

Head dims that are not powers of two (head_dim_blocks): the head dim runs as a power-of-two main
chunk (BLOCK_D) plus a remainder chunk (BLOCK_D2 >= 32; columns >= D masked): q k^T is the sum of
two tl.dot into one accumulator, p v / dq / dk / dv keep one accumulator per chunk. D = 72 = 64 + 32
does the dot work of 96 columns, 1.5x that of D = 64 (one 128 block is 2x); its memory traffic is
72/64 of D = 64. Powers of two run one chunk. On Hopper with Triton 3.6 a split head dim read
through rows that are not 16-element aligned is wrong (measured, benchmarks/gpu/NOTES.md): the
launchers copy such q/k/v into aligned rows first (_needs_aligned_rows).

Masks on every tile: rows >= Nq, keys >= Nk, head-dim columns >= D (D is a constexpr, so the
column mask keeps D's divisibility and the loads their vector width), causal (top-left aligned:
query i sees keys 0..i) and key_padding_mask [B, Nk] (True = attend).

Numerics: every load is converted to fp32 at once; tl.dot takes fp16/bf16 operands on the GPU
(fp32 accumulation; P cast to the input dtype before P @ V as FlashAttention does) and fp32 operands
with IEEE precision for fp32 inputs (no TF32). Under TRITON_INTERPRET=1 the dots are fed fp32
(DOT_F32: the interpreter's bf16 math is wrong) and bf16 stores are rounded by hand (BF16_RTNE:
its fp32 -> bf16 cast truncates).

References: Dao et al., "FlashAttention" (arXiv:2205.14135) and "FlashAttention-2"
(arXiv:2307.08691); Triton tutorial 06-fused-attention.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, IN_TY: tl.constexpr, PREC: tl.constexpr):
    # fp32 operands under the interpreter; on the GPU both in the inputs' dtype, fp32 accumulation.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a.to(IN_TY), b.to(IN_TY), input_precision=PREC)


@triton.jit
def _dot_acc(acc, a, b, DOT_F32: tl.constexpr, IN_TY: tl.constexpr, PREC: tl.constexpr):
    # acc + a @ b in one tl.dot (the MMA accumulates in place): chains a split head dim's chunks.
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a.to(IN_TY), b.to(IN_TY), acc, input_precision=PREC)


@triton.jit
def _valid(offs_m, offs_n, nq, nk, m_ptr, msk_n, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """[BLOCK_M, BLOCK_N] bool: the (query, key) pairs that take part."""
    ok = (offs_m[:, None] < nq) & (offs_n[None, :] < nk)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None])
    if HAS_MASK:
        keep = tl.load(m_ptr + offs_n * msk_n, mask=offs_n < nk, other=0)
        ok = ok & (keep != 0)[None, :]
    return ok


# _tile and _put are the only helpers around loads and stores, each one call: under the
# interpreter every call of a jit helper re-patches triton.language (~0.5 ms).
@triton.jit
def _tile(base, rows, row_stride, row_ok, cols, col_stride, D: tl.constexpr, DOT_F32: tl.constexpr):
    """[len(rows), len(cols)] tile of a dot operand; zeros for rows not row_ok and columns >= D
    (D constexpr: the column mask has D's divisibility, so the loads stay vectorised). fp32 at once
    under the interpreter (its bf16 math is wrong); the input dtype on the GPU (half the
    registers; tl.dot accumulates in fp32)."""
    ok = row_ok[:, None] & (cols[None, :] < D)
    x = tl.load(base + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=ok, other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def _put(base, rows, row_stride, row_ok, cols, x, D: tl.constexpr, BF16_RTNE: tl.constexpr):
    ptrs = base + rows[:, None] * row_stride + cols[None, :]
    mask = row_ok[:, None] & (cols[None, :] < D)
    if BF16_RTNE:  # the GPU's fp32 -> bf16 cast rounds to nearest even; the interpreter's truncates
        b = x.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        tl.store(ptrs, (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, H, Nq, D], [B, H, Nk, D], [B, H, Nk, D], any strides
    mask_ptr,  # [B, Nk] uint8 (1 = attend); unused unless HAS_MASK
    out_ptr,  # [B, H, Nq, D] q's dtype, strides (sob, soh, som, 1) ([B, Nq, H, D] memory from genfast.ops)
    lse_ptr,  # [B, H, Nq] fp32 contiguous
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,  # scalar ints: strides in elements
    msk_b, msk_n,  # scalar ints: strides of the mask
    sob, soh, som,  # scalar ints: strides of out
    BH, H, nq, nk,  # scalar ints: batch*heads, heads, query and key lengths
    D: tl.constexpr,  # head dim
    qk_scale,  # scalar fp32: scale * log2(e)
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,  # head-dim chunks (head_dim_blocks); BLOCK_D2 = 0: one chunk
    DOT_F32: tl.constexpr, PREC: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    if pid_bh >= BH:  # the (y, z) split of batch*heads may overshoot
        return
    b, h = pid_bh // H, pid_bh % H
    IN_TY: tl.constexpr = q_ptr.dtype.element_ty
    SPLIT: tl.constexpr = BLOCK_D2 > 0
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # [BLOCK_M] int64
    m_ok = offs_m < nq
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * sqb + h * sqh
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_base = mask_ptr + b * msk_b
    q = _tile(q_base, offs_m, sqm, m_ok, offs_d, sqd, D, DOT_F32)  # [BLOCK_M, BLOCK_D]
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SPLIT:  # the head dim's remainder columns: their own operand tiles and accumulator
        offs_e = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = _tile(q_base, offs_m, sqm, m_ok, offs_e, sqd, D, DOT_F32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    hi = nk
    if CAUSAL:
        hi = tl.minimum(nk, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < nk
        k = _tile(k_base, offs_n, skn, n_ok, offs_d, skd, D, DOT_F32)
        s = _dot(q, tl.trans(k), DOT_F32, IN_TY, PREC)
        if SPLIT:  # q k^T = q[:, main] k[:, main]^T + q[:, rest] k[:, rest]^T
            k2 = _tile(k_base, offs_n, skn, n_ok, offs_e, skd, D, DOT_F32)
            s = _dot_acc(s, q2, tl.trans(k2), DOT_F32, IN_TY, PREC)
        s = s * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        s = tl.where(_valid(offs_m, offs_n, nq, nk, m_base, msk_n, CAUSAL, HAS_MASK), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: no NaN
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _tile(v_base, offs_n, svn, n_ok, offs_d, svd, D, DOT_F32)
        acc = _dot_acc(acc * alpha[:, None], p, v, DOT_F32, IN_TY, PREC)
        if SPLIT:
            v2 = _tile(v_base, offs_n, svn, n_ok, offs_e, svd, D, DOT_F32)
            acc2 = _dot_acc(acc2 * alpha[:, None], p, v2, DOT_F32, IN_TY, PREC)
        m_i = m_new

    empty = l_i == 0.0  # every key masked: zeros out, lse = +inf
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = out_ptr + b * sob + h * soh
    _put(o_base, offs_m, som, m_ok, offs_d, acc / l_safe[:, None], D, BF16_RTNE)
    if SPLIT:
        _put(o_base, offs_m, som, m_ok, offs_e, acc2 / l_safe[:, None], D, BF16_RTNE)
    tl.store(lse_ptr + pid_bh * nq + offs_m, lse, mask=m_ok)


@triton.jit
def attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # [B, H, Nq|Nk|Nk|Nq, D]; do contiguous
    mask_ptr,  # [B, Nk] uint8; unused unless HAS_MASK
    lse_ptr, delta_ptr,  # [B, H, Nq] fp32 contiguous: log-sum-exp (natural log), rowsum(do * out)
    dk_ptr, dv_ptr,  # [B, H, Nk, D] contiguous, q's dtype
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,  # scalar ints: strides
    msk_b, msk_n,  # scalar ints
    BH, H, nq, nk,  # scalar ints
    D: tl.constexpr,
    qk_scale, scale,  # scalar fp32: scale * log2(e), scale
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    if pid_bh >= BH:  # the (y, z) split of batch*heads may overshoot
        return
    b, h = pid_bh // H, pid_bh % H
    IN_TY: tl.constexpr = q_ptr.dtype.element_ty
    SPLIT: tl.constexpr = BLOCK_D2 > 0
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < nk
    offs_d = tl.arange(0, BLOCK_D)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    k = _tile(k_base, offs_n, skn, n_ok, offs_d, skd, D, DOT_F32)
    v = _tile(v_base, offs_n, svn, n_ok, offs_d, svd, D, DOT_F32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if SPLIT:
        offs_e = BLOCK_D + tl.arange(0, BLOCK_D2)
        k2 = _tile(k_base, offs_n, skn, n_ok, offs_e, skd, D, DOT_F32)
        v2 = _tile(v_base, offs_n, svn, n_ok, offs_e, svd, D, DOT_F32)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
        dv2 = tl.zeros([BLOCK_N, BLOCK_D2], tl.float32)
    q_base = q_ptr + b * sqb + h * sqh
    row0 = pid_bh * nq
    do_base = do_ptr + row0 * D
    m_base = mask_ptr + b * msk_b
    lo = 0
    if CAUSAL:  # queries before this key block never see it
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, nq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = offs_m < nq
        q = _tile(q_base, offs_m, sqm, m_ok, offs_d, sqd, D, DOT_F32)
        do = _tile(do_base, offs_m, D, m_ok, offs_d, 1, D, DOT_F32)
        lse2 = tl.load(lse_ptr + row0 + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + row0 + offs_m, mask=m_ok, other=0.0)
        s = _dot(q, tl.trans(k), DOT_F32, IN_TY, PREC)  # [BLOCK_M, BLOCK_N]
        dp = _dot(do, tl.trans(v), DOT_F32, IN_TY, PREC)
        if SPLIT:
            q2 = _tile(q_base, offs_m, sqm, m_ok, offs_e, sqd, D, DOT_F32)
            do2 = _tile(do_base, offs_m, D, m_ok, offs_e, 1, D, DOT_F32)
            s = _dot_acc(s, q2, tl.trans(k2), DOT_F32, IN_TY, PREC)
            dp = _dot_acc(dp, do2, tl.trans(v2), DOT_F32, IN_TY, PREC)
        ok = _valid(offs_m, offs_n, nq, nk, m_base, msk_n, CAUSAL, HAS_MASK)
        p = tl.where(ok, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)  # lse = +inf (no key) -> 0
        ds = p * (dp - delta[:, None])
        dv = _dot_acc(dv, tl.trans(p), do, DOT_F32, IN_TY, PREC)
        dk = _dot_acc(dk, tl.trans(ds), q, DOT_F32, IN_TY, PREC)
        if SPLIT:
            dv2 = _dot_acc(dv2, tl.trans(p), do2, DOT_F32, IN_TY, PREC)
            dk2 = _dot_acc(dk2, tl.trans(ds), q2, DOT_F32, IN_TY, PREC)
    out_base = pid_bh * nk * D
    _put(dk_ptr + out_base, offs_n, D, n_ok, offs_d, dk * scale, D, BF16_RTNE)
    _put(dv_ptr + out_base, offs_n, D, n_ok, offs_d, dv, D, BF16_RTNE)
    if SPLIT:
        _put(dk_ptr + out_base, offs_n, D, n_ok, offs_e, dk2 * scale, D, BF16_RTNE)
        _put(dv_ptr + out_base, offs_n, D, n_ok, offs_e, dv2, D, BF16_RTNE)


@triton.jit
def attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # as attn_bwd_dkdv_kernel
    mask_ptr,  # [B, Nk] uint8; unused unless HAS_MASK
    lse_ptr, delta_ptr,  # [B, H, Nq] fp32 contiguous
    dq_ptr,  # [B, H, Nq, D] contiguous, q's dtype
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,  # scalar ints: strides
    msk_b, msk_n,  # scalar ints
    BH, H, nq, nk,  # scalar ints
    D: tl.constexpr,
    qk_scale, scale,  # scalar fp32
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    if pid_bh >= BH:  # the (y, z) split of batch*heads may overshoot
        return
    b, h = pid_bh // H, pid_bh % H
    IN_TY: tl.constexpr = q_ptr.dtype.element_ty
    SPLIT: tl.constexpr = BLOCK_D2 > 0
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    m_ok = offs_m < nq
    offs_d = tl.arange(0, BLOCK_D)
    row = pid_bh * nq + offs_m
    q_base = q_ptr + b * sqb + h * sqh
    do_base = do_ptr + pid_bh * nq * D
    q = _tile(q_base, offs_m, sqm, m_ok, offs_d, sqd, D, DOT_F32)
    do = _tile(do_base, offs_m, D, m_ok, offs_d, 1, D, DOT_F32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if SPLIT:
        offs_e = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = _tile(q_base, offs_m, sqm, m_ok, offs_e, sqd, D, DOT_F32)
        do2 = _tile(do_base, offs_m, D, m_ok, offs_e, 1, D, DOT_F32)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)
    lse2 = tl.load(lse_ptr + row, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + row, mask=m_ok, other=0.0)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    m_base = mask_ptr + b * msk_b
    hi = nk
    if CAUSAL:
        hi = tl.minimum(nk, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < nk
        k = _tile(k_base, offs_n, skn, n_ok, offs_d, skd, D, DOT_F32)
        v = _tile(v_base, offs_n, svn, n_ok, offs_d, svd, D, DOT_F32)
        s = _dot(q, tl.trans(k), DOT_F32, IN_TY, PREC)
        dp = _dot(do, tl.trans(v), DOT_F32, IN_TY, PREC)
        if SPLIT:
            k2 = _tile(k_base, offs_n, skn, n_ok, offs_e, skd, D, DOT_F32)
            v2 = _tile(v_base, offs_n, svn, n_ok, offs_e, svd, D, DOT_F32)
            s = _dot_acc(s, q2, tl.trans(k2), DOT_F32, IN_TY, PREC)
            dp = _dot_acc(dp, do2, tl.trans(v2), DOT_F32, IN_TY, PREC)
        ok = _valid(offs_m, offs_n, nq, nk, m_base, msk_n, CAUSAL, HAS_MASK)
        p = tl.where(ok, tl.math.exp2(s * qk_scale - lse2[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq = _dot_acc(dq, ds, k, DOT_F32, IN_TY, PREC)
        if SPLIT:
            dq2 = _dot_acc(dq2, ds, k2, DOT_F32, IN_TY, PREC)
    _put(dq_ptr + pid_bh * nq * D, offs_m, D, m_ok, offs_d, dq * scale, D, BF16_RTNE)
    if SPLIT:
        _put(dq_ptr + pid_bh * nq * D, offs_m, D, m_ok, offs_e, dq2 * scale, D, BF16_RTNE)


# Under TRITON_INTERPRET=1 (read when triton.jit ran) the kernels are InterpretedFunctions.
_INTERPRETED = isinstance(attn_fwd_kernel, InterpretedFunction)


# ------------------------------------------------------------------------------------ launchers
# CUDA limits grid dims y and z to 65535: batch*heads is spread over (y, z).
MAX_GRID_YZ = 65535
# Under the interpreter one config (it is slow: 32-blocks keep a 257-token test under a second).
INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}
# GPU: a small autotune space per kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages), pruned by
# dtype and head-dim block so the surviving tiles fit the register file (fp32 runs IEEE FMA dots:
# small tiles). Tuned once per (nq, nk, D) in a process (triton.autotune caches by key). The first
# survivor is the default that genfast/devtools/gpu_compile.py checks for spills (AOT_CONFIGS).
# From the H200 sweep (benchmarks/gpu/NOTES.md, 2026-11-26): the fastest tiles at D = 64 and 128;
# backward tiles with BLOCK_M = 32 and BLOCK_N >= 64 gave wrong gradients at 4096 tokens (dropped);
# (128, 64, 8, 3) backward needs more shared memory than Hopper has at D = 128 (dropped).
FWD_CONFIGS = [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 32, 4, 4), (32, 32, 4, 2)]
BWD_CONFIGS = [(64, 32, 4, 2), (64, 32, 8, 2), (128, 64, 8, 2), (64, 64, 4, 3), (32, 32, 4, 2)]


def _fits(block_m, block_n, warps, width, fp32):
    """width: the head-dim columns the tiles hold (BLOCK_D + BLOCK_D2)."""
    if fp32:  # IEEE fp32 dots run on FMA units with fp32 operand tiles: the smallest tiles only
        return block_m * block_n <= 32 * 32
    if width > 64 and warps < 8 and block_m * block_n > 32 * 32:
        return False  # rows wider than 64 (80, 96, 128) need 8 warps' registers (ptxas: spills at 4)
    return width < 256 or block_m * block_n <= 64 * 64


def _survivors(configs, width, fp32):
    keep = [c for c in configs if _fits(c[0], c[1], c[2], width, fp32)]
    return keep or configs[-1:]


def _prune(configs, named_args, **kwargs):
    def get(name, default):
        return kwargs.get(name, named_args.get(name, default))

    width = get("BLOCK_D", 64) + get("BLOCK_D2", 0)
    q = named_args.get("q_ptr")
    fp32 = getattr(q, "dtype", None) == torch.float32
    keep = [c for c in configs if _fits(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, width, fp32)]
    return keep or configs[-1:]


def _tuned(kernel, configs):
    return triton.autotune(
        [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in configs],
        key=["nq", "nk", "D"], prune_configs_by={"early_config_prune": _prune})(kernel)


# What the launchers run: the plain kernels under the interpreter, else their autotuners (kept
# in a dict: tools that scan this module for jit functions see the kernels themselves).
if _INTERPRETED:
    _RUN = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}
else:
    _RUN = {"fwd": _tuned(attn_fwd_kernel, FWD_CONFIGS), "dkdv": _tuned(attn_bwd_dkdv_kernel, BWD_CONFIGS),
            "dq": _tuned(attn_bwd_dq_kernel, BWD_CONFIGS)}


# The remainder chunk's least width: 32 is what was measured right on Hopper (module docstring).
MIN_REST = 32


def head_dim_blocks(d):
    """(BLOCK_D, BLOCK_D2): how head dim d is tiled. tl.arange needs powers of two and tl.dot
    every dim >= 16, so a d that is not a power of two is split into its largest power of two
    below d (BLOCK_D) and the remainder rounded up to a power of two >= MIN_REST (BLOCK_D2, its
    columns >= d masked), when that pair is narrower than the next power of two; else one chunk
    (BLOCK_D2 = 0) of the next power of two. 72, 80, 96 -> 64 + 32 (96 columns of dot work, 1.5x
    that of d = 64, where one 128 block is 2x); 40/48 -> 64 and 100 -> 128 (a 32 + 32 or 64 + 64
    pair would be no narrower). Above 128 one 256 block: 160 = 128 + 32 compiled with other spills
    (sm_90 fwd/dq) and is not measured."""
    full = max(16, triton.next_power_of_2(d))
    main = full // 2
    rest = max(MIN_REST, triton.next_power_of_2(max(1, d - main)))
    return (main, rest) if d != full and rest < main and full <= 128 else (full, 0)


def _grid(nblocks, bh):
    y = min(bh, MAX_GRID_YZ)
    return (nblocks, y, triton.cdiv(bh, y))


def _common(q, k, v, mask, causal, scale):
    b, h, nq, d = q.shape
    strides = (*q.stride(), *k.stride(), *v.stride())
    m = mask.view(torch.uint8) if mask is not None else q  # dummy pointer when there is no mask
    mstr = mask.stride() if mask is not None else (0, 0)
    block_d, block_d2 = head_dim_blocks(d)
    consts = dict(CAUSAL=bool(causal), HAS_MASK=mask is not None, BLOCK_D=block_d, BLOCK_D2=block_d2,
                  DOT_F32=_INTERPRETED, PREC="ieee" if q.dtype == torch.float32 else "tf32",
                  BF16_RTNE=_INTERPRETED and q.dtype == torch.bfloat16)
    if _INTERPRETED:
        consts.update(INTERPRET_CONFIG)
    return m, strides, mstr, (q.shape[0] * h, h, nq, k.shape[2], d), consts


def _launch(kind, grid, config, *args, **consts):
    """The autotuned kernel, or with config = (BLOCK_M, BLOCK_N, num_warps, num_stages) that one
    config alone (tests run every config: the autotuner would hide one that is wrong)."""
    if config is None:
        return _RUN[kind][grid](*args, **consts)
    kernel = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}[kind]
    meta = {"BLOCK_M": config[0], "BLOCK_N": config[1]}
    extra = {} if _INTERPRETED else {"num_warps": config[2], "num_stages": config[3]}
    return kernel[grid(meta)](*args, **{**consts, **meta}, **extra)


def _misaligned_split(t):
    """fp16/bf16 t [B, H, N, D] whose head dim is split (BLOCK_D2 > 0) and whose rows do not all start
    16-element aligned (a batch, head or row stride not a multiple of 16, or a misaligned base)."""
    return (t.dtype in (torch.float16, torch.bfloat16) and head_dim_blocks(t.shape[-1])[1] > 0
            and (any(s % 16 for s in t.stride()[:3]) or t.data_ptr() % 16 != 0))


def _needs_aligned_rows(t):
    """Measured wrong on Hopper with Triton 3.6 (H200, 2026-11-26, benchmarks/gpu/NOTES.md): split head
    dims read through misaligned rows (D = 72 rows 72 apart, D = 80 rows 88 apart: wrong or crashing
    under most configs), while the same head dims with aligned rows, and D = 64 with misaligned rows,
    were right under every config."""
    return t.is_cuda and _misaligned_split(t)


def _aligned_rows(t):
    """t [B, H, N, D] as a view of a copy whose rows start 16-element aligned ([B, N, H, D16] memory,
    D16 = D rounded up to 16): the layout measured right (see _needs_aligned_rows)."""
    b, h, n, d = t.shape
    buf = t.new_empty((b, n, h, -(-d // 16) * 16))[..., :d].transpose(1, 2)
    return buf.copy_(t)


def _rows_aligned(*ts):
    return [_aligned_rows(t) if _needs_aligned_rows(t) else t for t in ts]


def attention_forward(q, k, v, mask, causal, scale, out=None, config=None):
    """(out [B, H, Nq, D] in q's dtype, lse [B, H, Nq] fp32). out: where to write (unit last
    stride), default contiguous. Checked by genfast.ops."""
    b, h, nq, d = q.shape
    q, k, v = _rows_aligned(q, k, v)
    out = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    m, strides, mstr, sizes, consts = _common(q, k, v, mask, causal, scale)
    grid = lambda meta: _grid(triton.cdiv(nq, meta["BLOCK_M"]), b * h)  # noqa: E731
    _launch("fwd", grid, config, q, k, v, m, out, lse, *strides, *mstr, *out.stride()[:3], *sizes,
            float(scale) * LOG2E, **consts)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, mask, causal, scale, config=None):
    """(dq, dk, dv) contiguous in q's dtype, from the forward's out and lse."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    q, k, v = _rows_aligned(q, k, v)
    do = dout.contiguous()  # misaligned (D = 72) do, dq, dk, dv measured right: no copy
    delta = (do.float() * out.float()).sum(-1)  # [B, H, Nq] fp32, contiguous
    lse = lse.contiguous()
    dq = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, h, nk, d), dtype=q.dtype, device=q.device)
    dv = torch.empty((b, h, nk, d), dtype=q.dtype, device=q.device)
    m, strides, mstr, sizes, consts = _common(q, k, v, mask, causal, scale)
    scalars = (float(scale) * LOG2E, float(scale))
    _launch("dkdv", lambda meta: _grid(triton.cdiv(nk, meta["BLOCK_N"]), b * h), config,
            q, k, v, do, m, lse, delta, dk, dv, *strides, *mstr, *sizes, *scalars, **consts)
    _launch("dq", lambda meta: _grid(triton.cdiv(nq, meta["BLOCK_M"]), b * h), config,
            q, k, v, do, m, lse, delta, dq, *strides, *mstr, *sizes, *scalars, **consts)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile list for genfast/devtools/gpu_compile.py, built in kernels/attention_aot.py
# (kept beside the kernels it names: the tool reads each module's AOT_CONFIGS).
from .attention_aot import aot_configs  # noqa: E402 (reads the kernels and configs above)

AOT_CONFIGS = aot_configs()
