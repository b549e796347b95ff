"""genfast's own fp32 ways of the CPU attention backend, and its bf16 "small" way
(attention_cpu.variant() picks them, FITS / LONG / FUSED_BELOW_KEYS there, and dispatches here):

  "small"   (the default on AVX-512 CPUs, see the end of this file) all heads in one C++ call, a
            thread per (batch, head), genfast's AVX-512 micro-kernel for every GEMM (fp32; bf16
            on AVX-512 BF16 dot products).
  "onednn"  (CPUs without AVX-512) per (batch, head), the GEMMs on oneDNN
            (torch.ops.mkldnn._linear_pointwise, as genfast.ops.linear) around genfast._C's
            fused softmax rows. Described below.

Why: torch's fp32 SDPA on the CPU is a flash kernel over MKL-class micro-GEMMs that runs at
~90 % of MKL's sgemm rate (~210 GFLOP/s on this project's 2-core AMD EPYC, where MKL takes its
AVX2 path), while oneDNN's fp32 GEMM reaches ~400-470 there on the score-sized GEMMs
(Nq x Nk x D). Two GEMMs and one fused row pass in between beat the fused kernel, the more the
longer the sequence (see attention_cpu.py for the measured table).

Forward, per head: s = q k^T (oneDNN), one fused pass (scale, causal/key masks, softmax, lse,
written over s), out = p v (oneDNN). Backward, per head, on TRANSPOSED blocks [Nk, Nq]:
s^T = k q^T and dp^T = v dout^T, then one elementwise pass (csrc/cpu/attention_fp32.cpp) makes
p^T = exp(scale s^T - lse) and ds^T = p^T (dp^T - delta) scale with delta = rowsum(dout * out)
computed up front (as FlashAttention's backward does: no reduction along a block row is left).
Why transposed: dv = p^T dout and dk = ds^T q then read row-major blocks (oneDNN's fp32 GEMM runs
~3x slower with a transposed first operand: 0.94 vs 0.29 ms at 1024 x 1024 x 64), and
dq^T = k^T ds^T reads ds^T as a transposed weight, which costs ~1.6x, not 3x.

Exact fp32 throughout (oneDNN's default fp32 math mode is strict IEEE: no TF32/BF16 shortcuts);
the sums run in another order than torch's, so results differ from SDPA by fp32 rounding only.
Memory: one head's [Nq, Nk] (forward) or two [Nk, Nq] (backward) fp32 blocks at a time, within
attention_cpu.SCORE_BYTES (variant() sends larger heads to torch's fused kernel).
"""
import torch

from genfast import _native
from genfast.ops._common import DTYPE_CODE, unit_last
from genfast.ops.linear import gemm_nt  # the "onednn" way's GEMMs are genfast.ops.linear's

_FP32 = DTYPE_CODE[torch.float32]


def _mask_ptr(mask, bi):
    return mask[bi].data_ptr() if mask is not None else 0


def forward(q, k, v, mask, causal, scale, out):
    """Writes out [B, H, Nq, D] (any strides); returns (out, lse [B, H, Nq] fp32, +inf on rows with
    no key). mask: None or the key padding mask as contiguous uint8 [B, Nk]."""
    mod = _native.module("_C")
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    for bi in range(b):
        for hi in range(h):
            s = gemm_nt(q[bi, hi], k[bi, hi])  # [Nq, Nk]
            mod.attn_softmax_rows(s.data_ptr(), s.data_ptr(), 1, nq, nk, heads=1, q0=0, scale=scale, causal=causal,
                                  mask=_mask_ptr(mask, bi), mask_bs=0, lse=lse[bi, hi].data_ptr(), lse_gs=nq,
                                  dtype=_FP32)
            out[bi, hi].copy_(gemm_nt(s, v[bi, hi].t()))
    return out, lse


def backward(dout, q, k, v, out, lse, mask, causal, scale, grads):
    """Writes grads = (dq, dk, dv) (preallocated, any strides) and returns them. lse as forward()
    (or torch's fused kernel) returned it; mask as in forward()."""
    mod = _native.module("_C")
    dq, dk, dv = grads
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    # delta = rowsum(dout * out) = rowsum(p * dp) per query row; 0 on rows with no key (out = 0 there)
    delta = torch.linalg.vecdot(dout, out).contiguous()
    lse = lse.contiguous()
    for bi in range(b):
        for hi in range(h):
            qh, kh, vh, doh = q[bi, hi], k[bi, hi], v[bi, hi], dout[bi, hi]
            st = gemm_nt(kh, qh)  # [Nk, Nq]: s^T, becomes p^T
            dpt = gemm_nt(vh, doh)  # [Nk, Nq]: dp^T, becomes ds^T
            mod.attn_softmax_bwd_cols(st.data_ptr(), dpt.data_ptr(), nk, nq, 0, scale, causal, _mask_ptr(mask, bi),
                                      lse[bi, hi].data_ptr(), delta[bi, hi].data_ptr())
            dv[bi, hi].copy_(gemm_nt(st, doh.t()))  # p^T dout
            dk[bi, hi].copy_(gemm_nt(dpt, qh.t()))  # ds^T q
            dq[bi, hi].copy_(gemm_nt(kh.t(), dpt.t()).t())  # (k^T ds^T)^T = ds k
    return dq, dk, dv


# ---------------------------------------------------------------------------- the "small" way
# All heads in ONE C++ call (csrc/cpu/attention_fp32_small.cpp): OpenMP over (batch, head), each
# head's GEMMs single-threaded on an AVX-512 register-blocked micro-kernel, query rows in blocks
# that keep a thread's scores near its core's L2. Beats "onednn" clearly on short sequences, where
# per-head oneDNN calls (~11 us each, 2 a head forward, 5 backward) and two threads splitting each
# small GEMM cost more than oneDNN's faster GEMMs save, and ties it on long ones (measured,
# attention_cpu.py); needs no score budget beyond its blocks, and skips the keys after a causal
# block's last row. Same numerics as "onednn": fp32 FMAs, softmax in fp32, lse / delta in fp32.


def _probe(name):
    try:
        return bool(getattr(_native.module("_C"), name)())
    except Exception:  # noqa: BLE001 -- genfast._C missing or older: the other ways serve
        return False


# at import: variant() asks under torch.compile too, which cannot trace pybind
_SMALL = _probe("attn_small_supported")
# The CPU gives this process AMX-BF16 tiles (Intel Xeon from Sapphire Rapids on).
AMX_AVAILABLE = _probe("attn_amx_supported")
# bf16 "small" kernels on AMX tiles where available (csrc/cpu/attention_bf16_amx.cpp); False: on
# AVX-512 BF16 dot products (attention_bf16_small.cpp) everywhere. The same algorithm and rounding.
USE_AMX = True


def small_available():
    """genfast._C has the "small" kernels and this CPU runs them (AVX-512 with BF16)."""
    return _SMALL


def small_supports(dtype, d):
    """The "small" way serves this dtype and head dim here: fp32 any; bf16 an even head dim (its
    dot products read q, k and dout rows as pairs of elements)."""
    return _SMALL and (dtype == torch.float32 or (dtype == torch.bfloat16 and d % 2 == 0))


def _spec_in(t):
    return [t.data_ptr(), *t.stride()]


def _spec_out(t):
    assert t.stride(-1) == 1, "outputs need a unit last stride"
    return [t.data_ptr(), *t.stride()[:3]]


def block_rows(nq, nk, block_bytes, row_bytes=8):
    """Query rows per block of the "small" way: its thread's per-row blocks (row_bytes per key: fp32
    two [rows, Nk] fp32 blocks; bf16 18, see small_forward) within block_bytes (at least one row)."""
    rows = max(1, min(nq, block_bytes // (row_bytes * max(1, nk))))
    return rows // 32 * 32 if rows < nq and rows >= 32 else rows  # AMX tiles take 16 / 32 rows


def _small_args(q, k, v, mask, causal, scale, block_bytes):
    """The arguments both "small" kernels start with: sizes and rows per block, scale, causal, the
    mask's pointer and batch stride (0, 0 without one), q, k, v."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    row_bytes = 8 if q.dtype == torch.float32 else 18
    return ([b, h, nq, nk, d, block_rows(nq, nk, block_bytes, row_bytes)], scale, causal,
            mask.data_ptr() if mask is not None else 0, mask.stride(0) if mask is not None else 0,
            _spec_in(q), _spec_in(k), _spec_in(v))


# bf16 (csrc/cpu/attention_bf16_small.cpp): the same structure on AVX-512 BF16 dot products, which
# read q, k, v and dout rows as element pairs (unit last strides: other layouts are copied first).
# Per query row of a block a thread holds 18 bytes per key: fp32 scores and dp, bf16 ds, and p^T /
# ds^T written pair-interleaved for the dv / dk GEMMs. Scores and softmax in fp32; p and ds rounded
# to bf16 for the GEMMs that read them (as plain bf16 PyTorch). p_keep: a [B*H, Nq, Nk] bf16 buffer
# the forward fills with p (normalised) and the backward reads instead of recomputing q k^T.


def small_forward(q, k, v, mask, causal, scale, out, block_bytes, p_keep=None):
    """As forward(), all heads in one call (fp32 or bf16). out needs a unit last stride; each thread
    holds at most block_bytes of score blocks (and keeps them for the next call)."""
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if q.dtype == torch.bfloat16:
        q, k, v = unit_last(q), unit_last(k), unit_last(v)
    _native.module("_C").attn_small_forward(*_small_args(q, k, v, mask, causal, scale, block_bytes), _spec_out(out),
                                            lse.data_ptr(), DTYPE_CODE[q.dtype],
                                            p_keep.data_ptr() if p_keep is not None else 0, USE_AMX)
    return out, lse


def small_backward(dout, q, k, v, out, lse, mask, causal, scale, grads, block_bytes, p=None):
    """As backward(), all heads in one call (dk, dv summed over the query blocks in fp32). grads need
    unit last strides; p: the forward's p_keep (None: recomputed from lse). fp32 takes delta =
    rowsum(dout * out) per row from out; bf16 sums p dp in its own rows."""
    lse, out = lse.contiguous(), unit_last(out)
    if q.dtype == torch.bfloat16:
        dout, q, k, v = (unit_last(t) for t in (dout, q, k, v))
    _native.module("_C").attn_small_backward(*_small_args(q, k, v, mask, causal, scale, block_bytes), _spec_in(dout),
                                             lse.data_ptr(), _spec_in(out),
                                             p.data_ptr() if p is not None else 0, *[_spec_out(t) for t in grads],
                                             DTYPE_CODE[q.dtype], USE_AMX)
    return tuple(grads)
