"""Fused rectified-flow Euler / classifier-free-guidance step (one Triton kernel).

    out[r, c] = x[r, c] - dt_r * ((1 + w_r) * vc[r, c] - w_r * vu[r, c])   (vu given)
    out[r, c] = x[r, c] - dt_r * vc[r, c]                                  (vu is None)

Every tensor is a 2-D view [rows, cols] (rows = batch, cols = the rest collapsed) with its own
strides, so the two halves of a doubled-batch model output are read in place. One pass: three
reads and one write per element, math in fp32, one cast on store. dt_r and w_r come from per-row
fp32 tensors (read on the device: no host sync) or from Python floats.

References: Liu et al., "Flow Straight and Fast" (rectified flow), arXiv:2209.03003;
Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv:2207.12598.

Configuration (fixed, no runtime autotune: the op is a pure stream, one config per row shape is
within noise of the best on bandwidth-bound kernels, and autotuning would add a first-call stall
and a host sync to a step that runs inside sampling loops and CUDA graphs):
  wide   cols >= 512: tile [1, 2048], 4 warps -> 16 elements a thread a tensor (4 x 128-bit
         loads for fp32, 2 for 16-bit types), enough bytes in flight to saturate HBM with
         ~10 resident CTAs an SM, and a grid of thousands of CTAs at 16M elements.
  narrow cols <  512: tile [32, 64], 8 warps, so many short rows share one CTA instead of
         launching one mostly-masked 2048-wide CTA per row. (4 warps, 16 elements a thread,
         spilled 12-16 B in the fp32 guided step on sm_90 under Triton 3.6.)
  A non-unit column stride (no vector accesses, int64 offsets per element) uses 8 warps: half
  the addresses a thread, which AOT compiles show cuts registers from 80-210 to 62-91.
Fully contiguous tensors with one dt and w for all rows are launched as a single long row, so
short rows still get wide tiles. num_stages does not matter (no loop to pipeline); 1 is passed.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# CUDA limits grid dims y and z to 65535: row tiles are spread over (y, z). A module constant so
# tests can shrink it to exercise the z split under the interpreter.
MAX_GRID_YZ = 65535

# name -> (BLOCK_R, BLOCK_C, num_warps (contiguous), num_warps (strided columns), num_stages)
CONFIGS = {
    "wide": (1, 2048, 4, 8, 1),
    "narrow": (32, 64, 8, 8, 1),
}
NARROW_BELOW_COLS = 512


@triton.jit
def flow_step_kernel(
    out_ptr,  # [rows, cols] strides (out_rs, out_cs); may alias x_ptr exactly (in place)
    x_ptr,  # [rows, cols] strides (x_rs, x_cs)
    vc_ptr,  # [rows, cols] strides (vc_rs, vc_cs), conditional velocity
    vu_ptr,  # [rows, cols] strides (vu_rs, vu_cs), unconditional velocity; unused if not HAS_VU
    dt_ptr,  # [rows] fp32, stride dt_stride (0: broadcast); unused if not HAS_DT
    w_ptr,  # [rows] fp32, stride w_stride (0: broadcast); unused if not HAS_W
    rows,  # scalar int: number of rows
    cols,  # scalar int: number of columns
    out_rs, out_cs,  # scalar ints: strides of out in elements (row, column)
    x_rs, x_cs,  # scalar ints: strides of x
    vc_rs, vc_cs,  # scalar ints: strides of vc
    vu_rs, vu_cs,  # scalar ints: strides of vu
    dt_stride,  # scalar int: stride of dt
    w_stride,  # scalar int: stride of w
    dt_value,  # scalar fp32: dt for every row when not HAS_DT
    w_value,  # scalar fp32: guidance for every row when not HAS_W
    HAS_VU: tl.constexpr,  # bool: guidance step (vu given) vs plain Euler step
    HAS_DT: tl.constexpr,  # bool: dt per row from dt_ptr
    HAS_W: tl.constexpr,  # bool: w per row from w_ptr
    CONTIG: tl.constexpr,  # bool: every column stride is 1 (the fast path; *_cs ignored)
    BLOCK_R: tl.constexpr,  # rows a program handles
    BLOCK_C: tl.constexpr,  # columns a program handles
    BF16_RTNE: tl.constexpr,  # bool: round fp32 -> bf16 by hand (interpreter only, see below)
):
    # int64 before any pointer arithmetic: offsets may pass 2^31 elements.
    pid_c = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)  # [BLOCK_R]
    c0 = pid_c * BLOCK_C  # scalar int64: first column of the tile
    ci = tl.arange(0, BLOCK_C)  # [BLOCK_C] int32 offsets inside the tile
    row_ok = r < rows
    mask = row_ok[:, None] & (ci < cols - c0)[None, :]
    r2 = r[:, None]

    # Contiguous rows: the unit column stride is known at compile time, so (with 16-divisible
    # row strides and pointers) loads and stores become 128-bit vectors. Strided: int64 column
    # offsets, since c * cs may pass 2^31.
    if CONTIG:
        cx = (c0 + ci)[None, :]
        x_off = r2 * x_rs + cx
        vc_off = r2 * vc_rs + cx
        vu_off = r2 * vu_rs + cx
        out_off = r2 * out_rs + cx
    else:
        c = (c0 + ci.to(tl.int64))[None, :]
        x_off = r2 * x_rs + c * x_cs
        vc_off = r2 * vc_rs + c * vc_cs
        vu_off = r2 * vu_rs + c * vu_cs
        out_off = r2 * out_rs + c * out_cs

    if HAS_DT:
        dt = tl.load(dt_ptr + r * dt_stride, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        dt = dt_value
    if HAS_W:
        w = tl.load(w_ptr + r * w_stride, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    else:
        w = w_value
    # Contiguous tiles wholly inside the tensor go unmasked: that keeps 128-bit accesses when
    # cols is not a multiple of the vector width (the mask would split them); edge tiles pay the
    # mask. Strided tiles gain nothing from it (no vectors), so they take the masked path only.
    full = (c0 + BLOCK_C <= cols) & (pid_r * BLOCK_R + BLOCK_R <= rows)
    if CONTIG and full:
        _step(out_ptr + out_off, x_ptr + x_off, vc_ptr + vc_off, vu_ptr + vu_off, dt, w, None, HAS_VU, BF16_RTNE)
    else:
        _step(out_ptr + out_off, x_ptr + x_off, vc_ptr + vc_off, vu_ptr + vu_off, dt, w, mask, HAS_VU, BF16_RTNE)


@triton.jit
def _step(out_p, x_p, vc_p, vu_p, dt, w, mask, HAS_VU: tl.constexpr, BF16_RTNE: tl.constexpr):
    # fp32 right after the load (also what keeps the interpreter right for bf16). Masked-off
    # lanes load garbage that is never stored.
    x = tl.load(x_p, mask=mask).to(tl.float32)
    vc = tl.load(vc_p, mask=mask).to(tl.float32)
    if HAS_VU:
        vu = tl.load(vu_p, mask=mask).to(tl.float32)
        # (1 + w) vc - w vu as the other backends and the reference write it: vc + w (vc - vu), a
        # multiply fewer, overflows where vc - vu does (|vc|, |vu| ~ 2e38) and gives NaN for vc = inf at
        # w = 0. The FMA spelled out: what the GPU compiler contracts it to anyway, and with it the fp32
        # narrow tile does not spill on sm_90 (the plain expression spilled 8 B there, Triton 3.9).
        v = tl.fma(vc, 1.0 + w, -(w * vu))
    else:
        v = vc
    y = x - dt * v
    if BF16_RTNE:
        # The interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even.
        # Same rounding by hand, so interpreter tests see GPU numbers; NaN stays a quiet NaN.
        b = y.to(tl.uint32, bitcast=True)
        h = tl.where(y == y, (b + 0x7FFF + ((b >> 16) & 1)) >> 16, 0x7FC0)
        tl.store(out_p, h.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(out_p, y.to(out_p.dtype.element_ty), mask=mask)


# Under TRITON_INTERPRET=1 (read when triton.jit ran) the kernel is an InterpretedFunction.
_INTERPRETED = isinstance(flow_step_kernel, InterpretedFunction)


def _cs(t):
    # A column stride is irrelevant when there is a single column.
    return 1 if t.shape[1] == 1 else t.stride(1)


def flow_step(out, x, vc, vu, dt, w, dt_value: float, w_value: float) -> None:
    """Writes the step into `out` (may be `x` itself). Shapes and dtypes are checked by the
    caller (genfast.ops); this only launches. dt / w: None or fp32 [rows] tensors on x's device."""
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return
    has_vu = vu is not None
    has_w = has_vu and w is not None
    # Dummies for unused pointer args: never dereferenced (constexpr-guarded).
    vu_t = vu if has_vu else vc
    dt_t = dt if dt is not None else x
    w_t = w if has_w else x
    tensors = (out, x, vc, vu_t)
    contig = all(_cs(t) == 1 for t in tensors)
    rs = [t.stride(0) for t in tensors]
    same_dt = dt is None or dt.stride(0) == 0
    same_w = not has_w or w.stride(0) == 0
    if rows > 1 and contig and same_dt and same_w and all(r == cols for r in rs):
        # One long row: wide tiles, no row math. Row stride 0 (unused with one row) is seen as
        # 16-divisible, so the tiles stay 128-bit vectorised whatever cols is.
        rows, cols, rs = 1, rows * cols, [0] * 4
    block_r, block_c, warps, warps_strided, num_stages = CONFIGS["narrow" if cols < NARROW_BELOW_COLS else "wide"]
    row_tiles = triton.cdiv(rows, block_r)
    grid_y = min(row_tiles, MAX_GRID_YZ)
    grid = (triton.cdiv(cols, block_c), grid_y, triton.cdiv(row_tiles, grid_y))
    flow_step_kernel[grid](
        out, x, vc, vu_t, dt_t, w_t, rows, cols,
        rs[0], _cs(out), rs[1], _cs(x), rs[2], _cs(vc), rs[3], _cs(vu_t),
        dt.stride(0) if dt is not None else 0, w.stride(0) if has_w else 0,
        float(dt_value), float(w_value) if has_vu else 0.0,
        HAS_VU=has_vu, HAS_DT=dt is not None, HAS_W=has_w, CONTIG=contig,
        BLOCK_R=block_r, BLOCK_C=block_c, BF16_RTNE=_INTERPRETED and out.dtype == torch.bfloat16,
        num_warps=warps if contig else warps_strided, num_stages=num_stages,
    )


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile list for genfast/devtools/gpu_compile.py (format documented there).
# Each default config is compiled for the specialisations real launches hit: the guidance step
# with per-row dt/w (the heaviest: 3 loads + 2 row loads) in every dtype, the plain Euler step
# with scalar dt, and the strided path (non-unit column stride). Sizes/strides typed i64 (the
# pessimistic case for registers); pointers and sizes marked 16-divisible as aligned launches are.
_PTRS = ("out_ptr", "x_ptr", "vc_ptr", "vu_ptr", "dt_ptr", "w_ptr")
_INTS = ("rows", "cols", "out_rs", "out_cs", "x_rs", "x_cs", "vc_rs", "vc_cs", "vu_rs", "vu_cs",
         "dt_stride", "w_stride")


def _aot(config, dtype, has_vu, per_row, contig, aligned=True):
    block_r, block_c, warps, warps_strided, num_stages = CONFIGS[config]
    sig = {p: f"*{dtype}" for p in _PTRS[:4]}
    sig.update({"dt_ptr": "*fp32", "w_ptr": "*fp32"})
    sig.update({n: "i64" for n in _INTS})
    sig.update({"dt_value": "fp32", "w_value": "fp32"})
    # aligned=False: the flattened odd-sized launch (cols odd, row strides 0 and so divisible).
    div16 = list(_PTRS) + ["out_rs", "x_rs", "vc_rs", "vu_rs"] + (["cols"] if aligned else [])
    variant = ("cfg" if has_vu else "euler") + ("+rowdt" if per_row else "") + ("" if contig else "+strided")
    variant += "" if aligned else "+oddsize"
    return {
        "name": f"flow_step[{config},{dtype},{variant}]",
        "kernel": flow_step_kernel,
        "signature": sig,
        "constexprs": {"HAS_VU": has_vu, "HAS_DT": per_row, "HAS_W": per_row and has_vu, "CONTIG": contig,
                       "BLOCK_R": block_r, "BLOCK_C": block_c, "BF16_RTNE": False},
        "divisible_by_16": div16,
        "num_warps": warps if contig else warps_strided,
        "num_stages": num_stages,
        **({"allow_spills": _STRIDED_NARROW_SPILL} if config == "narrow" and not contig and has_vu else {}),
    }


# Triton 3.9, sm_80: 80 registers and 8 B of spill stores / loads a thread for the strided narrow guided
# tile (four int64 offset tiles for rows under 512 columns that are not contiguous), since the guidance
# formula keeps both 1 + w and w per row. Spills land in L1 beside 8 elements x 4 tensors of traffic a
# thread; the contiguous tiles do not spill.
_STRIDED_NARROW_SPILL = "8 B at sm_80 (Triton 3.9): strided short rows only, the guidance formula's two row factors"


AOT_CONFIGS = (
    [_aot(cfg, dt, True, True, True) for cfg in CONFIGS for dt in ("fp32", "fp16", "bf16")]
    + [_aot(cfg, "bf16", False, False, True) for cfg in CONFIGS]
    + [_aot(cfg, "bf16", True, True, False) for cfg in CONFIGS]
    + [_aot("wide", "fp32", True, False, True, aligned=False)]  # a flattened odd-sized step
)
