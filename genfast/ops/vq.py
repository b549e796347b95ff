"""Vector quantisation: the nearest-codebook lookup in O(N) memory, the straight-through quantizer
and per-code counts. Checks, backend choice and the torch.library registration
(genfast::vq_nearest, genfast::vq_counts); the math is in csrc/vq.h and genfast/reference.py.

    indices = vq_nearest(z, codebook)                     # int64 [...] for z [..., D], codebook [K, D]
    z_q, indices, loss = vector_quantize(z, codebook, beta=0.25)
    counts = code_counts(indices, K)                      # int64 [K], a fused histogram

The lookup never holds the N x K distance matrix: the kernels run tiles of z against tiles of the
codebook with a running min/argmin per row, accumulating in fp32 whatever the storage dtype.
"""
import torch

from genfast import _native, backends, reference
from genfast.ops._common import DTYPE_CODE, KERNEL_DTYPES, LIB, check_float_tensor, cuda_stream

OP = "vq_nearest"
METRICS = {"l2": 0, "cosine": 1}
PRECISIONS = {"fp32": 0, "bf16-screen": 1, "tf32x3": 2}
LIB.define("vq_nearest(Tensor z, Tensor codebook, int metric, bool return_distance, int precision=0) -> (Tensor, Tensor)")
LIB.define("vq_counts(Tensor indices, int codebook_size) -> Tensor")


def vq_nearest(z, codebook, *, metric="l2", return_distance=False, precision="fp32"):
    """Index of the nearest codebook vector for every vector of z.

    Args:
        z: [..., D] fp32/fp16/bf16 (fp64 runs the reference). Any strides: channels-first latents
            permuted to channels-last (`x.permute(0, 2, 3, 1)`) are read in place, without a copy.
        codebook: [K, D] on z's device, any float dtype (bf16 z with an fp32 codebook is fine).
        metric: "l2" (squared Euclidean) or "cosine" (both sides L2-normalised inside the op, so
            an unnormalised learnable codebook is ranked by angle, not by length).
        return_distance: also return the chosen code's distance (fp32; fp64 for fp64 inputs),
            recomputed directly (no cancellation): l2 -> |z - c|^2, cosine -> |z/|z| - c/|c||^2
            = 2 - 2 cos. Not differentiable: use `codebook[indices]` for gradients.
        precision: "fp32" (default): every score in true fp32 products. "bf16-screen": the C++
            CPU kernel screens codes with bf16 products (AVX-512 BF16, ~2x the fp32 rate at large
            D) under a rigorous error bound and re-scores the survivors exactly as "fp32" does, so
            the indices are identical to "fp32" (tested bit for bit); only the time differs, and
            it helps at D >= ~64 (at small D the fp32 kernel is faster); it holds z as bf16
            (N D 2 bytes) besides O(N). Every other backend, and
            CPUs without AVX-512 BF16, run the fp32 path for it: the same answer.
            "tf32x3": on GPUs (the Triton kernel), each dot product as three TF32 tensor-core
            products (hi*hi + hi*lo + lo*hi of each operand's TF32 split), near fp32 accuracy but
            not its rounding: an index may differ from "fp32" only where two codes score within
            a few fp32 ulps of each other (H200: no row of 1,024 differed from an fp64 argmin at
            D = 8 / 32 / 256; 1.5-2.3x torch.compile of the expanded form, against 0.5-1.15x for
            "fp32"). Every other backend runs the fp32 path for it. Distances are recomputed
            directly in fp32 either way.
    Returns:
        int64 indices of shape z.shape[:-1] (and the distances, same shape).

    Distances accumulate in fp32. Ties go to the lowest index, as torch.argmin. NaN: a NaN score
    never wins, so a vector of z containing NaN gets index 0 (its distance NaN) and a codebook row
    containing NaN is never chosen while any other row scores a number.
    """
    metric_code = _check(z, codebook, metric)
    _check_precision(precision)
    idx, dist = torch.ops.genfast.vq_nearest(z.detach(), codebook.detach(), metric_code, bool(return_distance),
                                             PRECISIONS[precision])
    return (idx, dist) if return_distance else idx


def code_counts(indices, codebook_size):
    """How often each code occurs in `indices` (any shape, int64 or int32): int64 [codebook_size].
    Equals torch.bincount(indices.flatten(), minlength=codebook_size) for indices in range; values
    outside [0, codebook_size) are not counted (no check, so no device synchronisation)."""
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"indices must be an int64 or int32 tensor, got {str(indices.dtype).replace('torch.', '')}")
    if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 1:
        raise ValueError(f"codebook_size must be a positive int, got {codebook_size!r}")
    return torch.ops.genfast.vq_counts(indices.to(torch.int64), codebook_size)


def vector_quantize(z, codebook, *, beta=0.25, metric="l2", precision="fp32"):
    """The VQ-VAE bottleneck (van den Oord et al. 2017, arXiv:1711.00937): (z_q, indices, loss).

        z_q  = z + sg(c - z)                            value c = codebook[indices], gradient to z
        loss = mean |sg(z) - c|^2 + beta * mean |z - sg(c)|^2      (codebook + commitment, fp32)

    z_q has z's dtype and shape; indices are int64 [...]; loss is a 0-d fp32 tensor (fp64 for fp64
    inputs). The codebook gets its gradient through the codebook term (the gather's backward).
    Cosine: z and the codebook are L2-normalised first (differentiably), so z_q is a unit code.
    The search is the fused kernel; the gather and the two means are O(N D) elementwise work
    left to PyTorch (fusing them saved nothing measurable next to the O(N K D) search).
    precision: the search's, as vq_nearest's.
    """
    _check(z, codebook, metric)
    _check_precision(precision)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if metric == "cosine":
        z, codebook = reference.unit_rows(z), reference.unit_rows(codebook)
    idx, _ = torch.ops.genfast.vq_nearest(z.detach(), codebook.detach(), METRICS["l2"], False, PRECISIONS[precision])
    c = codebook[idx]
    ct = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    zf, cf = z.to(ct), c.to(ct)
    loss = ((zf.detach() - cf) ** 2).mean() + beta * ((zf - cf.detach()) ** 2).mean()
    z_q = z + (c.to(z.dtype) - z).detach()
    return z_q, idx, loss


def _check_precision(precision):
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")


def _check(z, codebook, metric):
    check_float_tensor("z", z)
    check_float_tensor("codebook", codebook)
    if metric not in METRICS:
        raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
    if z.dim() < 1:
        raise ValueError("z must have shape [..., D], got a 0-d tensor")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must have shape [K, D], got {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("codebook is empty (K = 0); expected at least one code")
    if codebook.shape[0] >= 2**31:
        raise ValueError(f"codebook has {codebook.shape[0]} codes; at most 2^31 - 1 are supported")
    if codebook.shape[1] == 0:
        raise ValueError("codebook has D = 0; expected vectors of at least one element")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"z has D = {z.shape[-1]} (its last dim) but codebook has D = {codebook.shape[1]}; "
                         "expected the same")
    if z.device != codebook.device:
        raise ValueError(f"codebook is on {codebook.device} but z is on {z.device}; expected the same device")
    return METRICS[metric]


def z_layout(z):
    """z [..., D] as rows r = o * inner + i at o * os + i * rs, columns at j * cs (csrc/vq.h):
    (inner, os, rs, cs), or None when the leading dims do not fold into two strided dims."""
    cs = z.stride(-1) if z.shape[-1] > 1 else 1
    groups = []  # [size, stride], innermost first; size-1 dims carry no layout
    for size, stride in reversed(list(zip(z.shape[:-1], z.stride()[:-1]))):
        if size == 1:
            continue
        if groups and groups[-1][0] * groups[-1][1] == stride:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        return None
    inner, rs = groups[0] if groups else (1, 0)
    os = groups[1][1] if len(groups) == 2 else 0
    return inner, os, rs, cs


# ----------------------------------------------------------------------------------- backends
def _native_reasons(z_dtype, c_dtype):
    bad = [f"{name} dtype {d} is not supported (fp32, fp16, bf16 only)"
           for name, d in (("z", z_dtype), ("codebook", c_dtype)) if d not in KERNEL_DTYPES]
    return bad


_REASONS_CACHE = {}


def _reasons(device_type, z_dtype, c_dtype=None):
    key = (device_type, z_dtype, c_dtype or z_dtype)
    table = _REASONS_CACHE.get(key)
    if table is None:
        zd, cd = key[1], key[2]
        table = {
            "cuda": lambda: backends.module_reasons("_cuda", device_type, "cuda") + _native_reasons(zd, cd),
            "cpu": lambda: backends.module_reasons("_C", device_type, "cpu") + _native_reasons(zd, cd),
            "cuda_emu": lambda: backends.module_reasons("_cuda_emu", device_type, "cpu") + _native_reasons(zd, cd),
            "triton": lambda: backends.triton_reasons(device_type) + _native_reasons(zd, cd),
            "reference": lambda: [],
        }
        _REASONS_CACHE[key] = table
    return table


def backend_for(z, codebook):
    return backends.choose(OP, z.device.type, _reasons(z.device.type, z.dtype, codebook.dtype))


def _nearest_impl(z, codebook, metric, return_distance, precision=0):
    lead = z.shape[:-1]
    ct = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    n, d, k = z.numel() // max(z.shape[-1], 1), z.shape[-1], codebook.shape[0]
    idx = torch.empty(lead, dtype=torch.int64, device=z.device)
    dist = torch.empty(lead if return_distance else (0,), dtype=ct, device=z.device)
    if n == 0:
        return idx, dist
    name = backend_for(z, codebook)
    metric_name = "cosine" if metric == METRICS["cosine"] else "l2"
    if name == "reference":
        if return_distance:
            i, dd = reference.vq_nearest(z, codebook, metric=metric_name, return_distance=True)
            return idx.copy_(i), dist.copy_(dd)
        return idx.copy_(reference.vq_nearest(z, codebook, metric=metric_name)), dist
    layout = z_layout(z)
    if layout is None:  # more than two non-foldable leading dims: one copy, then read in place
        z = z.contiguous()
        layout = z_layout(z)
    if name == "triton":
        from genfast.kernels.vq import vq_nearest as triton_vq_nearest

        triton_vq_nearest(z, codebook, idx.view(-1), dist.view(-1) if return_distance else None, metric, layout,
                          precision="tf32x3" if precision == PRECISIONS["tf32x3"] else "ieee")
        return idx, dist
    mod = _native.for_backend(name)
    stream = cuda_stream(z) if name == "cuda" else 0
    if precision == PRECISIONS["tf32x3"]:
        precision = PRECISIONS["fp32"]  # the C++ / CUDA kernels' products are fp32 (csrc/vq.h VqPrecision)
    mod.vq_nearest(z.data_ptr(), n, d, *layout, DTYPE_CODE[z.dtype], codebook.data_ptr(), k, codebook.stride(0),
                   codebook.stride(1) if d > 1 else 1, DTYPE_CODE[codebook.dtype], metric, precision, idx.data_ptr(),
                   dist.data_ptr() if return_distance else 0, stream)
    return idx, dist


def _counts_impl(indices, codebook_size):
    counts = torch.empty(codebook_size, dtype=torch.int64, device=indices.device)
    flat = indices.reshape(-1)
    name = backends.choose(OP, indices.device.type, _reasons(indices.device.type, torch.float32))
    if name == "reference":
        ok = flat[(flat >= 0) & (flat < codebook_size)]
        return counts.copy_(reference.code_counts(ok, codebook_size))
    if name == "triton":
        from genfast.kernels.vq import vq_counts as triton_vq_counts

        triton_vq_counts(flat, counts)
        return counts
    mod = _native.for_backend(name)
    stream = cuda_stream(indices) if name == "cuda" else 0
    mod.vq_counts(flat.data_ptr(), flat.numel(), flat.stride(0) if flat.numel() > 1 else 1, codebook_size,
                  counts.data_ptr(), stream)
    return counts


# ------------------------------------------------------------------------ torch.library glue
for _key in ("CPU", "CUDA"):
    LIB.impl("vq_nearest", _nearest_impl, _key)
    LIB.impl("vq_counts", _counts_impl, _key)


@torch.library.register_fake("genfast::vq_nearest")
def _fake_nearest(z, codebook, metric, return_distance, precision=0):
    ct = torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32
    lead = z.shape[:-1]
    return z.new_empty(lead, dtype=torch.int64), z.new_empty(lead if return_distance else (0,), dtype=ct)


@torch.library.register_fake("genfast::vq_counts")
def _fake_counts(indices, codebook_size):
    return indices.new_empty((codebook_size,), dtype=torch.int64)
