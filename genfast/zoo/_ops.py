"""The one seam through which every zoo model reaches the hot-path ops.

Each name forwards to the genfast op when the installed genfast has it (`genfast.<name>`, else
`genfast.ops.<name>`), and otherwise to the plain-PyTorch implementation below, written with the
op's public signature. So a model written against this module runs today and picks up each fused
kernel the moment its op is merged, with no change to the model. `which()` says which is which.

`use_genfast(False)` (or GENFAST_ZOO_OPS=eager) makes every name use the plain-PyTorch version:
that is "the same model in eager PyTorch" the benchmarks compare against.
"""
import contextlib
import math
import os

import torch
import torch.nn.functional as F

import genfast
from genfast.ops import gelu as _gelu
from genfast.ops import linear as _linear
from genfast.ops import qkv as _qkv

NAMES = ("attention", "adaln_modulate", "gated_residual", "reparam_kl", "reparam_kl_moments", "vector_quantize",
         "flow_euler_step")

_state = {"genfast": os.environ.get("GENFAST_ZOO_OPS", "").lower() != "eager"}


def _genfast_op(name):
    for where in (genfast, getattr(genfast, "ops", None)):
        fn = getattr(where, name, None)
        if callable(fn):  # genfast.ops.<name> may be the op's module rather than the function
            return fn
    return None


def which():
    """{op name: "genfast" | "eager"}: where each name goes right now."""
    return {n: "genfast" if _state["genfast"] and _genfast_op(n) is not None else "eager" for n in NAMES}


@contextlib.contextmanager
def use_genfast(enabled=True):
    """Within the block, the seam uses the genfast ops (True) or the plain-PyTorch versions (False)."""
    old = _state["genfast"]
    _state["genfast"] = bool(enabled)
    try:
        yield
    finally:
        _state["genfast"] = old


def enabled():
    """True while the seam uses the genfast ops (the zoo's own fast paths follow it too)."""
    return _state["genfast"]


def _dispatch(name, eager):
    def op(*args, **kwargs):
        fn = _genfast_op(name) if _state["genfast"] else None
        return (fn or eager)(*args, **kwargs)
    op.__name__, op.__doc__, op.eager = name, eager.__doc__, eager
    return op


# ----------------------------------------------------------------------------- plain PyTorch
def _attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None):
    """softmax(q k^T * scale) v on [B, H, N, D]; key_padding_mask [B, Nk] True = a real key.
    A query that sees no key gets zeros (as genfast.attention defines it)."""
    if not (causal or key_padding_mask is not None):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    nq, nk = q.shape[-2], k.shape[-2]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(torch.bool)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return torch.where(allowed.any(-1, keepdim=True), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _per_sample(t, x):
    return t.unsqueeze(1) if t.dim() == 2 and x.dim() == 3 else t


def _adaln_modulate(x, shift, scale, *, eps=1e-6, norm="layer"):
    """norm(x, no affine) * (1 + scale) + shift; x [B, N, C], shift/scale [B, C] or [B, N, C]."""
    if norm == "layer":
        h = F.layer_norm(x, x.shape[-1:], eps=eps)
    elif norm == "rms":
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    h = h * (1 + _per_sample(scale, x))
    return h if shift is None else h + _per_sample(shift, x)


def _gated_residual(x, gate, y):
    """x + gate * y; gate [B, C] (per sample) or [B, N, C]."""
    return x + _per_sample(gate, x) * y


def _reparam_kl(mu, logvar, *, generator=None, noise=None, reduction="per_sample"):
    """z = mu + exp(logvar / 2) * eps and KL(N(mu, exp(logvar)) || N(0, 1)); reduction
    "per_sample" sums the KL over all non-batch dims -> [B]; "sum"/"mean" over the batch; "none"."""
    logvar = logvar.clamp(-30.0, 20.0)
    eps = noise if noise is not None else torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    z = mu + torch.exp(0.5 * logvar) * eps
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)
    if reduction == "none":
        return z, kl
    per = kl.reshape(kl.shape[0], -1).sum(1)
    if reduction == "per_sample":
        return z, per
    if reduction == "sum":
        return z, per.sum()
    if reduction == "mean":
        return z, per.mean()
    raise ValueError(f"reduction must be 'per_sample', 'sum', 'mean' or 'none', got {reduction!r}")


def _reparam_kl_moments(moments, *, dim=1, generator=None, noise=None, reduction="per_sample"):
    """_reparam_kl on mu, logvar = moments.chunk(2, dim) (an encoder output holding both)."""
    mu, logvar = moments.chunk(2, dim)
    return _reparam_kl(mu, logvar, generator=generator, noise=noise, reduction=reduction)


def _vector_quantize(z, codebook, *, beta=0.25):
    """(z_q with straight-through gradient, int64 indices [...], codebook + beta * commitment loss)
    for z [..., D] and codebook [K, D]."""
    flat = z.reshape(-1, z.shape[-1])
    d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None])
    indices = d.argmin(1).reshape(z.shape[:-1])
    q = codebook[indices]
    loss = F.mse_loss(q, z.detach()) + beta * F.mse_loss(z, q.detach())
    return z + (q - z).detach(), indices, loss


def _flow_euler_step(x, v_cond, v_uncond=None, *, dt, guidance=0.0, out=None):
    """x - dt * ((1 + w) v_cond - w v_uncond) (v_uncond None: x - dt * v_cond)."""
    v = v_cond if v_uncond is None else (1 + guidance) * v_cond - guidance * v_uncond
    r = x - dt * v
    return r if out is None else out.copy_(r)


attention = _dispatch("attention", _attention)
adaln_modulate = _dispatch("adaln_modulate", _adaln_modulate)
gated_residual = _dispatch("gated_residual", _gated_residual)
reparam_kl = _dispatch("reparam_kl", _reparam_kl)
reparam_kl_moments = _dispatch("reparam_kl_moments", _reparam_kl_moments)
vector_quantize = _dispatch("vector_quantize", _vector_quantize)
flow_euler_step = _dispatch("flow_euler_step", _flow_euler_step)


def gelu_tanh(x):
    """GELU with the tanh approximation: through the seam genfast's op (one vectorised C++ pass on
    the CPU; torch's CPU kernel for it is slow, genfast/ops/gelu.py), else F.gelu(approximate="tanh")."""
    if not _state["genfast"]:
        return F.gelu(x, approximate="tanh")
    return _gelu.gelu_tanh(x) if x.requires_grad and torch.is_grad_enabled() else _gelu.gelu_tanh_inference(x)


def qkv_projection(x, layer, num_heads):
    """[3, B, H, N, D] views of one fused qkv projection (genfast.ops.qkv: rows laid out for
    genfast.attention on GPUs), else of layer(x) as plain PyTorch."""
    if not _state["genfast"]:
        b, n, _ = x.shape
        return layer(x).view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return _qkv.qkv_projection(x, layer, num_heads)


def linear(x, layer):
    """layer(x) for an nn.Linear: through the seam genfast.ops.linear (oneDNN's fp32 GEMM on the
    CPU, where torch's BLAS is ~2x slower on AMD CPUs), else the layer itself."""
    if not _state["genfast"]:
        return layer(x)
    return _linear.linear_layer(layer, x)




def timestep_features(t, dim, max_period=10000.0):
    """Sinusoidal features [B, dim] of t [B] (DiT's TimestepEmbedder frequencies)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=-1)
