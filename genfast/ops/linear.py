"""linear(x, weight, bias) = x weight^T + bias, as F.linear, for genfast's modules (genfast.nn,
the zoo, genfast.patch). Two CPU cases run GEMMs of genfast's choosing, forward and backward
(own_gemm_case); everything else is F.linear.

1. fp32 on oneDNN's GEMM (torch.ops.mkldnn._linear_pointwise, shipped in torch's CPU builds)
   instead of the BLAS behind F.linear, where that measured faster (USE_ONEDNN). torch's CPU builds
   call MKL for fp32 matmul, which on the 2-core AMD EPYC (AVX-512) of this project runs at under half
   oneDNN's rate (consistent with MKL's AVX2 code path on AMD CPUs). 2 threads, torch 2.13, by-hand
   timings, median of 20-300 calls, quiet machine:

    GEMM [M, K] x [K, N]          F.linear / mm (MKL)    oneDNN
    forward 2048x384 -> 1152        208 GFLOP/s          480 GFLOP/s
    forward 640x128 -> 512          ~200                 ~420
    dX = dY W (2048x1152 -> 384)    213                  438
    dW = dY^T X (strided views)     190-212              257-357

   Same fp32 arithmetic (oneDNN's fp32 math mode is strict IEEE by default; sums in another order).

2. bf16 / fp16 where the CPU has no instructions for 16-bit GEMMs (WIDENED): the operands widened
   to fp32 (exact), one fp32 GEMM, the result rounded once to the 16-bit dtype. That is the
   arithmetic of torch's own 16-bit CPU GEMMs (fp32 accumulation, one rounding at the end) in
   another summation order; without avx512_bf16 / amx_bf16 (avx512_fp16 / amx_fp16) torch's run
   at a fraction of its fp32 rate. 2-core AVX2-only AMD EPYC, torch 2.13, best of 5, GFLOP/s
   (DiT-S GEMMs, M = 2048):

    GEMM                          torch bf16   widened bf16   torch fp16   widened fp16
    forward 384 -> 1152              13            100            16            66
    dW = dY^T X                      16            114             5            89
    dX = dY W                         2            121             2           104

   Costs a transient fp32 copy of the operands and of the [M, N] product per call.

Under CPU autocast to a widened dtype, calls make autocast's casts themselves and take case 2, eager
and compiled (a compiled DiT-S block's forward + backward under bf16 autocast: 5.7 s -> 0.31-0.37 s
on the AVX2 AMD EPYC). Under torch.compile (CPU) both are the custom op genfast::linear (+ genfast::linear_backward), which
Inductor calls as an opaque kernel: compiled code keeps these GEMMs (Inductor's own CPU GEMMs go
through the same BLAS as F.linear unless its freezing is on). Results differ from F.linear by
rounding only: tests/test_linear.py holds them to the tolerance rule. F.linear takes other dtypes
and devices, autocast elsewhere, tensor subclasses / functorch transforms,
empty inputs, GENFAST_BACKEND=reference, and the cases switched off (USE_ONEDNN, WIDENED).
"""
import torch
from torch.nn.modules import module as _module_mod
import torch.nn.functional as F

from genfast import backends
from genfast.ops._common import LIB, backward_by_reference, cpu_flags, cpu_vendor, dispatcher_needed, graph_grads

# False: F.linear everywhere. Default: oneDNN except on Intel CPUs, where MKL runs its AVX-512 code
# and came out ahead (2-core Intel Xeon, 2026-11-26, DiT-S GEMMs 2048x384 -> 1152 / 384 / 1536 and
# 2048x1536 -> 384, GFLOP/s forward, forward + backward: MKL 353-375, 330-359; oneDNN 332-359,
# 225-285; the DiT-S fp32 block's forward + backward measured 0.88x eager with oneDNN there). Not on
# CPUs without AVX-512 either: on a 2-core AVX2-only AMD EPYC (2026-11-27, same GEMMs) oneDNN tied
# forward (107-139 GFLOP/s both) and lost forward + backward (20.3-52.0 vs 17.5-37.2 ms, 0.71-0.89x),
# and the DiT-S fp32 block's forward + backward ran 0.89x eager with it.
def default_use_onednn():
    return cpu_vendor() != "GenuineIntel" and "avx512f" in cpu_flags()


USE_ONEDNN = default_use_onednn()

# Known at import: asked lazily inside torch.compile's trace, torch.backends.mkldnn.is_available is
# a function dynamo refuses to trace (a fullgraph compile as the process's first genfast call failed).
_AVAILABLE = bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # a module's weights are Parameters


# The 16-bit dtypes whose CPU GEMMs run widened to fp32 (case 2 of the module docstring): x86 CPUs
# (AVX2, the class measured) without the instructions torch's 16-bit GEMMs use. Elsewhere
# (AVX-512 BF16 / AMX: the Intel Xeon and AVX-512 AMD EPYC of earlier sessions; ARM) F.linear.
def default_widened(flags=None):
    flags = cpu_flags() if flags is None else flags
    if "avx2" not in flags:
        return frozenset()
    out = set()
    if not flags & {"avx512_bf16", "amx_bf16"}:
        out.add(torch.bfloat16)
    if not flags & {"avx512_fp16", "amx_fp16"}:
        out.add(torch.float16)
    return frozenset(out)


WIDENED = default_widened()


def onednn_available():
    return _AVAILABLE


def own_gemm_case(x, weight, bias):
    """Whether this linear runs genfast's CPU GEMMs (fp32 on oneDNN, or 16-bit widened to fp32), from
    device, dtypes, ranks and flags only (no data-dependent check: under torch.compile it adds no
    guard on shapes)."""
    dt = x.dtype
    if x.device.type != "cpu" or weight.dtype != dt:
        return False
    if not ((dt == torch.float32 and USE_ONEDNN and onednn_available()) or dt in WIDENED):
        return False
    if bias is not None and (bias.dtype != dt or bias.dim() != 1):
        return False
    if x.dim() < 2 or weight.dim() != 2 or torch.is_autocast_enabled("cpu"):
        return False
    return backends.forced() in (None, "cpu")


def _autocast_widened(x, weight, bias):
    """Under CPU autocast to a dtype in WIDENED: that dtype, where F.linear would cast x, weight and bias
    (plain fp32 or already that dtype, CPU, not empty) to it and run torch's 16-bit GEMM; else None."""
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return None
    dt = torch.get_autocast_dtype("cpu")
    if dt not in WIDENED or backends.forced() not in (None, "cpu"):
        return None
    if not torch.compiler.is_compiling() and dispatcher_needed(x):  # (compiled: the op genfast::linear)
        return None
    for t in (x, weight, bias):
        if t is not None and (type(t) not in _PLAIN or t.device.type != "cpu" or t.dtype not in (torch.float32, dt)):
            return None
    if x.dim() < 2 or x.numel() == 0 or weight.numel() == 0 or (bias is not None and bias.dim() != 1):
        return None
    return dt


def _takes_own_gemm(x, weight, bias):
    """Eager calls: own_gemm_case, plain tensors (subclasses and transforms take F.linear), not empty."""
    if dispatcher_needed(x) or any(t is not None and type(t) not in _PLAIN for t in (weight, bias)):
        return False
    return x.numel() > 0 and weight.numel() > 0 and own_gemm_case(x, weight, bias)


def gemm_nt(a, b_t):
    """a [M, K] @ b_t^T for b_t [N, K] (either may be a strided view) on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


def _onednn32():
    """Whether fp32 GEMMs (also the widened ones) run on oneDNN here."""
    return USE_ONEDNN and onednn_available()


def _mm32(a, b):
    """a @ b for fp32 [M, K] and [K, N] (strided views welcome): oneDNN or torch's BLAS."""
    return gemm_nt(a, b.t()) if _onednn32() else torch.mm(a, b)


def _forward_2d(x, weight, bias):
    """[M, N] = x [..., K] flattened to M rows, times weight^T, plus bias: oneDNN for fp32, widened
    to fp32 for 16-bit dtypes (own_gemm_case)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x.dtype == torch.float32:
        return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")
    b32 = None if bias is None else bias.float()
    w32 = weight.float()
    y = (torch.ops.mkldnn._linear_pointwise(x2.float(), w32, b32, "none", [], "") if _onednn32()
         else F.linear(x2.float(), w32, b32))
    return y.to(x.dtype)


def _grads(dy, x, weight, mask):
    """(dx, dw, db) for the True entries of mask (None elsewhere): oneDNN's fp32 GEMMs, fp32 GEMMs
    of widened operands for 16-bit dtypes (rounded once), torch's for empty operands."""
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    empty = dy2.numel() == 0 or x2.numel() == 0
    db = dy2.sum(0) if mask[2] else None
    if x.dtype != torch.float32 and not empty:
        dt, dy32 = x.dtype, dy2.float()
        dx = _mm32(dy32, weight.float()).to(dt).view(x.shape) if mask[0] else None
        dw = _mm32(dy32.t(), x2.float()).to(dt) if mask[1] else None
        return dx, dw, db
    fast = not empty and onednn_available()
    dx = (gemm_nt(dy2, weight.t()) if fast else dy2 @ weight).view(x.shape) if mask[0] else None
    dw = (gemm_nt(dy2.t(), x2.t()) if fast else dy2.t() @ x2) if mask[1] else None
    return dx, dw, db


class _OwnGemmLinear(torch.autograd.Function):
    """The eager path with autograd (skips the op's dispatch): the same forward and gradients as
    genfast::linear and genfast::linear_backward below."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        _setup_context(ctx, (x, weight, bias), None)
        # 2-D out: a view made here would forbid in-place updates of the result (autograd's rule
        # for views created inside a custom Function); linear() reshapes it outside
        return _forward_2d(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        if backward_by_reference(dy):
            return _graph_grads(ctx, dy, x, weight, bias)
        need = ctx.needs_input_grad
        with torch.autocast("cpu", enabled=False):  # (a backward called inside a CPU autocast region)
            return _grads(dy, x, weight, (need[0], need[1], ctx.has_bias and need[2]))


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), on genfast's CPU GEMMs where those are faster (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"linear: x and weight must be tensors, got {type(x).__name__} and {type(weight).__name__}")
    if x.shape[-1:] != weight.shape[-1:] or weight.dim() != 2:
        raise ValueError(f"linear: x [..., {x.shape[-1] if x.dim() else '?'}] does not match weight "
                         f"{tuple(weight.shape)} (expected [out_features, {x.shape[-1] if x.dim() else 'in'}])")
    # genfast's own GEMMs are CPU-only: elsewhere F.linear at once, without the ~15 Python-level checks
    # below (host time, which bounds small GPU calls)
    if x.device.type != "cpu":
        return F.linear(x, weight, bias)
    compiling = torch.compiler.is_compiling()
    if compiling and own_gemm_case(x, weight, bias):
        return torch.ops.genfast.linear(x, weight, bias)
    if compiling or not _takes_own_gemm(x, weight, bias):
        dt = _autocast_widened(x, weight, bias)
        if dt is None:
            return F.linear(x, weight, bias)
        # autocast's own casts (differentiable: gradients return in the inputs' dtypes), then the
        # widened GEMMs with autocast off (it would cast their fp32 operands back to 16 bits)
        with torch.autocast("cpu", enabled=False):
            return linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        y = _OwnGemmLinear.apply(x, weight, bias)
    else:
        y = _forward_2d(x, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def has_hooks(module):
    """Whether calling module would run hooks (its own or global forward / backward ones): then it must
    be called, not bypassed. (The old-style torch.nn.utils.weight_norm / spectral_norm compute the
    weight in a forward pre-hook: bypassing it would use a stale weight.)"""
    return own_hooks(module) or global_hooks()


def own_hooks(module):
    """Whether module has hooks of its own (has_hooks without the global ones)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def global_hooks():
    """Whether global module hooks are registered (torch.nn.modules.module.register_module_*_hook)."""
    g = _module_mod
    return bool(g._global_forward_pre_hooks or g._global_forward_hooks or g._global_backward_pre_hooks
                or g._global_backward_hooks)


def plain_linear(layer):
    """Whether layer(x) is exactly F.linear(x, layer.weight, layer.bias) with a Parameter weight: a
    torch.nn.Linear (not a subclass or a parametrized one), no hooks."""
    return plain_linear_own(layer) and not global_hooks()


def plain_linear_own(layer):
    """plain_linear without the global hooks (callers checking many layers ask global_hooks() once)."""
    return type(layer) is torch.nn.Linear and "weight" in layer._parameters and not own_hooks(layer)


def linear_layer(layer, x):
    """layer(x) for a module: linear() over its weight and bias for a plain nn.Linear (plain_linear),
    the module's own call for anything else (LoRA, quantised or other wrappers, hooks keep their code)."""
    return linear(x, layer.weight, layer.bias) if plain_linear(layer) else layer(x)


# ------------------------------------------------------------------ torch.library op (compile)
LIB.define("linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
LIB.define("linear_backward(Tensor grad, Tensor x, Tensor weight, bool[3] mask) -> (Tensor, Tensor, Tensor)")


def _op_fwd(x, weight, bias):
    if x.numel() == 0 or weight.numel() == 0 or (x.dtype == torch.float32 and not onednn_available()):
        return F.linear(x, weight, bias).contiguous()
    return _forward_2d(x, weight, bias).view(*x.shape[:-1], weight.shape[0])


def _op_bwd(grad, x, weight, mask):
    none = grad.new_empty((0,))  # an op returns tensors: empty where no gradient is asked for
    return tuple(none if g is None else g for g in _grads(grad, x, weight, mask))


for _key in ("CPU", "CUDA"):
    LIB.impl("linear", _op_fwd, _key)
    LIB.impl("linear_backward", _op_bwd, _key)


@torch.library.register_fake("genfast::linear")
def _fake_fwd(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("genfast::linear_backward")
def _fake_bwd(grad, x, weight, mask):
    none = grad.new_empty((0,))
    return (x.new_empty(x.shape) if mask[0] else none, weight.new_empty(weight.shape) if mask[1] else none,
            grad.new_empty((weight.shape[0],)) if mask[2] else none)


def _setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, bias)  # bias: for a double backward only (a parameter: no memory)
    ctx.has_bias = bias is not None


def _graph_grads(ctx, grad, x, weight, bias):
    """create_graph or batched grads: F.linear's gradients through autograd (genfast.ops._common.graph_grads),
    its output in the node's output shape (the eager Function's is [M, N]: linear() reshapes it)."""
    fn = lambda x, w, b: F.linear(x, w, b).reshape(grad.shape)  # noqa: E731
    return graph_grads(fn, (x, weight, bias), ctx.needs_input_grad[:3], (grad,))


def _backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    if backward_by_reference(grad):
        return _graph_grads(ctx, grad, x, weight, bias)
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
    dx, dw, db = torch.ops.genfast.linear_backward(grad, x, weight, mask)
    return dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None


torch.library.register_autograd("genfast::linear", _backward, setup_context=_setup_context)
