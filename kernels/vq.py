"""Nearest-codebook lookup (fused distance + argmin) and per-code counts (Triton).

For every row z_n of z [n, d] the index of the best code of codebook [k, d] (csrc/vq.h):
    l2:      score(n, k) = |c_k|^2 - 2 z_n . c_k
    cosine:  score(n, k) = -(z_n . c_k) / max(|c_k|, eps)
One program owns BLOCK_N rows and walks the codebook in BLOCK_K tiles: a [BLOCK_N, BLOCK_K] tile
of dot products (tl.dot over BLOCK_D chunks, fp32 accumulation) and the codes' squared norms,
then a running min / argmin per row in registers. The n x k matrix never exists (O(n) memory).
Ties go to the lowest index (tl.argmin's leftmost + a strict < across tiles); NaN scores are
replaced by +inf, so they never win and an all-NaN row keeps index 0.

Precision: DOT_PRECISION "ieee" (default) is true fp32 products; "tf32x3" (3 tensor-core TF32
products, ~fp32 accurate: the op's precision="tf32x3") and "tf32" (not exposed) are GPU options.

References: van den Oord et al., "Neural Discrete Representation Learning", arXiv:1711.00937.

Configurations, by the vector length d (GPU: timed on an H200 under Triton 3.6, fp32, N = 65,536,
K = 8,192, benchmarks/gpu/vq_sweep.py, session 17; AOT_CONFIGS lists what CI compiles):
  d <= 16:     BLOCK_N 128, BLOCK_K 128, BLOCK_D 16, 8 warps   1.62 ms at d = 8  (was 5.72 with the
                                                               earlier single 64 x 64 x 32, 8-warp one)
  d <= 32:     BLOCK_N 128, BLOCK_K 64,  BLOCK_D 32, 4 warps   2.21 ms at d = 32 (was 5.47)
  larger d:    BLOCK_N 128, BLOCK_K 128, BLOCK_D 32, 8 warps   13.9 ms at d = 256 (was 38.6; BLOCK_D 64: 13.0
                                                               but 564 B of spills on sm_90)
  Bigger row tiles amortise each codebook tile over more rows; BLOCK_D no wider than d wastes no
  masked columns. One stage: three were no faster at d = 256. fp32 "ieee" tl.dot is FMA-lowered;
  "tf32x3" (0.94 / 1.06 ms, and 4.85 at d = 256 with BLOCK_D 64; no index differing from an fp64
  argmin on the 1,024 rows checked) and
  "tf32" (faster, some near ties flipped) were measured; the op layer exposes "tf32x3"
  (genfast.vq_nearest(..., precision="tf32x3")), not "tf32".
  interpreter: BLOCK_N 32, BLOCK_K 32, BLOCK_D <= 32 (the multiply + sum form holds a 3-D tile)
"""
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

NORM_EPS = tl.constexpr(1e-12)  # a plain global cannot be read inside @jit on the GPU
MAX_GRID = 2**31 - 1


@triton.jit
def vq_nearest_kernel(
    z_ptr,  # [n, d]: row r at (r // inner) * z_os + (r % inner) * z_rs, column j at + j * z_cs
    c_ptr,  # [k, d] strides (c_rs, c_cs)
    idx_ptr,  # [n] int64, written
    dist_ptr,  # [n] fp32, written if RETURN_DIST (else unused)
    n, k, d,  # scalar ints: rows of z, codes, vector length
    inner, z_os, z_rs, z_cs,  # scalar ints: z's two-level row layout and column stride (elements)
    c_rs, c_cs,  # scalar ints: codebook strides
    COSINE: tl.constexpr,  # bool: cosine metric (else squared l2)
    RETURN_DIST: tl.constexpr,  # bool: also write the chosen code's direct distance
    BLOCK_N: tl.constexpr,  # rows a program owns
    BLOCK_K: tl.constexpr,  # codes per tile
    BLOCK_D: tl.constexpr,  # vector elements per dot step
    DOT_PRECISION: tl.constexpr,  # "ieee" | "tf32x3" | "tf32"
    USE_DOT: tl.constexpr,  # bool: tl.dot (GPU); False: multiply + sum, bit-reproducible per element
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # [BLOCK_N]
    row_ok = rows < n
    z_off = (rows // inner) * z_os + (rows % inner) * z_rs  # [BLOCK_N] int64
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int64)
    for k0 in range(0, k, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K).to(tl.int64)  # [BLOCK_K]
        code_ok = codes < k
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        c_sq = tl.zeros([BLOCK_K], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)  # [BLOCK_D]
            col_ok = cols < d
            zt = tl.load(z_ptr + z_off[:, None] + cols[None, :] * z_cs,
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
            ct = tl.load(c_ptr + codes[:, None] * c_rs + cols[None, :] * c_cs,
                         mask=code_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_K, BLOCK_D]
            if USE_DOT:
                acc = tl.dot(zt, tl.trans(ct), acc, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_K]
            else:
                acc += tl.sum(zt[:, None, :] * ct[None, :, :], axis=2)  # [BLOCK_N, BLOCK_K]
            c_sq += tl.sum(ct * ct, axis=1)
        if COSINE:
            score = -acc / tl.maximum(tl.sqrt(c_sq), NORM_EPS)[None, :]
        else:
            score = c_sq[None, :] - 2.0 * acc
        score = tl.where(code_ok[None, :] & (score == score), score, float("inf"))
        tile_min = tl.min(score, axis=1)  # [BLOCK_N]
        tile_arg = tl.argmin(score, axis=1, tie_break_left=True).to(tl.int64)  # [BLOCK_N]
        better = tile_min < best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, k0 + tile_arg, best_idx)
    tl.store(idx_ptr + rows, best_idx, mask=row_ok)
    if RETURN_DIST:
        # The chosen code's distance, directly (no cancellation): two passes for cosine (norms first).
        zz = tl.zeros([BLOCK_N], tl.float32)
        cc = tl.zeros([BLOCK_N], tl.float32)
        sq = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            m = row_ok[:, None] & (cols < d)[None, :]
            zt = tl.load(z_ptr + z_off[:, None] + cols[None, :] * z_cs, mask=m, other=0.0).to(tl.float32)
            ct = tl.load(c_ptr + best_idx[:, None] * c_rs + cols[None, :] * c_cs, mask=m, other=0.0).to(tl.float32)
            zz += tl.sum(zt * zt, axis=1)
            cc += tl.sum(ct * ct, axis=1)
            sq += tl.sum((zt - ct) * (zt - ct), axis=1)
        if COSINE:
            iz = 1.0 / tl.maximum(tl.sqrt(zz), NORM_EPS)
            ic = 1.0 / tl.maximum(tl.sqrt(cc), NORM_EPS)
            sq = tl.zeros([BLOCK_N], tl.float32)
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
                m = row_ok[:, None] & (cols < d)[None, :]
                zt = tl.load(z_ptr + z_off[:, None] + cols[None, :] * z_cs, mask=m, other=0.0).to(tl.float32)
                ct = tl.load(c_ptr + best_idx[:, None] * c_rs + cols[None, :] * c_cs, mask=m, other=0.0).to(tl.float32)
                diff = zt * iz[:, None] - ct * ic[:, None]
                sq += tl.sum(diff * diff, axis=1)
        tl.store(dist_ptr + rows, sq, mask=row_ok)


@triton.jit
def vq_counts_kernel(
    idx_ptr,  # [n] int64, stride idx_stride
    counts_ptr,  # [k] int64, zeroed by the launcher
    n, idx_stride, k,  # scalar ints
    BLOCK: tl.constexpr,  # indices a program reads
):
    pid = tl.program_id(0).to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)  # [BLOCK]
    v = tl.load(idx_ptr + i * idx_stride, mask=i < n, other=-1)
    ok = (i < n) & (v >= 0) & (v < k)  # out of range: not counted (documented in genfast.ops.vq)
    tl.atomic_add(counts_ptr + tl.where(ok, v, 0), tl.full([BLOCK], 1, tl.int64), mask=ok)


_INTERPRETED = isinstance(vq_nearest_kernel, InterpretedFunction)

# (largest d, (BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages)) on GPUs, by d (docstring); None: any d
GPU_CONFIGS = ((16, (128, 128, 16, 8, 1)), (32, (128, 64, 32, 4, 1)), (None, (128, 128, 32, 8, 1)))
INTERPRETER_CONFIG = (32, 32, 32, 4, 1)  # BLOCK_D here is a cap: the next power of two >= d, 16 at least


def config_for(d):
    """(BLOCK_N, BLOCK_K, BLOCK_D, num_warps, num_stages) for vectors of length d."""
    if _INTERPRETED:
        bn, bk, cap, warps, stages = INTERPRETER_CONFIG
        return bn, bk, max(16, min(cap, triton.next_power_of_2(d))), warps, stages
    return next(cfg for top, cfg in GPU_CONFIGS if top is None or d <= top)


def vq_nearest(z, codebook, indices, distance, metric, layout, *, precision="ieee", use_dot=None):
    """Writes indices [n] (and distance [n] when given). z: [..., d] any strides, with its
    layout (inner, os, rs, cs) from genfast.ops.vq.z_layout; checks are the caller's.

    use_dot (default: not under the interpreter): the interpreter runs tl.dot through numpy's
    BLAS, whose blocked kernels can round identical columns differently, which would break exact
    ties (lowest index); there the same products go through multiply + sum instead. A test runs
    the tl.dot formulation under the interpreter too, against the rounding-bound rule."""
    d, k = codebook.shape[1], codebook.shape[0]
    n = indices.numel()
    if n == 0:
        return
    inner, z_os, z_rs, z_cs = layout
    bn, bk, bd, warps, stages = config_for(d)
    grid = (triton.cdiv(n, bn),)
    vq_nearest_kernel[grid](
        z, codebook, indices, distance if distance is not None else indices,
        n, k, d, inner, z_os, z_rs, z_cs, codebook.stride(0), codebook.stride(1),
        COSINE=metric == 1, RETURN_DIST=distance is not None,
        BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, DOT_PRECISION=precision,
        USE_DOT=(not _INTERPRETED) if use_dot is None else use_dot,
        num_warps=warps, num_stages=stages,
    )


def vq_counts(indices, counts):
    """counts[c] = number of c in indices (1-D int64, any stride); out of range ignored."""
    counts.zero_()
    n = indices.numel()
    if n == 0:
        return
    block = 1024
    vq_counts_kernel[(triton.cdiv(n, block),)](indices, counts, n, indices.stride(0) if n > 1 else 1,
                                               counts.numel(), BLOCK=block, num_warps=4)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile list for genfast/devtools/gpu_compile.py (the format kernels/flow_step.py
# documents): each GPU config (GPU_CONFIGS) for fp32 z against an fp32 codebook (l2), and at the d <= 32
# one (4 warps: the fewest registers a thread) bf16 / fp16 z, cosine and the distance pass. Sizes i64.
_INTS = ("n", "k", "d", "inner", "z_os", "z_rs", "z_cs", "c_rs", "c_cs")


def _aot(zdt, cdt, cosine, dist, cfg, precision="ieee"):
    bn, bk, block_d, warps, stages = cfg
    sig = {"z_ptr": f"*{zdt}", "c_ptr": f"*{cdt}", "idx_ptr": "*i64", "dist_ptr": "*fp32"}
    sig.update({name: "i64" for name in _INTS})
    return {
        "name": (f"vq_nearest[{zdt}/{cdt},{'cos' if cosine else 'l2'}{',dist' if dist else ''},{bn}x{bk}x{block_d}"
                 f"w{warps}{'' if precision == 'ieee' else ',' + precision}]"),
        "kernel": vq_nearest_kernel,
        "signature": sig,
        "constexprs": {"COSINE": cosine, "RETURN_DIST": dist, "BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": block_d,
                       "DOT_PRECISION": precision, "USE_DOT": True},
        "divisible_by_16": ["z_ptr", "c_ptr", "idx_ptr", "dist_ptr", "c_rs"],
        "num_warps": warps,
        "num_stages": stages,
        **({"allow_spills": _NEWER_TRITON_SPILLS} if _NEWER_TRITON else
           {"allow_spills": _TF32X3_SPILLS} if precision != "ieee" else {}),
    }


# The GPU configs were timed under Triton 3.6 (the GPU machine's), where ptxas fits them without
# spilling (d > 32 at BLOCK_D 64 spilled 564 B there: it was 7 % faster, BLOCK_D 32 is kept). Triton 3.9
# lowers the fp32 FMA dot with more live registers and spills 56-1,468 B in each: untimed on a GPU.
_NEWER_TRITON = tuple(int(p) for p in triton.__version__.split(".")[:2]) > (3, 6)
_NEWER_TRITON_SPILLS = "Triton > 3.6 spills these tiles (3.6, where they were timed fastest on an H200: none)"
# tf32x3 splits both tiles into TF32 hi / lo parts: under Triton 3.6 the d <= 32 tile spills 16 B on
# sm_90 (timed there: 1.06 ms at d = 32, 2.1x the ieee kernel) and ~600 B on sm_80 (untimed)
_TF32X3_SPILLS = "tf32x3's hi / lo operand tiles: 16 B on sm_90 (timed fast on an H200), ~600 B on sm_80 (untimed)"

_D32 = GPU_CONFIGS[1][1]
AOT_CONFIGS = (
    [_aot("fp32", "fp32", False, False, cfg) for _, cfg in GPU_CONFIGS]
    + [_aot("bf16", "fp32", False, False, _D32), _aot("fp16", "fp32", False, True, _D32),
       _aot("fp32", "fp32", True, True, _D32), _aot("bf16", "bf16", True, False, _D32)]
    + [_aot("fp32", "fp32", False, False, cfg, "tf32x3") for _, cfg in GPU_CONFIGS]
    + [{
        "name": "vq_counts",
        "kernel": vq_counts_kernel,
        "signature": {"idx_ptr": "*i64", "counts_ptr": "*i64", "n": "i64", "idx_stride": "i64", "k": "i64"},
        "constexprs": {"BLOCK": 1024},
        "divisible_by_16": ["idx_ptr", "counts_ptr"],
        "num_warps": 4,
        "num_stages": 1,
    }]
)
