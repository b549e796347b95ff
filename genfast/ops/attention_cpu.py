"""The 'cpu' backend of genfast.attention, built on torch's own CPU ops (measured fastest here).

Two ways, picked per dtype (benchmarks/test_attention.py measured them on the 2-core AVX-512
machine against SDPA and the plain matmul-softmax-matmul):

  "sdpa"    torch's fused CPU flash kernel (aten::_scaled_dot_product_flash_attention_for_cpu and
            its backward), which already returns the fp32 log-sum-exp. Used for fp32 and fp16.
  "blocked" query blocks of plain batched matmuls in the input dtype (oneDNN's bf16 GEMMs run on
            the AVX-512 BF16 units, ~4x the fp32 rate), softmax and log-sum-exp in fp32, the
            Nq x Nk scores only ever one block of queries at a time. Used for bf16. As in plain
            PyTorch bf16 code, q k^T leaves the GEMM rounded to bf16 (fp32 accumulation inside);
            the tolerance tests hold it to 2x the error of plain bf16 PyTorch.

A C++ flash kernel was not written: it would have to beat these GEMMs (see the closing note of
issue 4, part 3). Both ways accept any strides; the fused kernel needs a unit last-dim stride
(it reads garbage otherwise, torch 2.13), so such views are copied first.
"""
import torch

# Which way per dtype (see the module docstring).
VARIANT = {torch.float32: "sdpa", torch.float16: "sdpa", torch.bfloat16: "blocked"}
# Bytes of fp32 scores a block of queries may hold: a few L2s, so the matmul stays efficient.
BLOCK_BYTES = 8 << 20


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _additive_mask(mask, dtype):
    # [B, 1, 1, Nk]: 0 where a key is real, -inf on padding (the fused kernel wants q's dtype).
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None, None, :]


def _block_rows(q, nk):
    b, h = q.shape[:2]
    return max(16, min(q.shape[2], BLOCK_BYTES // max(1, b * h * nk * 4)))


def _allowed(q0, q1, nk, causal, mask, device):
    """Bool [B or 1, 1, q1 - q0, Nk] for query rows q0..q1, or None when nothing is masked."""
    allowed = None
    if causal:
        rows = torch.arange(q0, q1, device=device)[:, None]
        allowed = (torch.arange(nk, device=device)[None, :] <= rows)[None, None]
    if mask is not None:
        m = mask[:, None, None, :]
        allowed = m if allowed is None else allowed & m
    return allowed


def _scores(qb, kt, q0, causal, mask, scale):
    s = torch.matmul(qb, kt).float().mul_(scale)  # [B, H, bq, Nk] fp32
    allowed = _allowed(q0, q0 + qb.shape[2], kt.shape[-1], causal, mask, qb.device)
    return s if allowed is None else s.masked_fill_(~allowed, float("-inf"))


def forward(q, k, v, mask, causal, scale, fully_masked):
    """(out [B, H, Nq, D] contiguous in q's dtype, lse [B, H, Nq] fp32 with +inf on fully masked rows)."""
    if VARIANT.get(q.dtype) == "sdpa":
        am = _additive_mask(mask, q.dtype) if mask is not None else None
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            _unit_last(q), _unit_last(k), _unit_last(v), 0.0, causal, attn_mask=am, scale=scale)
        out, lse = out.contiguous(), lse.contiguous()
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        kt = k.transpose(-1, -2)
        bq = _block_rows(q, k.shape[2])
        for q0 in range(0, q.shape[2], bq):
            s = _scores(q[:, :, q0:q0 + bq], kt, q0, causal, mask, scale)
            lse_b = torch.logsumexp(s, -1)  # -inf on fully masked rows
            p = s.sub_(lse_b.nan_to_num(neginf=0.0)[..., None]).exp_()  # masked -> exp(-inf) = 0
            torch.matmul(p.to(q.dtype), v, out=out[:, :, q0:q0 + bq])
            lse[:, :, q0:q0 + bq] = lse_b
    if fully_masked is not None:
        out.masked_fill_(fully_masked[..., None], 0.0)
        lse = lse.masked_fill(fully_masked, float("inf"))
    return out, lse


def backward(dout, q, k, v, out, lse, mask, causal, scale):
    """(dq, dk, dv), contiguous, in q's dtype. lse as forward() returned it."""
    if VARIANT.get(q.dtype) == "sdpa":
        am = _additive_mask(mask, q.dtype) if mask is not None else None
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            _unit_last(dout), _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(out), lse, 0.0, causal,
            attn_mask=am, scale=scale)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    dt = q.dtype
    dq = torch.empty(q.shape, dtype=dt, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)  # sums over query blocks in fp32
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
    bq = _block_rows(q, k.shape[2])
    for q0 in range(0, q.shape[2], bq):
        q1 = q0 + bq
        qb, dob = q[:, :, q0:q1], dout[:, :, q0:q1]
        p = _scores(qb, kt, q0, causal, mask, scale).sub_(lse[:, :, q0:q1, None]).exp_()  # +inf lse -> 0
        dv += torch.matmul(p.to(dt).transpose(-1, -2), dob).float()
        dp = torch.matmul(dob, vt).float()
        # rowsum(p * dp), not rowsum(dout * out): dp left the bf16 GEMM rounded, and the same
        # rounded dp on both sides keeps ds exact where it must vanish (a single key, p = 1).
        ds = dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p).mul_(scale).to(dt)
        torch.matmul(ds, k, out=dq[:, :, q0:q1])
        dk += torch.matmul(ds.transpose(-1, -2), qb).float()
    return dq, dk.to(dt), dv.to(dt)
