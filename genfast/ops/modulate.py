"""adaLN modulate and gated residual (DiT adaLN-Zero): checks, backend choice, autograd and the
torch.library registration (genfast::adaln_modulate, genfast::gated_residual and their backwards).

    adaln_modulate(x, shift, scale)  = norm(x, no affine) * (1 + scale) + shift    norm: layer | rms
    gated_residual(x, gate, y)       = x + gate * y

x / y are [B, N, C]; shift, scale and gate are [B, C] (per sample, as DiT's adaLN) or [B, N, C]
(per token); [B, 1, C] counts as per sample. The forward makes one pass (fp32 statistics, then the
modulated row) and saves the per-row mean and rstd in fp32 ([B, N]); the backward is one fused
pass for dx, dshift and dscale. Per-sample gradients are sums over N made of fixed-size row chunks
added in order: deterministic, no float atomics.
"""
import torch

from genfast import _native, backends, reference
from genfast.ops._common import (
    DTYPE_CODE, LIB, backward_by_reference, check_float_tensor, cuda_stream, dispatcher_needed, graph_grads,
    kernel_reasons, needs_grad, transformed)

LIB.define("adaln_modulate(Tensor x, Tensor? shift, Tensor scale, float eps, bool rms) -> (Tensor, Tensor, Tensor)")
LIB.define("adaln_modulate_backward(Tensor grad, Tensor x, Tensor? shift, Tensor scale, Tensor mean, Tensor rstd, "
           "float eps, bool rms, bool[3] needs) -> (Tensor, Tensor, Tensor)")
LIB.define("gated_residual(Tensor x, Tensor gate, Tensor y) -> Tensor")
LIB.define("gated_residual_backward(Tensor grad, Tensor gate, Tensor y, bool[2] needs) -> (Tensor, Tensor)")

CHUNK_ROWS = 32  # rows per partial sum of a per-sample gradient: a function of nothing but this constant


def adaln_modulate(x, shift, scale, *, eps=1e-6, norm="layer"):
    """norm(x) * (1 + scale) + shift, the adaLN modulation of DiT, in one pass.

    Args:
        x: tokens [B, N, C] (fp32, fp16, bf16 or fp64); any strides (a copy only when the channel
            stride is not 1).
        shift: [B, C] (per sample), [B, 1, C] or [B, N, C] (per token), or None; x's dtype and device.
        scale: same forms as shift (not None); the output is multiplied by (1 + scale).
        eps: added to the variance (mean square for rms) before the square root.
        norm: "layer" (LayerNorm without affine) or "rms" (RMSNorm without weight).
    Returns:
        [B, N, C] in x's dtype (contiguous). Statistics and math in fp32, the variance as
        mean((x - mean)^2), so fp16 inputs of magnitude 1e3 do not overflow.
    """
    _check_x("x", x)
    _check_modulation("scale", scale, x)
    if shift is not None:
        _check_modulation("shift", shift, x)
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a float >= 0, got {eps!r}")
    rms, eps = norm == "rms", float(eps)
    route = _route(x, shift, scale)
    # torch.func / forward-mode AD (which _route sends to "op"): the reference (genfast.ops._common.transformed)
    if route == "op" and transformed():
        return reference.adaln_modulate(x, shift, scale, eps=eps, norm=norm)
    if route == "direct":  # (nothing saves the statistics: the kernels skip them)
        return _modulate_impl(x, shift, scale, eps, rms, stats=False)[0]
    if route == "function":  # [B, C] forms go in as they are (the kernels' wrappers take them)
        return _ModulateFunction.apply(x, shift, scale, eps, rms)
    return torch.ops.genfast.adaln_modulate(x, _as3(shift), _as3(scale), eps, rms)[0]


def gated_residual(x, gate, y):
    """x + gate * y, the adaLN-Zero gated residual. x, y [B, N, C]; gate [B, C], [B, 1, C] or
    [B, N, C]; one dtype and device. Returns a new contiguous [B, N, C] tensor (fp32 math)."""
    _check_x("x", x)
    _check_x("y", y)
    if y.shape != x.shape:
        raise ValueError(f"y has shape {tuple(y.shape)} but x has {tuple(x.shape)}; expected the same shape")
    _same_kind("y", y, x)
    _check_modulation("gate", gate, x)
    route = _route(x, gate, y)
    if route == "op" and transformed():
        return reference.gated_residual(x, gate, y)
    if route == "direct":
        return _gated_impl(x, gate, y)
    if route == "function":  # a [B, C] gate goes in as it is
        return _GatedFunction.apply(x, gate, y)
    return torch.ops.genfast.gated_residual(x, _as3(gate), y)


def _route(*tensors):
    """How a call reaches the kernels. "op": through torch.ops.genfast.* (torch.compile, fake
    tensors, torch function / dispatch modes, functorch transforms, tensor subclasses: everything
    that must see the registered op). In plain eager mode the dispatcher would change nothing, and
    skipping it saves ~10 us of a forward and ~40 us of a forward + backward (measured at
    [1, 1, 16]): "direct" (no gradient needed) calls the kernel, "function" goes through an
    autograd.Function with the same forward and backward as the registered op."""
    if dispatcher_needed(*tensors):
        return "op"
    grad = needs_grad(*tensors)
    return "function" if grad else "direct"


# ------------------------------------------------------------------------------------- checks
def _check_x(name, x):
    check_float_tensor(name, x)
    if x.dim() != 3:
        raise ValueError(f"{name} must be 3-D [B, N, C] (batch, tokens, channels), got shape {tuple(x.shape)}")


def _same_kind(name, t, x):
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; expected the same dtype "
                        f"(cast the modulation to x's dtype)")


def _check_modulation(name, t, x):
    """t must be [B, C], [B, 1, C] or [B, N, C] for x [B, N, C]; anything else raises."""
    check_float_tensor(name, t)
    _same_kind(name, t, x)
    b, n, c = x.shape
    if t.dim() == 2 and tuple(t.shape) == (b, c):
        return
    if t.dim() == 3 and t.shape[0] == b and t.shape[1] in (1, n) and t.shape[2] == c:
        return
    raise ValueError(f"{name} must have shape [B, C] = [{b}, {c}] (per sample) or [B, N, C] = [{b}, {n}, {c}] "
                     f"(per token; [{b}, 1, {c}] also per sample) for x of shape {tuple(x.shape)}, "
                     f"got {tuple(t.shape)}")


def _as3(t):
    """A [B, C] modulation as the [B, 1, C] view the registered ops and the torch formulas take (None
    and 3-D forms as they are). The kernels' wrappers take [B, C] as it is (see _bn)."""
    return t.unsqueeze(1) if t is not None and t.dim() == 2 else t


# ----------------------------------------------------------------------------------- backends
_reasons = kernel_reasons  # fp32/fp16/bf16 on every kernel backend; fp64 goes to the reference


def backend_for(x, op="adaln_modulate"):
    return backends.choose_cached(op, x.device.type, (x.dtype,), _reasons)


def _sums_in_thread(name, b):
    """CPU kernel: with samples enough to share evenly among the threads, a per-sample gradient is
    summed by the thread that owns the sample (no partial-sum buffer, no second parallel region;
    same chunk order, same bits). Called with partial=None it does so."""
    threads = torch.get_num_threads()
    return name == "cpu" and (b % threads == 0 or b >= 4 * threads)


def _bn(t, n):
    """(t with channel stride 1, its batch stride, its row stride) for a [B, C], [B, 1, C] or [B, N, C]
    tensor; a row stride of 0 where t is broadcast over the N rows. One stride() read: each tensor
    attribute costs ~0.3-1 us from Python, and these wrappers run on host-bound paths (small tensors,
    GPU launches); [B, C] modulations are taken as they are (an unsqueeze costs ~2-3 us)."""
    s = t.stride()
    if s[-1] != 1 and t.shape[-1] > 1:
        t = t.contiguous()
        s = t.stride()
    if len(s) == 2:
        return t, s[0], 0
    return t, s[0], (s[1] if n != 1 and t.shape[1] == n else 0)


def _tok(t, n):
    """_bn for a token tensor: [B, N, C], or its [B*N, C] rows (a GEMM's input or output, taken
    without the view to 3-D: a view costs ~2-12 us of host time, see genfast.ops.dit_block)."""
    s = t.stride()
    if s[-1] != 1 and t.shape[-1] > 1:
        t = t.contiguous()
        s = t.stride()
    return (t, n * s[0], s[0]) if len(s) == 2 else (t, s[0], s[1])


def _per_sample(t, n):
    """Whether modulation t ([B, C], [B, 1, C] or [B, N, C]) is one row per sample broadcast over
    N > 1 rows (its gradient a sum over the rows)."""
    return n != 1 and (t.dim() == 2 or t.shape[1] == 1)


def _as_shape(t, shape):
    """t reshaped to shape; t itself when it already has it (no host call: ~12 us each on a GPU host)."""
    return t if t.shape == shape else t.reshape(shape)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _launch(name, fn, tensors, args, tail=()):
    """Runs kernel fn of backend name with positional arguments in the compiled modules' order: the
    tensors, the other args, then the optional trailing tensors (tail); data pointers (0 for None)
    for the compiled modules, with the CUDA stream last, the tensors themselves for the Triton
    launchers (genfast/kernels/modulate.py, same order). Positional: pybind11 matches keywords
    ~3 us slower per call on the CPU."""
    if name == "triton":
        from genfast.kernels import modulate as tk

        getattr(tk, fn)(*tensors, *args, *tail)
        return
    getattr(_native.for_backend(name), fn)(*map(_ptr, tensors), *args, *map(_ptr, tail),
                                           cuda_stream(next(t for t in tensors if t is not None))
                                           if name == "cuda" else 0)


# ---------------------------------------------------------------------------- adaln_modulate
def _modulate_impl(x, shift, scale, eps, rms, out=None, stats=True):
    """(out, mean, rstd); out: a contiguous [B, N, C] buffer (or its [B*N, C] rows) to write (kernel
    backends), or None. stats=False (no backward will read them): mean and rstd are None, not written
    (two allocations fewer on a host-bound inference path)."""
    b, n, c = x.shape
    mean = rstd = None
    if stats:
        mean = torch.empty(b, n, device=x.device, dtype=torch.float32)  # the kernels write every row
        rstd = torch.empty(b, n, device=x.device, dtype=torch.float32)
    if x.numel() == 0:
        if stats:
            mean.zero_()
            rstd.fill_(eps ** -0.5 if eps else 0)
        return (torch.empty(b, n, c, device=x.device, dtype=x.dtype) if out is None else out), mean, rstd
    name = backend_for(x)
    if name == "reference":
        ref = reference.adaln_modulate(x, shift, scale, eps=eps, norm="rms" if rms else "layer")
        if out is None:
            out = ref.contiguous()
        else:  # into the given buffer, as the kernels write it
            out.view(ref.shape).copy_(ref)
        if not stats:
            return out, None, None
        xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        m = xf.mean(-1) if not rms else torch.zeros_like(xf[..., 0])
        mean.copy_(m)
        rstd.copy_(torch.rsqrt(((xf - m[..., None]) ** 2).mean(-1) + eps))
        return out, mean, rstd
    x, x_sb, x_sn = _tok(x, n)
    scale, sc_sb, sc_sn = _bn(scale, n)
    shift, sh_sb, sh_sn = _bn(shift, n) if shift is not None else (None, 0, 0)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _launch(name, "modulate_fwd", (out, x, shift, scale, mean, rstd),
            (b, n, c, (n * c, c, x_sb, x_sn, sh_sb, sh_sn, sc_sb, sc_sn), float(eps), bool(rms), DTYPE_CODE[x.dtype]))
    return out, mean, rstd


def _modulate_bwd_impl(grad, x, shift, scale, mean, rstd, eps, rms, needs, addend=None):
    """(dx, dshift, dscale); an output that is not needed is an empty [0] tensor. addend ([B, N, C], x's
    dtype; needs dx): dx + addend instead of dx, from the same pass, with the bits of the separate
    add (dx as stored plus the addend, rounded): a residual's gradient (genfast.ops.dit_block)."""
    need_x, need_shift, need_scale = needs
    need_shift = need_shift and shift is not None
    nothing = x.new_empty(0) if not (need_x and need_shift and need_scale) else None  # for outputs not asked for
    b, n, c = x.shape
    if x.numel() == 0:
        return (torch.zeros_like(x) if need_x else nothing,
                torch.zeros_like(shift) if need_shift else nothing, torch.zeros_like(scale) if need_scale else nothing)
    name = backend_for(x)
    if name == "reference":
        dx, dshift, dscale = _reference_backward(_as_shape(grad, x.shape), x, _as3(shift), _as3(scale), eps, rms, needs)
        return ((dx + addend if addend is not None else dx), dshift.view(shift.shape) if need_shift else dshift,
                dscale.view(scale.shape) if need_scale else dscale)
    per_sample = _per_sample(scale, n)
    shift_per_sample = shift is not None and _per_sample(shift, n)
    kernel_dshift = need_shift and shift_per_sample and per_sample  # else dshift is grad or its sum over N
    grad, g_sb, g_sn = _tok(grad, n)  # (grad may be the [B*N, C] rows of a GEMM's dX)
    x, x_sb, x_sn = _tok(x, n)
    scale, sc_sb, sc_sn = _bn(scale, n)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
    # in the modulations' own shapes: B x C (per sample, or N = 1) or B x N x C values, contiguous
    dscale = torch.empty(scale.shape, device=x.device, dtype=x.dtype) if need_scale else None
    dshift = torch.empty(shift.shape, device=x.device, dtype=x.dtype) if kernel_dshift else None
    nchunks = -(-n // CHUNK_ROWS)
    partial = (torch.empty(b, nchunks, 2, c, device=x.device, dtype=torch.float32)
               if per_sample and (need_scale or kernel_dshift) and not _sums_in_thread(name, b) else None)
    if need_x or need_scale or kernel_dshift:
        strides = (n * c if need_x else 0, c if need_x else 0, g_sb, g_sn, x_sb, x_sn, sc_sb, sc_sn)
        _launch(name, "modulate_bwd", (dx, dshift, dscale, partial, grad, x, scale, mean, rstd),
                (b, n, c, strides, CHUNK_ROWS, per_sample, bool(rms), DTYPE_CODE[x.dtype]),
                (addend.contiguous() if addend is not None and need_x else None,))
    if need_shift and not kernel_dshift:  # (the autograd formula does not ask for these: see _dshift)
        dshift = _dshift(_as_shape(grad, x.shape), shift_per_sample).clone()
    # (dscale is allocated in scale's shape; dshift from _dshift may be [B, 1, C] for a [B, C] shift)
    return (dx if need_x else nothing, _as_shape(dshift, shift.shape) if need_shift else nothing,
            dscale if need_scale else nothing)


def _reference_backward(grad, x, shift, scale, eps, rms, needs):
    """The backward in plain PyTorch (fp32, fp64 for fp64 x), statistics recomputed in that dtype.
    Written out, not autograd: inside an op's kernel autograd does not record."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, g = x.to(ct), grad.to(ct)
    mean = torch.zeros_like(xf[..., :1]) if rms else xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt(((xf - mean) ** 2).mean(-1, keepdim=True) + eps)
    xh = (xf - mean) * rstd
    nothing = x.new_empty(0)
    dx = dshift = dscale = nothing
    if needs[0]:
        dxh = g * (1 + scale.to(ct))
        centred = dxh if rms else dxh - dxh.mean(-1, keepdim=True)
        dx = (rstd * (centred - xh * (dxh * xh).mean(-1, keepdim=True))).to(x.dtype)
    if needs[1] and shift is not None:
        dshift = g.sum(1, keepdim=True).to(x.dtype) if shift.shape[1] != g.shape[1] else g.to(x.dtype, copy=True)
    if needs[2]:
        dscale = (g * xh).sum(1, keepdim=True) if scale.shape[1] != g.shape[1] else g * xh
        dscale = dscale.to(x.dtype)
    return dx.contiguous(), dshift.contiguous(), dscale.contiguous()


def _modulate_fake(x, shift, scale, eps, rms):
    b, n, c = x.shape
    return (x.new_empty(b, n, c), x.new_empty(b, n, dtype=torch.float32), x.new_empty(b, n, dtype=torch.float32))


def _modulate_bwd_fake(grad, x, shift, scale, mean, rstd, eps, rms, needs):
    nothing = x.new_empty(0)
    return (x.new_empty(x.shape) if needs[0] else nothing,
            shift.new_empty(shift.shape) if needs[1] and shift is not None else nothing,
            scale.new_empty(scale.shape) if needs[2] else nothing)


def _modulate_setup(ctx, inputs, output):
    x, shift, scale, eps, rms = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.eps, ctx.rms = eps, rms
    ctx.save_for_backward(x, shift, scale, mean, rstd)


def _dshift(grad, per_sample):
    """dshift without a kernel: grad itself (per token) or its fp32 sum over N (per sample)."""
    return grad.float().sum(1, keepdim=True).to(grad.dtype) if per_sample else grad


def _modulate_graph_grads(ctx, grad, x, shift, scale):
    """create_graph=True: the gradients through the reference, differentiable (see graph_grads)."""
    norm = "rms" if ctx.rms else "layer"
    fn = lambda x, shift, scale: reference.adaln_modulate(x, shift, scale, eps=ctx.eps, norm=norm)  # noqa: E731
    return (*graph_grads(fn, (x, shift, scale), ctx.needs_input_grad[:3], (grad,)), None, None)


def _modulate_backward(ctx, grad, _gmean, _grstd):
    x, shift, scale, mean, rstd = ctx.saved_tensors
    if backward_by_reference(grad):
        return _modulate_graph_grads(ctx, grad, x, shift, scale)
    grads = _modulate_grads(torch.ops.genfast.adaln_modulate_backward, ctx.needs_input_grad[:3], grad, x, shift,
                            scale, mean, rstd, ctx.eps, ctx.rms)
    return (*grads, None, None)


def _modulate_grads(backward_op, needs, grad, x, shift, scale, mean, rstd, eps, rms, addend=None):
    """(dx, dshift, dscale), None where not needed; backward_op is the registered op or its impl
    (the impl with an addend for dx: see _modulate_bwd_impl)."""
    needs = [bool(v) for v in needs]
    n = x.shape[1]
    shift_ps, scale_ps = shift is not None and _per_sample(shift, n), _per_sample(scale, n)
    # The fused kernel sums dshift beside dscale when both are per sample; per token dshift is grad itself,
    # returned here without a copy (a custom op may not return an alias of its input).
    kernel_dshift = needs[1] and shift_ps and scale_ps
    if needs[0] or needs[2] or kernel_dshift:
        dx, dshift, dscale = backward_op(grad, x, shift, scale, mean, rstd, eps, rms,
                                         [needs[0], kernel_dshift, needs[2]],
                                         **({} if addend is None else {"addend": addend}))
    if needs[1] and not kernel_dshift:
        dshift = _dshift(_as_shape(grad, x.shape), shift_ps).reshape(shift.shape)
    return dx if needs[0] else None, dshift if needs[1] else None, dscale if needs[2] else None


class _ModulateFunction(torch.autograd.Function):
    """The eager twin of the registered op + autograd (see _route): same kernels, no dispatcher."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps, rms):
        out, mean, rstd = _modulate_impl(x, shift, scale, eps, rms)
        ctx.eps, ctx.rms = eps, rms
        ctx.save_for_backward(x, shift, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, shift, scale, mean, rstd = ctx.saved_tensors
        if backward_by_reference(grad):
            return _modulate_graph_grads(ctx, grad, x, shift, scale)
        # (the gradients come in the modulations' own shapes, [B, C] included)
        return (*_modulate_grads(_modulate_bwd_impl, ctx.needs_input_grad[:3], grad, x, shift, scale, mean, rstd,
                                 ctx.eps, ctx.rms), None, None)


# ---------------------------------------------------------------------------- gated_residual
def _gated_impl(x, gate, y, out=None):
    """x + gate * y; out: a contiguous [B, N, C] buffer to write (kernel backends), or None. y may be
    the [B*N, C] rows of a GEMM's output (the kernels take it as it is)."""
    b, n, c = x.shape
    if x.numel() == 0:
        return torch.empty(b, n, c, device=x.device, dtype=x.dtype)
    name = backend_for(x, "gated_residual")
    if name == "reference":
        return reference.gated_residual(x, gate, _as_shape(y, x.shape)).contiguous()
    x, x_sb, x_sn = _tok(x, n)
    gate, g_sb, g_sn = _bn(gate, n)
    y, y_sb, y_sn = _tok(y, n)
    out = torch.empty_like(x, memory_format=torch.contiguous_format) if out is None else out
    _launch(name, "gated_residual_fwd", (out, x, gate, y),
            (b, n, c, (n * c, c, x_sb, x_sn, g_sb, g_sn, y_sb, y_sn), DTYPE_CODE[x.dtype]))
    return out


def gated_bias_fp32(x, gate, y, bias, keep_y, out=None):
    """x + gate * (y + bias) for the DiT block's fused CPU path (fp32, x and y [B, N, C] contiguous,
    gate a per-sample [B, 1, C] view with a unit last stride, bias [C]): y is a GEMM's output without
    its bias; with keep_y, y + bias is written back into y (the Linear's output, which the backward
    reads). Callers check these and that the CPU kernels run (genfast.ops.dit_block._folds_bias).
    out: a contiguous [B, N, C] buffer to write, or None."""
    b, n, c = x.shape
    out = torch.empty(b, n, c, device=x.device, dtype=x.dtype) if out is None else out
    _native.module("_C").gated_residual_bias_fp32(out.data_ptr(), x.data_ptr(), gate.data_ptr(), gate.stride(0),
                                                  y.data_ptr(), bias.data_ptr(), b, n, c, keep_y)
    return out


def _gated_bwd_impl(grad, gate, y, needs):
    """(dy, dgate); an output that is not needed is an empty [0] tensor."""
    dy, dgate, _ = gated_bwd(grad, gate, y, needs[0], needs[1])
    return dy if dy is not None else y.new_empty(0), dgate if dgate is not None else y.new_empty(0)


def gated_bwd(grad, gate, y, need_y, need_gate, need_bias=False, dy_out=None):
    """(dy, dgate, dbias) of out = x + gate * y, None where not asked for. dbias [C]: the column sums
    of dy over all rows as stored (the bias gradient of the Linear that made y), from the same pass
    over grad where the gate is per sample (the kernels' chunk sums), else torch's sum of dy.
    dy_out: a contiguous [B, N, C] buffer for dy (kernel backends; the reference makes its own). y (and
    dy_out) may be the [B*N, C] rows of a GEMM's output: dy then comes in that shape."""
    b, n, c = grad.shape
    need_y = need_y or need_bias
    if y.numel() == 0:
        return (torch.zeros_like(y) if need_y else None, torch.zeros_like(gate) if need_gate else None,
                y.new_zeros(c) if need_bias else None)
    name = backend_for(y, "gated_residual")
    per_sample = _per_sample(gate, n)
    dbias = None
    if name == "reference":
        dy, dgate = _gated_torch_grads(grad, _as3(gate), _as_shape(y, grad.shape), _as3(gate).shape, need_y, need_gate)
        dy = _as_shape(dy.contiguous(), y.shape) if need_y else None
        dgate = dgate.contiguous().reshape(gate.shape) if need_gate else None
    else:
        grad, g_sb, g_sn = _tok(grad, n)
        gate, ga_sb, ga_sn = _bn(gate, n)
        y, y_sb, y_sn = _tok(y, n)
        dy = None
        if need_y:
            dy = dy_out if dy_out is not None else torch.empty_like(y, memory_format=torch.contiguous_format)
        # in the gate's own shape: B x C (per sample, or N = 1) or B x N x C values, contiguous
        dgate = torch.empty(gate.shape, device=y.device, dtype=y.dtype) if need_gate else None
        nchunks = -(-n // CHUNK_ROWS)
        partial = (torch.empty(b, nchunks, c, device=y.device, dtype=torch.float32)
                   if per_sample and need_gate and not _sums_in_thread(name, b) else None)
        tail = (None, None)
        if need_bias and per_sample:
            dbias = torch.empty(c, device=y.device, dtype=y.dtype)
            # chunk sums [B * nchunks, C], then the per-sample sums [B, C] (see csrc/modulate.h)
            tail = (dbias, torch.empty(b * (nchunks + 1), c, device=y.device, dtype=torch.float32))
        if need_y or need_gate:
            _launch(name, "gated_residual_bwd", (dy, dgate, partial, grad, gate, y),
                    (b, n, c, (g_sb, g_sn, ga_sb, ga_sn, y_sb, y_sn), CHUNK_ROWS, per_sample, DTYPE_CODE[y.dtype]),
                    tail)
    if need_bias and dbias is None:  # reference, or a per-token gate: torch's column sums of dy
        ct = torch.float64 if y.dtype == torch.float64 else torch.float32
        dbias = dy.view(b * n, c).sum(0, dtype=ct).to(y.dtype)
    return dy, dgate, dbias


def _gated_torch_grads(grad, gate, y, gate_shape, need_y, need_gate):
    """(dy, dgate) of x + gate * y in torch ops, fp32 math (fp64 for fp64), None where not asked for:
    the reference backend's, and a double backward's (differentiable). gate [B, 1 | N, C] of gate_shape;
    dy reads only gate, dgate only y (the other may be None)."""
    ct = reference._compute_dtype(grad)
    g = grad.to(ct)
    dy = (g * gate.to(ct)).to(grad.dtype) if need_y else None
    dgate = None
    if need_gate:
        dgate = g * y.to(ct)
        if gate_shape[1] != g.shape[1]:  # per sample: summed over the tokens
            dgate = dgate.sum(1, keepdim=True)
        dgate = dgate.to(grad.dtype)
    return dy, dgate


def _gated_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate if ctx.needs_input_grad[2] else None, y if ctx.needs_input_grad[1] else None)
    ctx.gate_meta, ctx.y_meta = (gate.shape, gate.dtype), (y.shape, y.dtype)


def _gated_backward(ctx, grad):
    gate, y = ctx.saved_tensors
    return _gated_grads(torch.ops.genfast.gated_residual_backward, ctx.needs_input_grad, grad, gate, y, ctx.gate_meta)


def _gated_grads(backward_op, needs, grad, gate, y, gate_meta, by_reference=None):
    """(dx, dgate, dy), None where not needed; dx is grad itself. gate: [B, 1 | N, C] ([B, C] for the
    kernels' wrappers); by_reference: backward_by_reference(grad) where the caller has it."""
    need_y, need_gate = bool(needs[2]), bool(needs[1])
    dy = dgate = None
    if backward_by_reference(grad) if by_reference is None else by_reference:  # create_graph or batched grads
        dy, dgate = _gated_torch_grads(grad, gate, y, gate_meta[0], need_y, need_gate)
        return grad if needs[0] else None, dgate, dy
    if need_y or need_gate:
        # A tensor the kernel will not read stands in for the one not saved (shapes only).
        gate_t = gate if gate is not None else grad.new_zeros(gate_meta[0])
        y_t = y if y is not None else grad
        dy, dgate = backward_op(grad, gate_t, y_t, [need_y, need_gate])
    return grad if needs[0] else None, dgate if need_gate else None, dy if need_y else None


class _GatedFunction(torch.autograd.Function):
    """The eager twin of the registered gated_residual op + autograd (see _route)."""

    @staticmethod
    def forward(ctx, x, gate, y):
        _gated_setup(ctx, (x, gate, y), None)
        return _gated_impl(x, gate, y)

    @staticmethod
    def backward(ctx, grad):
        gate, y = ctx.saved_tensors
        shape, dtype = ctx.gate_meta
        by_reference = backward_by_reference(grad)
        if len(shape) == 3 or not by_reference:  # the kernels take a [B, C] gate as it is
            return _gated_grads(_gated_bwd_impl, ctx.needs_input_grad, grad, gate, y, ctx.gate_meta, by_reference)
        # the torch formulas (a double backward) take its [B, 1, C] form
        meta3 = ((shape[0], 1, shape[1]), dtype)
        dx, dgate, dy = _gated_grads(_gated_bwd_impl, ctx.needs_input_grad, grad, _as3(gate), y, meta3, True)
        return dx, dgate.view(shape) if dgate is not None else None, dy


# ------------------------------------------------------------------------- torch.library glue
for _key in ("CPU", "CUDA"):
    LIB.impl("adaln_modulate", _modulate_impl, _key)
    LIB.impl("adaln_modulate_backward", _modulate_bwd_impl, _key)
    LIB.impl("gated_residual", _gated_impl, _key)
    LIB.impl("gated_residual_backward", _gated_bwd_impl, _key)

torch.library.register_fake("genfast::adaln_modulate")(_modulate_fake)
torch.library.register_fake("genfast::adaln_modulate_backward")(_modulate_bwd_fake)
torch.library.register_fake("genfast::gated_residual")(lambda x, gate, y: x.new_empty(x.shape))
torch.library.register_fake("genfast::gated_residual_backward")(
    lambda grad, gate, y, needs: (y.new_empty(y.shape) if needs[0] else y.new_empty(0),
                                  gate.new_empty(gate.shape) if needs[1] else gate.new_empty(0)))
torch.library.register_autograd("genfast::adaln_modulate", _modulate_backward, setup_context=_modulate_setup)
torch.library.register_autograd("genfast::gated_residual", _gated_backward, setup_context=_gated_setup)
