"""The CPU attention ways on torch's batched GEMMs ("heads" and "rows", see attention_cpu.py, whose
variant() picks them and whose forward() / backward() call these), around genfast._C's fused
softmax rows (csrc/cpu/attention.cpp). score_bytes bounds the score buffers (attention_cpu.SCORE_BYTES);
scores(shape, dtype, device) is attention_cpu's kept-buffer context manager.
"""
import torch

from genfast import _native
from genfast.ops._common import DTYPE_CODE


def rows_pass(kernel, bufs, groups, rows, nk, *, heads, q0, g0, m, scale, causal, lse, lse_gs, dtype):
    """One fused row pass of genfast._C's `kernel` (attn_softmax_rows or attn_softmax_bwd_rows) over
    [groups, rows, nk] score buffers. g0: the global (b * H + h) index
    of the first group; every chunk either starts a sample or stays inside one, so the key mask of
    local group g is that of sample g0 // H + g // heads."""
    mask = m.data_ptr() + (g0 // heads) * m.stride(0) if m is not None else 0
    getattr(_native.module("_C"), kernel)(*[b.data_ptr() for b in bufs], groups, rows, nk, heads=heads, q0=q0, scale=scale, causal=causal,
       mask=mask, mask_bs=m.stride(0) if m is not None else 0, lse=lse, lse_gs=lse_gs, dtype=dtype)


def head_chunks(b, h, per_head, tensors):
    """Yields (g0, g1, views): groups of whole heads, [g1 - g0, N, D] views of each [B, H, N, D]
    tensor, at most per_head heads (>= 1). Several samples per chunk only where every tensor can be
    viewed as [B*H, N, D] without a copy; otherwise chunks stay inside one sample (strided views of
    one qkv projection are read in place by the batched GEMM)."""
    if per_head >= h:
        try:
            flat = [t.view(b * h, *t.shape[2:]) for t in tensors]
        except RuntimeError:  # not viewable: one sample at a time
            flat = None
        if flat is not None:
            step = (per_head // h) * h
            for g0 in range(0, b * h, step):
                g1 = min(b * h, g0 + step)
                yield g0, g1, [t[g0:g1] for t in flat]
            return
    step = min(per_head, h)
    for bi in range(b):
        for h0 in range(0, h, step):
            h1 = min(h, h0 + step)
            yield bi * h + h0, bi * h + h1, [t[bi, h0:h1] for t in tensors]


def forward_heads(q, k, v, out, m, lse, per_head, common, scores):
    # chunks of heads even when p is kept whole: each chunk's s -> p -> p v runs while it is in cache
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    for g0, g1, (qc, kc, vc, oc) in head_chunks(b, h, per_head, (q, k, v, out)):
        s = scores(g0, g1)
        torch.bmm(qc, kc.transpose(1, 2), out=s)
        rows_pass("attn_softmax_rows", (s, s), g1 - g0, nq, nk, heads=h, q0=0, g0=g0, m=m,
              lse=lse[g0].data_ptr(), lse_gs=nq, **common)
        if oc.is_contiguous() or oc.dtype == torch.bfloat16:
            torch.bmm(s, vc, out=oc)
        else:  # fp32/fp16 bmm into a strided view is a naive loop (see backward())
            oc.copy_(torch.bmm(s, vc))


def forward_rows(q, k, v, m, out, lse, common, score_bytes):
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    kt = k.transpose(-1, -2)
    bq = max(16, min(nq, score_bytes // max(1, b * h * nk * q.element_size())))
    for q0 in range(0, nq, bq):
        s = torch.matmul(q[:, :, q0:q0 + bq], kt)  # [B, H, bq, Nk] contiguous, q's dtype
        rows_pass("attn_softmax_rows", (s, s), b * h, s.shape[2], nk, heads=h, q0=q0, g0=0, m=m,
              lse=lse[:, q0:].data_ptr(), lse_gs=nq, **common)
        out[:, :, q0:q0 + s.shape[2]] = torch.matmul(s, v)


def backward_heads(dout, q, k, v, lse, m, common, score_bytes, scores):
    """The "heads" backward from lse: per chunk of heads, s = q k^T and dp = dout v^T, one fused pass
    makes p and ds over them, then dv = p^T dout, dq = ds k, dk = ds^T q straight into the gradients."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    dq, dk, dv = (torch.empty(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    per_head = max(1, score_bytes // (2 * nq * nk * q.element_size()))
    with scores((2, min(per_head, b * h), nq, nk), q.dtype, q.device) as bufs:
        for g0, g1, (qc, kc, vc, doc, dqc, dkc, dvc) in head_chunks(b, h, per_head, (q, k, v, dout, dq, dk, dv)):
            s, dp = bufs[0, :g1 - g0], bufs[1, :g1 - g0]
            torch.bmm(qc, kc.transpose(1, 2), out=s)
            torch.bmm(doc, vc.transpose(1, 2), out=dp)
            rows_pass("attn_softmax_bwd_rows", (s, dp, s, dp), g1 - g0, nq, nk, heads=h, q0=0, g0=g0, m=m,
                  lse=lse.view(b * h, nq)[g0].data_ptr(), lse_gs=nq, **common)
            p, ds = s, dp
            torch.bmm(p.transpose(1, 2), doc, out=dvc)
            torch.bmm(ds, kc, out=dqc)
            torch.bmm(ds.transpose(1, 2), qc, out=dkc)
    return dq, dk, dv


def backward_from_p(dout, q, k, v, p, scale, score_bytes, scores):
    """The "heads" backward with p kept: dp = dout v^T, ds from p and dp in one pass (written over
    dp), then the three gradient GEMMs; one score buffer (score_bytes) besides p."""
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    pf = p.view(b * h, nq, nk)
    dq, dk, dv = (torch.empty(t.shape, dtype=q.dtype, device=q.device) for t in (q, k, v))
    per_head = max(1, score_bytes // (nq * nk * q.element_size()))
    with scores((min(per_head, b * h), nq, nk), q.dtype, q.device) as buf:
        for g0, g1, (qc, kc, vc, doc, dqc, dkc, dvc) in head_chunks(b, h, per_head, (q, k, v, dout, dq, dk, dv)):
            pc, dp = pf[g0:g1], buf[:g1 - g0]
            torch.bmm(doc, vc.transpose(1, 2), out=dp)
            # from_p: no mask, causal or lse needed (p is 0 where they apply); p is only read
            _native.module("_C").attn_softmax_bwd_rows(pc.data_ptr(), dp.data_ptr(), 0, dp.data_ptr(), g1 - g0, nq, nk, heads=h, q0=0,
                                      scale=float(scale), causal=False, mask=0, mask_bs=0, lse=0, lse_gs=nq,
                                      dtype=DTYPE_CODE[q.dtype], from_p=True)
            torch.bmm(pc.transpose(1, 2), doc, out=dvc)
            torch.bmm(dp, kc, out=dqc)
            torch.bmm(dp.transpose(1, 2), qc, out=dkc)
    return dq, dk, dv


def backward_rows(dout, q, k, v, lse, m, common, score_bytes):
    dt = q.dtype
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    dq = torch.empty(q.shape, dtype=dt, device=q.device)
    dk = dv = None  # sums over query blocks, fp32 when there is more than one block
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
    bq = max(16, min(nq, score_bytes // max(1, 2 * b * h * nk * q.element_size())))
    for q0 in range(0, nq, bq):
        qb, dob = q[:, :, q0:q0 + bq], dout[:, :, q0:q0 + bq]
        s, dp = torch.matmul(qb, kt), torch.matmul(dob, vt)  # [B, H, bq, Nk] contiguous
        rows_pass("attn_softmax_bwd_rows", (s, dp, s, dp), b * h, s.shape[2], nk, heads=h, q0=q0, g0=0, m=m,
              lse=lse[:, :, q0:].data_ptr(), lse_gs=nq, **common)
        p, ds = s, dp
        torch.matmul(ds, k, out=dq[:, :, q0:q0 + bq])
        dv_b, dk_b = torch.matmul(p.transpose(-1, -2), dob), torch.matmul(ds.transpose(-1, -2), qb)
        if dk is None:
            dk, dv = (dk_b, dv_b) if q0 + bq >= nq else (dk_b.float(), dv_b.float())
        else:
            dk += dk_b
            dv += dv_b
    return dq, dk.to(dt).contiguous(), dv.to(dt).contiguous()
