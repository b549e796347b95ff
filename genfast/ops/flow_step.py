"""The fused rectified-flow Euler / classifier-free-guidance step: checks, backend choice,
autograd and the torch.library registration (genfast::flow_euler_step and its out= variant).

    out = x - dt * ((1 + w) * v_cond - w * v_uncond)        (x - dt * v_cond without v_uncond)

dt and w arrive at the op as either a Python float or a float32 (fp64 for fp64 x) tensor [B] (stride 0 when one
value serves the batch), read on the device: no host synchronisation, so CUDA graphs and compiled
loops stay valid and a compiled loop does not recompile for every new dt.
"""
import torch

from genfast import _native, backends, reference
from genfast.ops._common import (
    DTYPE_CODE, LIB, check_float_tensor, check_like, cuda_stream, dispatcher_needed, finite, kernel_reasons, needs_grad,
    overlaps, rows_strides, rows_view, transformed)

OP = "flow_euler_step"
_SCHEMA_ARGS = "Tensor x, Tensor v_cond, Tensor? v_uncond, Tensor? dt, float dt_value, Tensor? w, float w_value"
LIB.define(f"flow_euler_step({_SCHEMA_ARGS}) -> Tensor")
LIB.define(f"flow_euler_step_out({_SCHEMA_ARGS}, Tensor(a!) out) -> ()")


def flow_euler_step(x, v_cond, v_uncond=None, *, dt, guidance=0.0, out=None):
    """One Euler step of rectified-flow sampling, with classifier-free guidance when v_uncond is given.

    Args:
        x: the current sample [B, ...] (fp32, fp16, bf16 or fp64).
        v_cond: the (conditional) velocity, same shape/dtype/device as x. Strided views such as the
            halves of `model(torch.cat([x, x]), ...).chunk(2)` are read in place, without a copy.
        v_uncond: the unconditional velocity, or None for a plain Euler step.
        dt: step size: a float, a 0-d tensor or a per-sample tensor [B] (on x's device).
        guidance: CFG weight w, same forms as dt; v = (1 + w) v_cond - w v_uncond. Ignored without
            v_uncond. A float must be finite; tensor values are not inspected (that would sync).
        out: where to write; may be x itself (in place), never a velocity. Not differentiable.
    Returns:
        x - dt * v in x's dtype, computed in fp32 (fp64 for fp64 inputs).
    """
    done = _fast_step(x, v_cond, v_uncond, dt, guidance, out)
    if done is not None:
        return done
    check_float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (at least 1-D), got a 0-d tensor")
    check_float_tensor("v_cond", v_cond)
    check_like("v_cond", v_cond, "x", x)
    if v_uncond is not None:
        check_float_tensor("v_uncond", v_uncond)
        check_like("v_uncond", v_uncond, "x", x)
    dt_t, dt_v = _coefficient("dt", dt, x)
    w_t, w_v = _coefficient("guidance", guidance, x) if v_uncond is not None else (None, 0.0)
    if transformed():  # torch.func / forward-mode AD: the reference (see genfast.ops._common.transformed)
        if out is not None:
            _check_out(out, x, v_cond, v_uncond, dt_t, w_t)
        step = reference.flow_euler_step(x, v_cond, v_uncond, dt=dt, guidance=guidance)
        return step if out is None else out.copy_(step)
    direct = _plain_eager_call(x, v_cond, v_uncond, dt_t, w_t)
    if out is None:
        if direct:
            out = torch.empty_like(x)
            _compute(out, x, v_cond, v_uncond, dt_t, dt_v, w_t, w_v)
            return out
        return torch.ops.genfast.flow_euler_step(x, v_cond, v_uncond, dt_t, dt_v, w_t, w_v)
    _check_out(out, x, v_cond, v_uncond, dt_t, w_t)
    if direct and type(out) is torch.Tensor:
        _compute(out, x, v_cond, v_uncond, dt_t, dt_v, w_t, w_v)
    else:
        torch.ops.genfast.flow_euler_step_out(x, v_cond, v_uncond, dt_t, dt_v, w_t, w_v, out)
    return out


_NUMBER = (float, int)  # not bool: type(True) is bool


def _fast_step(x, vc, vu, dt, w, out):
    """The sampler's call, done with the fewest Python steps (the step is launch-bound at small
    batch: ~9 us of checks around a ~3 us kernel otherwise): plain contiguous tensors of one kernel
    dtype, float dt and guidance, out None or x, no autograd, no dispatcher needed. It checks
    everything the general path would for such a call and returns the result; anything else
    returns None and takes the general path, which also raises the errors."""
    if dispatcher_needed():  # first: under torch.compile nothing below is traced
        return None
    T = torch.Tensor
    if type(x) is not T or type(vc) is not T or (vu is not None and type(vu) is not T):
        return None
    if type(dt) not in _NUMBER or (type(w) not in _NUMBER) or (out is not None and out is not x):
        return None
    if not (x.is_contiguous() and vc.is_contiguous() and (vu is None or vu.is_contiguous())):
        return None
    dtype = x.dtype
    if vc.dtype is not dtype or (vu is not None and vu.dtype is not dtype) or dtype not in DTYPE_CODE:
        return None
    shape = x.shape
    if vc.shape != shape or (vu is not None and vu.shape != shape) or not shape or not x.numel():
        return None
    if x.device != vc.device or (vu is not None and vu.device != x.device):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or vc.requires_grad or (vu is not None and vu.requires_grad)):
        return None
    if not (finite(dt) and finite(w)):
        return None
    name = backend_for(x)
    kernel = _FAST_KERNELS[name]
    if kernel is None:
        return None
    n = x.nbytes
    xp, cp = x.data_ptr(), vc.data_ptr()
    up = vu.data_ptr() if vu is not None else 0
    if out is None:
        out = torch.empty_like(x)
    elif (xp < cp + n and cp < xp + n) or (vu is not None and xp < up + n and up < xp + n):
        return None  # in place over a velocity: the general path names the error
    op = out.data_ptr()
    rows = shape[0]
    kernel(op, xp, cp, up, rows, x.numel() // rows, float(dt), float(w) if vu is not None else 0.0,
           DTYPE_CODE[dtype], cuda_stream(x) if name == "cuda" else 0)
    return out


class _FastKernels(dict):
    """backend name -> its compiled flow_step_contiguous, or None (Triton, the reference, or a
    compiled module built before that binding existed: those take the general path)."""

    def __missing__(self, name):
        mod = _native.for_backend(name) if name in _native.MODULE_OF else None
        self[name] = kernel = getattr(mod, "flow_step_contiguous", None)
        return kernel


_FAST_KERNELS = _FastKernels()


def _plain_eager_call(*tensors):
    """Plain eager call with no gradient: the kernel is called directly (~5 us saved a call; the step
    is launch-bound at small batch); everything else takes the registered op."""
    return not dispatcher_needed(*tensors) and not needs_grad(*tensors)


def _coefficient(name, value, x):
    """A float stays a float; a 0-d/[B] tensor becomes float32 [B] on x's device (no sync)."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a float or a floating tensor, got dtype {value.dtype}")
        b = x.shape[0]
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] not in (1, b)):
            raise ValueError(f"{name} must be a float, a 0-d tensor or a tensor of shape [{b}] (one per sample), "
                             f"got shape {tuple(value.shape)}")
        if value.device != x.device:
            if value.dim() == 0 and value.device.type == "cpu":
                value = value.to(x.device, non_blocking=True)  # a CPU scalar is a value, not a sync
            else:
                raise ValueError(f"{name} is on {value.device} but x is on {x.device}; expected the same device")
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32  # the kernels' math dtype
        return value.to(ct).reshape(-1).expand(b), 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not finite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return None, float(value)


def _check_out(out, x, v_cond, v_uncond, dt_t, w_t):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    check_like("out", out, "x", x)
    if torch.is_grad_enabled() and (out.requires_grad or x.requires_grad or v_cond.requires_grad or any(
            t is not None and t.requires_grad for t in (v_uncond, dt_t, w_t))):
        raise ValueError("out= is not differentiable: call flow_euler_step without out= when gradients are needed")
    if torch.compiler.is_compiling():
        return  # data pointers are not traceable; the eager path has checked the same call shapes
    if overlaps(out, v_cond, v_uncond):  # one span of out, then one per velocity
        name = "v_cond" if overlaps(out, v_cond) else "v_uncond"
        raise ValueError(f"out overlaps {name}; out may be x itself (in place) but never a velocity")
    if out is not x and overlaps(out, x) and (out.data_ptr() != x.data_ptr() or out.stride() != x.stride()):
        raise ValueError("out partially overlaps x; pass out=x for an in-place step, or a separate tensor")


# ----------------------------------------------------------------------------------- backends
_reasons = kernel_reasons  # fp32/fp16/bf16 on every kernel backend; fp64 goes to the reference


def backend_for(x):
    """The backend for x's device and dtype, cached per environment (GENFAST_BACKEND and
    TRITON_INTERPRET are read on every call, so tests and users may change them at any time)."""
    return backends.choose_cached(OP, x.device.type, (x.dtype,), _reasons)


def _compute(out, x, vc, vu, dt, dt_v, w, w_v):
    """Writes the step into out (which may be x). All checks are done."""
    if out.numel() == 0:
        return
    name = backend_for(x)
    if name == "reference":
        out.copy_(reference.flow_euler_step(x, vc, vu, dt=dt if dt is not None else dt_v,
                                            guidance=w if w is not None else w_v))
        return
    # Non-mergeable layouts (say a channels-last view) are copied: correct, just not fused.
    cols = x.numel() // x.shape[0]
    target, so = _as_rows(out, cols, for_output=True)
    x, sx = _as_rows(x, cols)
    vc, svc = _as_rows(vc, cols)
    vu, svu = _as_rows(vu, cols) if vu is not None else (None, (0, 0))
    if name == "triton":
        from genfast.kernels.flow_step import flow_step as triton_flow_step

        triton_flow_step(rows_view(target), rows_view(x), rows_view(vc), rows_view(vu) if vu is not None else None,
                         dt, w, dt_v, w_v)
    else:
        mod = _native.for_backend(name)
        stream = cuda_stream(x) if name == "cuda" else 0
        mod.flow_step(
            target.data_ptr(), x.data_ptr(), vc.data_ptr(), vu.data_ptr() if vu is not None else 0,
            x.shape[0], cols, *so, *sx, *svc, *svu,
            dt.data_ptr() if dt is not None else 0, dt.stride(0) if dt is not None else 0, dt_v,
            w.data_ptr() if w is not None else 0, w.stride(0) if w is not None else 0, w_v,
            DTYPE_CODE[x.dtype], stream)
    if target is not out:
        out.copy_(target)


def _as_rows(t, cols, for_output=False):
    """(tensor, (row stride, col stride)): t itself when its dims merge, else a contiguous copy
    (for an output: a fresh contiguous buffer, copied back by the caller)."""
    strides = rows_strides(t)
    if strides is not None:
        return t, strides
    t = torch.empty_like(t, memory_format=torch.contiguous_format) if for_output else t.contiguous()
    return t, (cols, 1)


# ------------------------------------------------------------------------ torch.library glue
def _functional(x, v_cond, v_uncond, dt, dt_value, w, w_value):
    out = torch.empty_like(x)
    _compute(out, x, v_cond, v_uncond, dt, dt_value, w, w_value)
    return out


def _out_variant(x, v_cond, v_uncond, dt, dt_value, w, w_value, out):
    _compute(out, x, v_cond, v_uncond, dt, dt_value, w, w_value)


for _key in ("CPU", "CUDA"):
    LIB.impl("flow_euler_step", _functional, _key)
    LIB.impl("flow_euler_step_out", _out_variant, _key)


@torch.library.register_fake("genfast::flow_euler_step")
def _fake(x, v_cond, v_uncond, dt, dt_value, w, w_value):
    return torch.empty_like(x)


@torch.library.register_fake("genfast::flow_euler_step_out")
def _fake_out(x, v_cond, v_uncond, dt, dt_value, w, w_value, out):
    return None


def _setup_context(ctx, inputs, output):
    x, v_cond, v_uncond, dt, dt_value, w, w_value = inputs
    ctx.dt_value, ctx.w_value, ctx.has_vu = dt_value, w_value, v_uncond is not None
    need_v = (dt is not None and dt.requires_grad) or (w is not None and w.requires_grad)
    ctx.save_for_backward(dt, w, v_cond if need_v else None, v_uncond if need_v else None)


def _backward(ctx, grad):
    """d/dx = 1, d/dv_cond = -dt (1 + w), d/dv_uncond = dt w; dt and w get theirs when they need it."""
    dt, w, v_cond, v_uncond = ctx.saved_tensors
    shape = (-1,) + (1,) * (grad.dim() - 1)
    g = grad.float() if grad.dtype != torch.float64 else grad
    dt_b = dt.reshape(shape) if dt is not None else ctx.dt_value
    w_b = (w.reshape(shape) if w is not None else ctx.w_value) if ctx.has_vu else 0.0
    d_vc = (g * (-dt_b * (1 + w_b))).to(grad.dtype) if ctx.needs_input_grad[1] else None
    d_vu = (g * (dt_b * w_b)).to(grad.dtype) if ctx.has_vu and ctx.needs_input_grad[2] else None
    d_dt = d_w = None
    if dt is not None and ctx.needs_input_grad[3]:
        v = v_cond.to(g.dtype) if not ctx.has_vu else (1 + w_b) * v_cond.to(g.dtype) - w_b * v_uncond.to(g.dtype)
        d_dt = -(g * v).reshape(g.shape[0], -1).sum(1).to(dt.dtype)
    if w is not None and ctx.has_vu and ctx.needs_input_grad[5]:
        d_w = -(g * dt_b * (v_cond.to(g.dtype) - v_uncond.to(g.dtype))).reshape(g.shape[0], -1).sum(1).to(w.dtype)
    return grad if ctx.needs_input_grad[0] else None, d_vc, d_vu, d_dt, None, d_w, None


torch.library.register_autograd("genfast::flow_euler_step", _backward, setup_context=_setup_context)
