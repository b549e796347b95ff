"""The CUDA flash attention (csrc/cuda/attention.cu, attention_bwd.cu) for genfast.ops.attention:
what it supports and the calls through the raw bindings of genfast._cuda (CUDA tensors, launched on
the current stream) or genfast._cuda_emu (CPU tensors through the emulation, for tests).

    reasons(backend, device_type, dtype, head_dim) -> [str]   empty: the kernel runs this case
    forward(backend, q, k, v, mask, causal, scale, out=None) -> (out [B, H, Nq, D], lse fp32 [B, H, Nq])
        out: a preallocated [B, H, Nq, D] of any strides (e.g. [B, Nq, H, D] memory); else contiguous
    backward(backend, dout, q, k, v, out, lse, mask, causal, scale) -> (dq, dk, dv) contiguous

Conventions as genfast/ops/attention.py: causal top-left aligned, key_padding_mask bool [B, Nk]
(True = attend), lse natural log with +inf for a row that sees no key (its output and gradients are
zeros). q/k/v may have any batch / head / token strides (views of one qkv projection are read in
place); a head dim that is not contiguous is copied first (same numbers).
"""
import contextlib

import torch

from genfast import _native, backends
from genfast.ops._common import cuda_stream, unit_last

MAX_HEAD_DIM = 128
_CODES = {torch.float16: 1, torch.bfloat16: 2}
_DEVICE = {"cuda": "cuda", "cuda_emu": "cpu"}  # the device type each backend runs on


def reasons(backend, device_type, dtype, head_dim):
    name = _native.MODULE_OF[backend]
    why = backends.module_reasons(name, device_type, _DEVICE[backend])
    if not why and not hasattr(_native.module(name), "attention_fwd"):
        why.append(f"genfast.{name} was built without the attention kernels")
    if dtype not in _CODES:
        why.append(f"dtype {dtype} is not supported by the CUDA attention (fp16, bf16 only: no fp32 tensor-core "
                   "path; triton / cpu serve fp32)")
    if head_dim > MAX_HEAD_DIM:
        why.append(f"head dim {head_dim} > {MAX_HEAD_DIM} is not supported by the CUDA attention")
    return why


def _stream(t):
    return cuda_stream(t) if t.is_cuda else 0


def _on_device(t):
    """The kernels launch on the current CUDA device: make it t's (q on cuda:1 with cuda:0 current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _mask_args(mask):
    if mask is None:
        return 0, (0, 0), None
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m.data_ptr(), tuple(m.stride()), m


def forward(backend, q, k, v, mask, causal, scale, out=None):
    q, k, v = (unit_last(t) for t in (q, k, v))
    b, h, nq, d = q.shape
    if out is None:
        out = torch.empty((b, h, nq, d), dtype=q.dtype, device=q.device)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be [B, H, Nq, D] = {list(q.shape)} in {q.dtype} with a contiguous head dim")
    lse = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)
    mptr, mstr, _keep = _mask_args(mask)
    with _on_device(q):
        _native.for_backend(backend).attention_fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), mptr, *q.stride()[:3],
            *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mstr, b, h, nq, k.shape[2], d, float(scale),
            bool(causal), _CODES[q.dtype], _stream(q))
    return out, lse


def backward(backend, dout, q, k, v, out, lse, mask, causal, scale):
    q, k, v, dout = (unit_last(t) for t in (q, k, v, dout))
    b, h, nq, d = q.shape
    out = unit_last(out)
    delta = torch.empty((b, h, nq), dtype=torch.float32, device=q.device)  # rowsum(dO * O), by the first kernel
    lse = lse.to(torch.float32).contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    mptr, mstr, _keep = _mask_args(mask)
    with _on_device(q):
        _native.for_backend(backend).attention_bwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), dout.data_ptr(), lse.data_ptr(), delta.data_ptr(),
            out.data_ptr(), out.stride()[:3], dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), mptr, q.stride()[:3],
            k.stride()[:3], v.stride()[:3], dout.stride()[:3], dq.stride()[:3], dk.stride()[:3], dv.stride()[:3],
            mstr, b, h, nq, k.shape[2], d, float(scale), bool(causal), _CODES[q.dtype], _stream(q))
    return dq, dk, dv
