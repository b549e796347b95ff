"""Reparameterized Gaussian sample + KL to N(0, 1), forward and backward, with in-kernel Philox noise.

    lv = clamp(logvar, lo, hi),  s = exp(lv / 2),  z = mu + eps * s,  kl = 0.5 (mu^2 + s^2 - 1 - lv)
    dmu = dz + gk mu,  dlogvar = [lo <= logvar <= hi] 0.5 (dz eps s + gk (s^2 - 1))

Every tensor is a 2-D view [rows, cols] (rows = batch, cols = the rest) with its own strides, so
the two chunks of one encoder output are read in place. eps is not stored: element g = r * cols + c
takes word g % 4 of Philox4x32-10 at counter (g // 4, offset) under key seed, with (seed, offset)
read on the device from a [2] int64 tensor (CUDA-graph safe); Box-Muller turns the words into
normals (csrc/philox.h defines the stream; genfast/reference.py computes it in plain PyTorch).
The Philox words are bit-identical to the C++ and CUDA kernels'; the normals use Triton's
log / sqrt / sin / cos (after the same exact quadrant split), so they agree to ~1e-6. Triton's own
tl.randint4x(seed, g // 4) gives the same words at offset 0 (tests/test_kl.py checks it), but
tl.randn maps them to normals its own way and has no offset words, hence the explicit rounds here.

Per-row KL sums: each program writes the fp32 sum of its tile to partial[row, tile]; the launcher
reduces partial over tiles with torch.sum (a fixed order: deterministic, no atomics).

Layout of a program: one row, BLOCK = 4 * GROUPS consecutive columns, starting where the global
index is a multiple of 4 (the row's first tile starts `(r * cols) % 4` columns before column 0),
so a tile holds whole Philox groups: GROUPS counters -> 4 x GROUPS words -> interleaved normals.

References: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11);
Kingma & Welling, "Auto-Encoding Variational Bayes" (arXiv:1312.6114).

Configuration (fixed): GROUPS = 256 (1024 elements a program), 8 warps -> one Philox group (4
elements) a thread, as the CUDA kernel does. With 4 warps ptxas needs 80-92 registers (two groups
a thread), with 8 warps 44-48 (sm_90, no spills; gpu_compile), twice the resident threads for a
stream that needs bytes in flight. Not yet timed on a GPU: autotuning would add a first-call stall
and a sync; the choice is to be confirmed by benchmarks/test_kl.py on an H100.
"""
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# name -> (GROUPS, num_warps, num_stages)
CONFIGS = {"default": (256, 8, 1)}


@triton.jit
def _philox_normals(seed_ptr, first_group, GROUPS: tl.constexpr):
    """Four [GROUPS] fp32 normals (words 0..3 of each group) for groups first_group + arange."""
    seed = tl.load(seed_ptr)  # int64 scalars on the device
    offset = tl.load(seed_ptr + 1)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    grp = first_group + tl.arange(0, GROUPS).to(tl.int64)  # [GROUPS] int64
    c0 = (grp & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((grp >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = tl.zeros([GROUPS], dtype=tl.uint32) + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros([GROUPS], dtype=tl.uint32) + ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):  # Philox4x32-10
        m0 = tl.full([GROUPS], 0xD2511F53, tl.uint32)
        m1 = tl.full([GROUPS], 0xCD9E8D57, tl.uint32)
        n0 = tl.umulhi(m1, c2) ^ c1 ^ k0
        n2 = tl.umulhi(m0, c0) ^ c3 ^ k1
        c1 = m1 * c2
        c3 = m0 * c0
        c0 = n0
        c2 = n2
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    a0, a1 = _box_muller(c0, c1)
    a2, a3 = _box_muller(c2, c3)
    return a0, a1, a2, a3


@triton.jit
def _box_muller(xu, xa):
    """Two normals from two uint32 words: radius from xu, angle (in turns) from xa."""
    u = ((xu >> 8) + 1).to(tl.int32).to(tl.float32) * 5.9604644775390625e-08  # (0, 1]
    r = tl.sqrt(-2.0 * tl.log(u))
    k = (xa >> 8).to(tl.int32)  # angle = k / 2^24 turns
    q = (k + (1 << 21)) >> 22  # nearest quarter turn, exact in integers
    x = (k - (q << 22)).to(tl.float32) * (6.283185307179586 * 5.9604644775390625e-08)  # |x| <= pi/4
    sx = tl.sin(x)
    cx = tl.cos(x)
    odd = (q & 1) != 0
    ss = tl.where(odd, cx, sx)
    cc = tl.where(odd, sx, cx)
    s = tl.where((q & 2) != 0, -ss, ss)
    c = tl.where(((q + 1) & 2) != 0, -cc, cc)
    return r * c, r * s


@triton.jit
def _clamp(l, lo, hi):
    # torch.clamp's rule: NaN stays NaN (tl.minimum / tl.maximum drop it on GPUs, hiding a diverged encoder)
    return tl.where(l < lo, lo, tl.where(l > hi, hi, l))


@triton.jit
def _store(ptr, value, mask, BF16_RTNE: tl.constexpr):
    if BF16_RTNE:
        # The interpreter's fp32 -> bf16 cast truncates; the GPU's rounds to nearest even.
        b = value.to(tl.uint32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        tl.store(ptr, (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile(pid, cols, tiles_per_row, GROUPS: tl.constexpr):
    """(row, columns [BLOCK] int64, column mask, first Philox group) of program pid."""
    r = pid // tiles_per_row
    t = pid % tiles_per_row
    shift = (r * cols) % 4  # the row's first tile starts at a multiple of 4 globally
    c = t * (4 * GROUPS) - shift + tl.arange(0, 4 * GROUPS).to(tl.int64)  # [BLOCK]
    first_group = (r * cols - shift) // 4 + t * GROUPS
    return r, c, (c >= 0) & (c < cols), first_group


@triton.jit
def kl_forward_kernel(
    z_ptr,  # [rows, cols] strides (z_rs, z_cs), mu's dtype
    kl_ptr,  # fp32: [rows, cols] strides (kl_rs, kl_cs) when not PER_ROW (unused when PER_ROW)
    partial_ptr,  # fp32 [rows, tiles_per_row] contiguous, per-tile KL sums when PER_ROW
    mu_ptr,  # [rows, cols] strides (mu_rs, mu_cs)
    lv_ptr,  # [rows, cols] strides (lv_rs, lv_cs)
    noise_ptr,  # [rows, cols] strides (n_rs, n_cs); unused unless HAS_NOISE
    seed_ptr,  # [2] int64 (seed, offset); unused when HAS_NOISE
    cols, tiles_per_row,  # scalar ints
    mu_rs, mu_cs, lv_rs, lv_cs, n_rs, n_cs, z_rs, z_cs, kl_rs, kl_cs,  # scalar ints (elements)
    lo, hi,  # scalar fp32: the logvar clamp (used when CLAMP)
    HAS_NOISE: tl.constexpr, CLAMP: tl.constexpr, PER_ROW: tl.constexpr,
    GROUPS: tl.constexpr,  # Philox groups a program covers (4 elements each)
    BF16_RTNE: tl.constexpr,  # interpreter only: round bf16 stores by hand
):
    pid = tl.program_id(0).to(tl.int64)
    r, c, mask, first_group = _tile(pid, cols, tiles_per_row, GROUPS)
    m = tl.load(mu_ptr + r * mu_rs + c * mu_cs, mask=mask, other=0.0).to(tl.float32)
    l = tl.load(lv_ptr + r * lv_rs + c * lv_cs, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        eps = tl.load(noise_ptr + r * n_rs + c * n_cs, mask=mask, other=0.0).to(tl.float32)
    else:
        n0, n1, n2, n3 = _philox_normals(seed_ptr, first_group, GROUPS)
        eps = tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))  # group-major words 0..3
    if CLAMP:
        l = _clamp(l, lo, hi)
    s = tl.exp(0.5 * l)
    _store(z_ptr + r * z_rs + c * z_cs, m + eps * s, mask, BF16_RTNE)
    kl = 0.5 * (m * m + s * s - 1.0 - l)
    if PER_ROW:
        tl.store(partial_ptr + pid, tl.sum(tl.where(mask, kl, 0.0), axis=0))
    else:
        tl.store(kl_ptr + r * kl_rs + c * kl_cs, kl, mask=mask)


@triton.jit
def kl_backward_kernel(
    dmu_ptr,  # [rows, cols] strides (dmu_rs, dmu_cs), mu's dtype
    dlv_ptr,  # [rows, cols] strides (dlv_rs, dlv_cs)
    dz_ptr,  # [rows, cols] strides (dz_rs, dz_cs); unused unless HAS_DZ
    g_ptr,  # fp32 KL gradient, strides (g_rs, g_cs) (g_cs 0: one per row); unused unless HAS_G
    mu_ptr, lv_ptr,  # [rows, cols] strides (mu_rs, mu_cs), (lv_rs, lv_cs)
    noise_ptr,  # [rows, cols] strides (n_rs, n_cs); unused unless HAS_NOISE
    seed_ptr,  # [2] int64 (seed, offset); unused when HAS_NOISE or not HAS_DZ
    cols, tiles_per_row,  # scalar ints
    mu_rs, mu_cs, lv_rs, lv_cs, n_rs, n_cs, dz_rs, dz_cs, g_rs, g_cs, dmu_rs, dmu_cs, dlv_rs, dlv_cs,
    lo, hi,  # scalar fp32
    HAS_NOISE: tl.constexpr, HAS_DZ: tl.constexpr, HAS_G: tl.constexpr, CLAMP: tl.constexpr,
    GROUPS: tl.constexpr, BF16_RTNE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r, c, mask, first_group = _tile(pid, cols, tiles_per_row, GROUPS)
    m = tl.load(mu_ptr + r * mu_rs + c * mu_cs, mask=mask, other=0.0).to(tl.float32)
    l0 = tl.load(lv_ptr + r * lv_rs + c * lv_cs, mask=mask, other=0.0).to(tl.float32)
    l = l0
    if CLAMP:
        l = _clamp(l0, lo, hi)
    s = tl.exp(0.5 * l)
    d = tl.zeros([4 * GROUPS], dtype=tl.float32)
    dlv = tl.zeros([4 * GROUPS], dtype=tl.float32)
    if HAS_DZ:
        d = tl.load(dz_ptr + r * dz_rs + c * dz_cs, mask=mask, other=0.0).to(tl.float32)
        if HAS_NOISE:
            eps = tl.load(noise_ptr + r * n_rs + c * n_cs, mask=mask, other=0.0).to(tl.float32)
        else:
            n0, n1, n2, n3 = _philox_normals(seed_ptr, first_group, GROUPS)
            eps = tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))
        dlv = d * eps * s
    dmu = d
    if HAS_G:
        g = tl.load(g_ptr + r * g_rs + c * g_cs, mask=mask, other=0.0)
        dmu = dmu + g * m
        dlv = dlv + g * (s * s - 1.0)
    dlv = 0.5 * dlv
    if CLAMP:
        dlv = tl.where((l0 >= lo) & (l0 <= hi), dlv, 0.0)
    _store(dmu_ptr + r * dmu_rs + c * dmu_cs, dmu, mask, BF16_RTNE)
    _store(dlv_ptr + r * dlv_rs + c * dlv_cs, dlv, mask, BF16_RTNE)


_INTERPRETED = isinstance(kl_forward_kernel, InterpretedFunction)


def _grid(rows, cols, groups):
    tiles = triton.cdiv(cols + 3, 4 * groups)  # + 3: the row's first tile may start 3 columns early
    return tiles, (rows * tiles,)


def kl_forward(z, kl, mu, lv, noise, seed, rows, cols, strides, lo, hi, clamp, per_row):
    """Launches the forward. strides: mu_rs, mu_cs, lv_rs, lv_cs, n_rs, n_cs (the ops layer checked
    everything); z contiguous [rows, cols]; kl fp32 [rows] (per_row) or contiguous [rows, cols]."""
    groups, num_warps, num_stages = CONFIGS["default"]
    tiles, grid = _grid(rows, cols, groups)
    partial = torch.empty(rows * tiles if per_row else 1, dtype=torch.float32, device=mu.device)
    kl_forward_kernel[grid](
        z, kl, partial, mu, lv, noise if noise is not None else mu, seed if seed is not None else partial,
        cols, tiles, *strides, cols, 1, (0 if per_row else cols), (0 if per_row else 1), lo, hi,
        HAS_NOISE=noise is not None, CLAMP=clamp, PER_ROW=per_row, GROUPS=groups,
        BF16_RTNE=_INTERPRETED and z.dtype == torch.bfloat16, num_warps=num_warps, num_stages=num_stages)
    if per_row:
        torch.sum(partial.view(rows, tiles), dim=1, out=kl)


def kl_backward(dmu, dlv, dz, g, mu, lv, noise, seed, rows, cols, strides, lo, hi, clamp):
    """Launches the backward. strides: the 14 of csrc/kl_bind.h (mu, lv, noise, dz, g, dmu, dlv)."""
    groups, num_warps, num_stages = CONFIGS["default"]
    tiles, grid = _grid(rows, cols, groups)
    kl_backward_kernel[grid](
        dmu, dlv, dz if dz is not None else mu, g if g is not None else dmu, mu, lv,
        noise if noise is not None else mu, seed if seed is not None else dmu,
        cols, tiles, *strides, lo, hi,
        HAS_NOISE=noise is not None, HAS_DZ=dz is not None, HAS_G=g is not None, CLAMP=clamp, GROUPS=groups,
        BF16_RTNE=_INTERPRETED and dmu.dtype == torch.bfloat16, num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile list for genfast/devtools/gpu_compile.py (format documented there): the
# default config for the launches training makes (Philox noise, clamp, per-row KL) in every dtype,
# plus explicit noise and the element-wise KL. Ints typed i64 (the pessimistic case for registers).
def _aot_forward(dtype, has_noise, per_row):
    groups, num_warps, num_stages = CONFIGS["default"]
    sig = {"z_ptr": f"*{dtype}", "kl_ptr": "*fp32", "partial_ptr": "*fp32", "mu_ptr": f"*{dtype}",
           "lv_ptr": f"*{dtype}", "noise_ptr": f"*{dtype}", "seed_ptr": "*i64"}
    sig.update({n: "i64" for n in ("cols", "tiles_per_row", "mu_rs", "mu_cs", "lv_rs", "lv_cs", "n_rs", "n_cs",
                                   "z_rs", "z_cs", "kl_rs", "kl_cs")})
    sig.update({"lo": "fp32", "hi": "fp32"})
    return {"name": f"kl_forward[{dtype}{',noise' if has_noise else ''}{',per_row' if per_row else ',elementwise'}]",
            "kernel": kl_forward_kernel, "signature": sig,
            "constexprs": {"HAS_NOISE": has_noise, "CLAMP": True, "PER_ROW": per_row, "GROUPS": groups,
                           "BF16_RTNE": False},
            "divisible_by_16": ["z_ptr", "kl_ptr", "partial_ptr", "mu_ptr", "lv_ptr", "noise_ptr", "seed_ptr",
                                "cols", "mu_rs", "lv_rs", "z_rs"],
            "num_warps": num_warps, "num_stages": num_stages}


def _aot_backward(dtype, has_noise):
    groups, num_warps, num_stages = CONFIGS["default"]
    sig = {"dmu_ptr": f"*{dtype}", "dlv_ptr": f"*{dtype}", "dz_ptr": f"*{dtype}", "g_ptr": "*fp32",
           "mu_ptr": f"*{dtype}", "lv_ptr": f"*{dtype}", "noise_ptr": f"*{dtype}", "seed_ptr": "*i64"}
    sig.update({n: "i64" for n in ("cols", "tiles_per_row", "mu_rs", "mu_cs", "lv_rs", "lv_cs", "n_rs", "n_cs",
                                   "dz_rs", "dz_cs", "g_rs", "g_cs", "dmu_rs", "dmu_cs", "dlv_rs", "dlv_cs")})
    sig.update({"lo": "fp32", "hi": "fp32"})
    return {"name": f"kl_backward[{dtype}{',noise' if has_noise else ''}]", "kernel": kl_backward_kernel,
            "signature": sig,
            "constexprs": {"HAS_NOISE": has_noise, "HAS_DZ": True, "HAS_G": True, "CLAMP": True, "GROUPS": groups,
                           "BF16_RTNE": False},
            "divisible_by_16": ["dmu_ptr", "dlv_ptr", "dz_ptr", "g_ptr", "mu_ptr", "lv_ptr", "noise_ptr", "seed_ptr",
                                "cols", "mu_rs", "lv_rs", "dz_rs", "dmu_rs", "dlv_rs"],
            "num_warps": num_warps, "num_stages": num_stages}


AOT_CONFIGS = (
    [_aot_forward(dt, False, True) for dt in ("fp32", "fp16", "bf16")]
    + [_aot_forward("bf16", True, True), _aot_forward("fp32", False, False)]
    + [_aot_backward(dt, False) for dt in ("fp32", "fp16", "bf16")]
    + [_aot_backward("bf16", True)]
)
