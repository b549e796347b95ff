"""The 'cpu' backend of genfast.attention: torch's own GEMMs around genfast's fused softmax rows.

Two ways, picked per dtype (measured on the 2-core AVX-512 machine, benchmarks/test_attention.py):

  "sdpa"    torch's fused CPU flash kernel (aten::_scaled_dot_product_flash_attention_for_cpu and
            its backward), which already returns the fp32 log-sum-exp.
  "blocked" blocks of query rows: s = q k^T by torch's batched GEMM in the input dtype (oneDNN's
            bf16 GEMMs run on the AVX-512 BF16 units, ~4x the fp32 rate), then ONE fused C++ pass
            per score row (csrc/cpu/attention.cpp: scale, causal and key masks, softmax in fp32,
            log-sum-exp) writing p over s in place, then p v by the GEMM. The plain path spends
            its time in the passes between the GEMMs (scale, softmax: two round trips over
            Nq x Nk); this keeps one, and the scores of one block of queries at a time. As in
            plain PyTorch bf16 code, q k^T leaves the GEMM rounded to bf16 and p is rounded to
            bf16 before p v (as FlashAttention does on GPUs); the tests hold it to 2x the error
            of plain bf16 PyTorch. The backward is the same with one fused pass for
            p = exp(s - lse) and ds = p (dp - rowsum(p dp)) scale.

Any strides are accepted; the fused aten kernel needs a unit last-dim stride (it reads garbage
otherwise, torch 2.13), so such views are copied first.
"""
import torch

from genfast import _native
from genfast.ops._common import DTYPE_CODE

# Which way per dtype (see the module docstring).
VARIANT = {torch.float32: "sdpa", torch.float16: "sdpa", torch.bfloat16: "blocked"}
# Bytes of scores a block of queries may hold (all heads): big GEMMs, bounded memory.
BLOCK_BYTES = 32 << 20


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _additive_mask(mask, dtype):
    # [B, 1, 1, Nk]: 0 where a key is real, -inf on padding (the fused kernel wants q's dtype).
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None, None, :]


def _block_rows(q, nk):
    b, h = q.shape[:2]
    return max(16, min(q.shape[2], BLOCK_BYTES // max(1, b * h * nk * q.element_size())))


def _rows_args(q, k, mask, causal, scale, lse, q0):
    b, h, nq, _ = q.shape
    m = mask.contiguous().view(torch.uint8) if mask is not None else None
    return dict(heads=h, q0=q0, scale=float(scale), causal=bool(causal), mask=m.data_ptr() if m is not None else 0,
                mask_bs=m.stride(0) if m is not None else 0, lse=lse[:, :, q0:].data_ptr(), lse_gs=nq,
                dtype=DTYPE_CODE[q.dtype])


def forward(q, k, v, mask, causal, scale, fully_masked, out):
    """Writes out [B, H, Nq, D] (genfast.ops' layout for this dtype); returns (out, lse [B, H, Nq]
    fp32 contiguous, +inf on fully masked rows)."""
    if VARIANT.get(q.dtype) == "sdpa":
        am = _additive_mask(mask, q.dtype) if mask is not None else None
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _unit_last(q), _unit_last(k), _unit_last(v), 0.0, causal, attn_mask=am, scale=scale)
        out = o if o.stride() == out.stride() else out.copy_(o)
        lse = lse.contiguous()
        if fully_masked is not None:
            out.masked_fill_(fully_masked[..., None], 0.0)
            lse = lse.masked_fill(fully_masked, float("inf"))
        return out, lse
    mod = _native.module("_C")
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    kt = k.transpose(-1, -2)
    bq = _block_rows(q, nk)
    for q0 in range(0, nq, bq):
        s = torch.matmul(q[:, :, q0:q0 + bq], kt)  # [B, H, bq, Nk] contiguous, q's dtype
        rows = s.shape[2]
        mod.attn_softmax_rows(s.data_ptr(), s.data_ptr(), b * h, rows, nk, **_rows_args(q, k, mask, causal, scale, lse, q0))
        out[:, :, q0:q0 + rows] = torch.matmul(s, v)
    return out, lse


def backward(dout, q, k, v, out, lse, mask, causal, scale):
    """(dq, dk, dv), contiguous, in q's dtype. lse as forward() returned it."""
    if VARIANT.get(q.dtype) == "sdpa":
        am = _additive_mask(mask, q.dtype) if mask is not None else None
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out), lse, 0.0, causal,
            attn_mask=am, scale=scale)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    mod = _native.module("_C")
    dt = q.dtype
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    dq = torch.empty(q.shape, dtype=dt, device=q.device)
    dk = dv = None  # sums over query blocks, fp32 when there is more than one block
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
    bq = _block_rows(q, nk)
    for q0 in range(0, nq, bq):
        qb, dob = q[:, :, q0:q0 + bq], dout[:, :, q0:q0 + bq]
        s, dp = torch.matmul(qb, kt), torch.matmul(dob, vt)  # [B, H, bq, Nk] contiguous
        mod.attn_softmax_bwd_rows(s.data_ptr(), dp.data_ptr(), s.data_ptr(), dp.data_ptr(), b * h, s.shape[2], nk,
                                  **_rows_args(q, k, mask, causal, scale, lse, q0))
        p, ds = s, dp
        torch.matmul(ds, k, out=dq[:, :, q0:q0 + bq])
        dv_b, dk_b = torch.matmul(p.transpose(-1, -2), dob), torch.matmul(ds.transpose(-1, -2), qb)
        if dk is None:
            dk, dv = (dk_b, dv_b) if q0 + bq >= nq else (dk_b.float(), dv_b.float())
        else:
            dk += dk_b
            dv += dv_b
    return dq, dk.to(dt).contiguous(), dv.to(dt).contiguous()
