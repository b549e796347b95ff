"""Reparameterized Gaussian sample + KL to N(0, 1), one fused pass forward and one backward, the
noise from an in-kernel counter-based generator (Philox4x32-10; csrc/philox.h defines the stream):
nothing but a 16-byte (seed, offset) tensor is kept for the backward, which regenerates eps.

    lv = clamp(logvar, *logvar_clamp),  z = mu + eps * exp(lv / 2),
    kl = 0.5 * (mu^2 + exp(lv) - 1 - lv)   (= -0.5 (1 + lv - mu^2 - exp(lv)), per element)

Registered as genfast::reparam_kl (+ genfast::reparam_kl_backward), opaque ops with fakes.
"""
import math

import torch

from genfast import _native, backends, reference
from genfast.ops._common import (
    DTYPE_CODE, LIB, check_float_tensor, check_like, cuda_stream, dispatcher_needed, finite, kernel_reasons,
    backward_by_reference, graph_grads, rows_strides, transformed)

OP = "reparam_kl"
REDUCTIONS = reference.REDUCTIONS
_ARGS = "Tensor? noise, Tensor? seed, float clamp_lo, float clamp_hi, bool clamp"
LIB.define(f"reparam_kl(Tensor mu, Tensor logvar, {_ARGS}, bool per_row) -> (Tensor, Tensor)")
LIB.define(f"reparam_kl_backward(Tensor? dz, Tensor? gkl, Tensor mu, Tensor logvar, {_ARGS}) -> (Tensor, Tensor)")


def reparam_kl(mu, logvar, *, seed=None, generator=None, noise=None, reduction="per_sample", free_bits=0.0,
               logvar_clamp=(-30.0, 20.0)):
    """z = mu + eps * exp(logvar / 2) with eps ~ N(0, 1), and KL(N(mu, exp(logvar)) || N(0, 1)).

    Args:
        mu, logvar: [B, ...] of the same shape, dtype (fp32, fp16, bf16, fp64) and device; strided
            views such as the two halves of `encoder(x).chunk(2, dim=1)` are read in place.
        seed: an int (offset 0) or an (seed, offset) pair: eps is then a pure function of them
            (same z for the same seed on the same backend). None: (seed, offset) are drawn from
            `generator` (default: the device's default generator), so torch.manual_seed
            reproduces the noise; on a GPU they are drawn on the device, so CUDA-graph replays get
            fresh noise. (An int seed becomes a host-to-device copy: inside a graph capture use
            the generator instead.)
        noise: an explicit eps (same shape, dtype and device as mu; a constant, no gradient) in
            place of the generator. Excludes seed and generator.
        reduction: how the KL is summed (the conventions users mix up):
            "per_sample" (default) sum over every non-batch dim -> [B]: the KL term of each
                sample's ELBO (Kingma & Welling; diffusers' DiagonalGaussianDistribution.kl()).
            "sum": per_sample summed over the batch (a batch's total nats).
            "mean": per_sample averaged over the batch: the usual VAE loss term, and what a
                beta-VAE weight beta multiplies (Higgins et al. use the per-sample KL, batch mean).
                Per-pixel / per-dimension normalisation (dividing by C*H*W too) is
                "mean" / mu[0].numel(), a different beta scale.
            "none": element-wise KL, shape of mu.
            The KL is returned in fp32 (fp64 for fp64 inputs) whatever mu's dtype: it is a loss,
            and per-element values up to e^20 / 2 do not fit fp16.
        free_bits: >= 0 nats. Each latent dimension (an element of the non-batch dims) whose KL,
            averaged over the batch, is under free_bits counts as free_bits for every sample and
            gets no KL gradient (Kingma et al. 2016, "free bits" per dimension).
        logvar_clamp: (lo, hi) applied to logvar before use, as diffusers'
            DiagonalGaussianDistribution does with (-30, 20); its gradient is 0 outside. None: no
            clamp (exp may overflow to inf for logvar > 88). NaN policy: as torch.clamp, a NaN
            logvar stays NaN, so that element's z and KL are NaN on every backend (a diverged
            encoder shows). An output left out of the loss adds no term to the gradients (not
            0 * inf where exp overflows without a clamp).
    Returns:
        (z, kl): z in mu's dtype and shape (contiguous); kl per `reduction`. The math is fp32, so
        the KL and the gradients stay finite at logvar +-50 in every dtype; z itself is stored in
        mu's dtype: in fp16 it overflows where |eps| exp(hi / 2) > 65504 (hi = 20: |eps| > 2.97),
        a limit of fp16's range (bf16 has fp32's).
    Math in fp32. Backends: the C++ CPU kernel and the emulated CUDA kernel draw the same Philox
    words and the same polynomial Box-Muller (normals equal to a few ulp); the Triton kernel draws
    the same words but uses its own log/sin/cos (normals within ~1e-6); the reference (fp64
    inputs, or forced) computes them in fp64 from the same words.
    """
    return _reparam_kl(mu, logvar, None, seed, generator, noise, reduction, free_bits, logvar_clamp)


def reparam_kl_moments(moments, *, dim=1, seed=None, generator=None, noise=None, reduction="per_sample",
                       free_bits=0.0, logvar_clamp=(-30.0, 20.0)):
    """reparam_kl(*moments.chunk(2, dim), ...) for an encoder output holding mu and logvar
    concatenated along `dim` (diffusers' DiagonalGaussianDistribution(parameters), LDM's moments):
    the same z and KL, and the gradient of `moments` written by the backward kernel straight into
    one buffer. Through reparam_kl on the chunks, autograd's split backward concatenates dmu and
    dlogvar afterwards: a second pass over both gradients (and one more op on a GPU's host).

    In eager training with a contiguous `moments` (else, and under torch.compile, it is reparam_kl on
    the chunks) the gradient reaches `moments` directly, not through chunk views of it: hooks or
    autograd.grad on such views do not see it. Arguments and returns as reparam_kl; noise has the
    shape of one half.
    """
    if not isinstance(moments, torch.Tensor):
        raise TypeError(f"moments must be a torch.Tensor, got {type(moments).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if moments.dim() < 1 or not -moments.dim() <= dim < moments.dim():
        raise ValueError(f"dim must index a dim of moments (shape {tuple(moments.shape)}), got {dim}")
    dim %= moments.dim()
    if moments.shape[dim] % 2:
        raise ValueError(f"moments must have an even size along dim {dim} (mu and logvar concatenated), "
                         f"got shape {tuple(moments.shape)}")
    mu, logvar = moments.chunk(2, dim)
    return _reparam_kl(mu, logvar, (moments, dim), seed, generator, noise, reduction, free_bits, logvar_clamp)


def _reparam_kl(mu, logvar, moments, seed, generator, noise, reduction, free_bits, logvar_clamp):
    """reparam_kl; moments: None, or (h, dim) when mu and logvar are h.chunk(2, dim)."""
    _check(mu, logvar, noise, reduction, free_bits, logvar_clamp)
    if noise is not None and (seed is not None or generator is not None):
        raise ValueError("noise replaces the generator: pass either noise or seed/generator, not both")
    seed_t = None if noise is not None else _seed_tensor(seed, generator, mu.device)
    if transformed():  # torch.func / forward-mode AD: the reference on the same noise (genfast.ops._common)
        eps = noise if noise is not None else _regen_eps(mu, seed_t)
        return reference.reparam_kl(mu, logvar, noise=eps, reduction=reduction, free_bits=free_bits,
                                    logvar_clamp=logvar_clamp)
    lo, hi = (float(logvar_clamp[0]), float(logvar_clamp[1])) if logvar_clamp is not None else (0.0, 0.0)
    clamp = logvar_clamp is not None
    per_row = reduction != "none" and free_bits == 0
    args = (mu, logvar, noise, seed_t, lo, hi, clamp, per_row)
    if _plain_eager(mu, logvar, noise):
        if not torch.is_grad_enabled():
            z, kl = _forward(*args)
        elif moments is not None and _one_gradient_buffer(moments[0], mu, logvar):
            z, kl = _ReparamKLMoments.apply(moments[0], moments[1], *args[2:])
        else:
            z, kl = _ReparamKL.apply(*args)
    else:
        z, kl = torch.ops.genfast.reparam_kl(*args)
    if free_bits > 0:
        if kl.numel() > 0:
            keep = kl.mean(0, keepdim=True) >= free_bits
            kl = torch.where(keep, kl, torch.full_like(kl, free_bits))
        if reduction != "none" and kl.dim() > 1:
            kl = kl.flatten(1).sum(1)
    if reduction == "sum":
        kl = kl.sum()
    elif reduction == "mean":
        kl = kl.mean()
    return z, kl


def _plain_eager(*tensors):
    """True when the dispatcher would add nothing but cost: then eager calls skip torch.ops.genfast.*
    (whose register_autograd path costs ~40 us a call in Python) for an autograd.Function running the
    same forward and backward; everything else takes the registered op."""
    return not dispatcher_needed(*tensors)


def _check(mu, logvar, noise, reduction, free_bits, logvar_clamp):
    check_float_tensor("mu", mu)
    check_float_tensor("logvar", logvar)
    check_like("logvar", logvar, "mu", mu)
    if mu.dim() == 0:
        raise ValueError("mu must have a batch dimension (at least 1-D), got a 0-d tensor")
    if noise is not None:
        check_float_tensor("noise", noise)
        check_like("noise", noise, "mu", mu)
        if noise.requires_grad:
            raise ValueError("noise is a constant of the op (no gradient flows to it): pass noise.detach()")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if isinstance(free_bits, bool) or not isinstance(free_bits, (int, float)):
        raise TypeError(f"free_bits must be a float, got {type(free_bits).__name__}")
    if not (finite(free_bits) and free_bits >= 0):
        raise ValueError(f"free_bits must be a finite float >= 0 (nats per latent dimension), got {free_bits}")
    if logvar_clamp is not None:
        ok = isinstance(logvar_clamp, (tuple, list)) and len(logvar_clamp) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in logvar_clamp)
        if not ok:
            raise TypeError(f"logvar_clamp must be None or a (lo, hi) pair of floats, got {logvar_clamp!r}")
        if not (logvar_clamp[0] <= logvar_clamp[1]) or any(v != v for v in logvar_clamp):  # NaN (v != v: see finite)
            raise ValueError(f"logvar_clamp must satisfy lo <= hi, got {tuple(logvar_clamp)}")


def _seed_tensor(seed, generator, device):
    """[2] int64 (seed, offset) on the device: from the arguments, or drawn from the generator on
    the device (no host sync; captured CUDA graphs draw fresh values on each replay)."""
    if seed is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but mu is on {device}; expected the same device")
        return torch.randint(-(2**63), 2**63 - 1, (2,), dtype=torch.int64, device=device, generator=generator)
    if generator is not None:
        raise ValueError("pass either seed or generator, not both")
    pair = tuple(seed) if isinstance(seed, (tuple, list)) else (seed, 0)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"seed must be an int or an (seed, offset) pair of ints, got {seed!r}")
    wrap = [((v + 2**63) % 2**64) - 2**63 for v in pair]  # any int, as its 64-bit pattern
    return torch.tensor(wrap, dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------- backends
_reasons = kernel_reasons  # fp32/fp16/bf16 on every kernel backend; fp64 goes to the reference


def backend_for(x):
    # cached per device type and dtype (and the environment: backends.choose_cached); the forward and
    # the backward each ask once, and small VAE latents make the call host-bound
    return backends.choose_cached(OP, x.device.type, (x.dtype,), _reasons)


def _rs(t):
    """(row, col) strides of t as [rows, cols]; None when it cannot be seen so without a copy."""
    if t.dim() == 1:
        return t.stride(0), 1
    return rows_strides(t)


def _as_rows(t):
    """t itself with its (row, col) strides, or a contiguous copy where the dims do not merge."""
    st = _rs(t)
    if st is None:
        t = t.contiguous()
        st = _rs(t)
    return t, st


def _regen_eps(mu, seed):
    s, off = seed.tolist()  # reference backend only: a host sync is acceptable there
    ct = reference._compute_dtype(mu)
    return reference.philox_normal(s, off, mu.numel(), dtype=ct, device=mu.device).view(mu.shape)


def _clamped(lv, lo, hi, clamp):
    return torch.clamp(lv, lo, hi) if clamp else lv


def _mod(name):
    return _native.for_backend(name)


# --------------------------------------------------------------------------- forward / backward
def _forward(mu, logvar, noise, seed, lo, hi, clamp, per_row):
    ct = reference._compute_dtype(mu)
    b = mu.shape[0]
    z = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    kl = torch.empty((b,) if per_row else mu.shape, dtype=ct, device=mu.device)
    if mu.numel() == 0:
        kl.zero_()
        return z, kl
    name = backend_for(mu)
    if name == "reference":
        eps = noise if noise is not None else _regen_eps(mu, seed)
        z_ref, kl_ref = reference.reparam_kl(mu, logvar, noise=eps, reduction="per_sample" if per_row else "none",
                                             logvar_clamp=(lo, hi) if clamp else None)
        z.copy_(z_ref)
        kl.copy_(kl_ref)
        return z, kl
    mu_, (mu_rs, mu_cs) = _as_rows(mu)
    lv_, (lv_rs, lv_cs) = _as_rows(logvar)
    n_, (n_rs, n_cs) = _as_rows(noise) if noise is not None else (None, (0, 0))
    rows, cols = b, math.prod(mu.shape[1:])
    kl_rs, kl_cs = (kl.stride(0), 0) if per_row else (cols, 1)
    if name == "triton":
        from genfast.kernels.kl import kl_forward as triton_kl_forward

        triton_kl_forward(z, kl, mu_, lv_, n_, seed, rows, cols, (mu_rs, mu_cs, lv_rs, lv_cs, n_rs, n_cs),
                          lo, hi, clamp, per_row)
        return z, kl
    mod = _mod(name)
    partial, row_blocks = 0, 0
    if name != "cpu" and per_row:
        row_blocks = mod.kl_row_blocks(cols)
        scratch = torch.empty(rows * row_blocks, dtype=torch.float32, device=mu.device)
        partial = scratch.data_ptr()
    mod.kl_forward(z.data_ptr(), kl.data_ptr(), mu_.data_ptr(), lv_.data_ptr(), n_.data_ptr() if n_ is not None else 0,
                   seed.data_ptr() if seed is not None else 0, rows, cols,
                   [mu_rs, mu_cs, lv_rs, lv_cs, n_rs, n_cs, cols, 1, kl_rs, kl_cs], lo, hi, clamp, per_row,
                   partial, row_blocks, DTYPE_CODE[mu.dtype], cuda_stream(mu) if name == "cuda" else 0)
    return z, kl


def _backward_impl(dz, gkl, mu, logvar, noise, seed, lo, hi, clamp, out=None):
    """(dmu, dlogvar); out: two tensors of mu's shape to write them into (row-strided views: _rs)."""
    if out is None:
        dmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
        dlv = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    else:
        dmu, dlv = out
    if mu.numel() == 0:
        return dmu, dlv
    name = backend_for(mu)
    if name == "reference":
        ct = reference._compute_dtype(mu)
        m, lv0 = mu.to(ct), logvar.to(ct)
        lv = _clamped(lv0, lo, hi, clamp)
        s = torch.exp(0.5 * lv)
        zero = torch.zeros_like(m)
        d = dz.to(ct) if dz is not None else zero
        g = _gkl_full(gkl, mu).to(ct) if gkl is not None else zero
        # a term without a gradient is left out, not multiplied by 0 (kl_dlogvar, csrc/kl.h)
        tz = d * (noise.to(ct) if noise is not None else _regen_eps(mu, seed)) * s if dz is not None else zero
        dlogvar = 0.5 * (tz + (g * (s * s - 1) if gkl is not None else zero))
        if clamp:
            dlogvar = torch.where((lv0 >= lo) & (lv0 <= hi), dlogvar, zero)
        dmu.copy_(d + g * m)
        dlv.copy_(dlogvar)
        return dmu, dlv
    mu_, (mu_rs, mu_cs) = _as_rows(mu)
    lv_, (lv_rs, lv_cs) = _as_rows(logvar)
    n_, (n_rs, n_cs) = _as_rows(noise) if noise is not None else (None, (0, 0))
    dz_, (dz_rs, dz_cs) = _as_rows(dz) if dz is not None else (None, (0, 0))
    if gkl is not None and gkl.dtype != torch.float32:
        gkl = gkl.float()  # the kernels read an fp32 KL gradient
    if gkl is None:
        g_, (g_rs, g_cs) = None, (0, 0)
    elif gkl.dim() == 1 and mu.dim() > 1:
        g_, (g_rs, g_cs) = gkl, (gkl.stride(0), 0)  # per-row KL gradient
    else:
        g_, (g_rs, g_cs) = _as_rows(gkl)
    rows, cols = mu.shape[0], math.prod(mu.shape[1:])
    out_strides = [cols, 1, cols, 1] if out is None else [*_rs(dmu), *_rs(dlv)]
    strides = [mu_rs, mu_cs, lv_rs, lv_cs, n_rs, n_cs, dz_rs, dz_cs, g_rs, g_cs, *out_strides]
    if name == "triton":
        from genfast.kernels.kl import kl_backward as triton_kl_backward

        triton_kl_backward(dmu, dlv, dz_, g_, mu_, lv_, n_, seed, rows, cols, strides, lo, hi, clamp)
        return dmu, dlv
    ptr = lambda t: t.data_ptr() if t is not None else 0  # noqa: E731
    _mod(name).kl_backward(dmu.data_ptr(), dlv.data_ptr(), ptr(dz_), ptr(g_), mu_.data_ptr(), lv_.data_ptr(), ptr(n_),
                           ptr(seed), rows, cols, strides, lo, hi, clamp, DTYPE_CODE[mu.dtype],
                           cuda_stream(mu) if name == "cuda" else 0)
    return dmu, dlv


def _gkl_full(gkl, mu):
    """The KL gradient broadcast to mu's shape (per-row [B] or element-wise)."""
    if gkl.shape == mu.shape:
        return gkl
    return gkl.reshape((-1,) + (1,) * (mu.dim() - 1)).expand(mu.shape)


# ------------------------------------------------------------------------ torch.library glue
for _key in ("CPU", "CUDA"):
    LIB.impl("reparam_kl", _forward, _key)
    LIB.impl("reparam_kl_backward", _backward_impl, _key)


@torch.library.register_fake("genfast::reparam_kl")
def _fake(mu, logvar, noise, seed, lo, hi, clamp, per_row):
    ct = torch.float64 if mu.dtype == torch.float64 else torch.float32
    z = mu.new_empty(mu.shape)
    kl = mu.new_empty((mu.shape[0],) if per_row else mu.shape, dtype=ct)
    return z, kl


@torch.library.register_fake("genfast::reparam_kl_backward")
def _fake_backward(dz, gkl, mu, logvar, noise, seed, lo, hi, clamp):
    return mu.new_empty(mu.shape), mu.new_empty(mu.shape)


def _setup_context(ctx, inputs, output):
    mu, logvar, noise, seed, lo, hi, clamp, per_row = inputs
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None: its term is left out
    ctx.params, ctx.per_row = (lo, hi, clamp), per_row
    ctx.save_for_backward(mu, logvar, noise, seed)


def _graph_grads(ctx, inputs, split, noise, seed, dz, dkl):
    """create_graph=True: the gradients through the reference on the same noise, differentiable
    (genfast.ops._common.graph_grads). split(*inputs) -> (mu, logvar)."""
    lo, hi, clamp = ctx.params

    def fn(*tensors):
        mu, logvar = split(*tensors)
        eps = noise if noise is not None else _regen_eps(mu, seed)
        return reference.reparam_kl(mu, logvar, noise=eps, reduction="per_sample" if ctx.per_row else "none",
                                    logvar_clamp=(lo, hi) if clamp else None)
    return graph_grads(fn, inputs, ctx.needs_input_grad[:len(inputs)], (dz, dkl))


def _backward(ctx, dz, dkl):
    mu, logvar, noise, seed = ctx.saved_tensors
    if backward_by_reference(dz, dkl):
        return (*_graph_grads(ctx, (mu, logvar), lambda m, lv: (m, lv), noise, seed, dz, dkl), *(None,) * 6)
    dmu, dlv = torch.ops.genfast.reparam_kl_backward(dz, dkl, mu, logvar, noise, seed, *ctx.params)
    return dmu, dlv, None, None, None, None, None, None


torch.library.register_autograd("genfast::reparam_kl", _backward, setup_context=_setup_context)


def _one_gradient_buffer(h, mu, logvar):
    """Whether the backward can write dmu and dlogvar into the halves of one empty_like(h) in place:
    h contiguous (empty_like gives the same strides, so the halves of the gradient have mu's and
    logvar's) and both halves seen as [rows, cols] without a copy."""
    return h.requires_grad and h.is_contiguous() and _rs(mu) is not None and _rs(logvar) is not None


class _ReparamKLMoments(torch.autograd.Function):
    """reparam_kl with the gradient going to h (mu, logvar = h.chunk(2, dim)) in one buffer: the
    kernel writes dmu and dlogvar into the halves of dh (reparam_kl_moments)."""

    @staticmethod
    def forward(ctx, h, dim, noise, seed, lo, hi, clamp, per_row):
        ctx.set_materialize_grads(False)  # as _setup_context
        ctx.dim, ctx.params, ctx.per_row = dim, (lo, hi, clamp), per_row
        ctx.save_for_backward(h, noise, seed)
        return _forward(*h.chunk(2, dim), noise, seed, lo, hi, clamp, per_row)

    @staticmethod
    def backward(ctx, dz, dkl):
        h, noise, seed = ctx.saved_tensors
        if backward_by_reference(dz, dkl):
            return (*_graph_grads(ctx, (h,), lambda h: h.chunk(2, ctx.dim), noise, seed, dz, dkl), *(None,) * 7)
        dh = torch.empty_like(h)
        _backward_impl(dz, dkl, *h.chunk(2, ctx.dim), noise, seed, *ctx.params, out=dh.chunk(2, ctx.dim))
        return dh, None, None, None, None, None, None, None


class _ReparamKL(torch.autograd.Function):
    """The eager fast path of the same op (see _plain_eager): same kernels, same saved tensors."""

    @staticmethod
    def forward(ctx, mu, logvar, noise, seed, lo, hi, clamp, per_row):
        ctx.set_materialize_grads(False)  # as _setup_context
        ctx.params, ctx.per_row = (lo, hi, clamp), per_row
        ctx.save_for_backward(mu, logvar, noise, seed)
        return _forward(mu, logvar, noise, seed, lo, hi, clamp, per_row)

    @staticmethod
    def backward(ctx, dz, dkl):
        mu, logvar, noise, seed = ctx.saved_tensors
        if backward_by_reference(dz, dkl):
            return (*_graph_grads(ctx, (mu, logvar), lambda m, lv: (m, lv), noise, seed, dz, dkl), *(None,) * 6)
        dmu, dlv = _backward_impl(dz, dkl, mu, logvar, noise, seed, *ctx.params)
        return dmu, dlv, None, None, None, None, None, None
