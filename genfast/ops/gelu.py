"""GELU with the tanh approximation (the DiT / timm MLP activation), differentiable, registered as
genfast::gelu_tanh (+ genfast::gelu_tanh_backward) with fakes, so modules using it compile.

Why: torch 2.13's CPU kernel for F.gelu(approximate="tanh") is slow next to its erf GELU. Over the
2048 x 1536 fc1 output of a DiT-S block, one thread of the 2-core machine: bf16 4.1 ms (torch) vs
1.4 ms (this kernel) forward, 4.1 vs 2.4 ms backward; fp32 9.2 vs 7.9 ms, where both are dominated by
page-faulting the fresh output in (gelu_tanh_inference() below runs in place and skips that). Under
load the torch kernel measured up to 24 ms. The CPU kernel (csrc/cpu/gelu.cpp) is one vectorised
pass, fp32 math, same error as torch's (checked against fp64 in tests/test_gelu.py). On the 2-core
AVX2-only AMD EPYC (best of 30, same tensor, 2 threads), forward / backward: fp32 1.1 / 1.6 ms vs
torch's 6.0 / 6.3; bf16 1.6 / 2.3 vs 6.3 / 6.5 (its AVX2 code was scalar libm expf before: 11.7 /
17.1 ms fp32).

Backends: "cpu" (genfast._C, fp32/fp16/bf16) on CPU tensors; torch's own F.gelu everywhere else
(CUDA, fp64, GENFAST_BACKEND=reference, a missing _C), which gives the same answer.

gelu_tanh_backward_bias(grad, h) -> (dh, dbias) is the MLP backward's fused pass: dh and the fc1
bias gradient dh.sum(0) in one read of grad and h (csrc/cpu/gelu.cpp, csrc/cuda/gelu.cu,
kernels/gelu.py), the sums in the same chunks and order on every backend. column_sums is its
activation-free twin (a fused qkv projection's bias gradients).
"""
import torch
import torch.nn.functional as F

from genfast import _native, backends
from genfast.ops._common import (
    DTYPE_CODE, LIB, check_float_tensor, check_like, cuda_stream, dispatcher_needed, kernel_reasons, needs_grad,
    backward_by_reference, graph_grads, reused_buffer, transformed)

LIB.define("gelu_tanh(Tensor x) -> Tensor")
LIB.define("gelu_tanh_backward(Tensor grad, Tensor x) -> Tensor")


def gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), as F.gelu(x, approximate="tanh").
    x: any shape and strides, fp32/fp16/bf16 (fp64 runs on torch's kernel). Returns a new
    contiguous tensor of x's dtype."""
    check_float_tensor("x", x)
    # torch's own op and C++ autograd: no Python node (costly on a GPU's backward thread); also what
    # torch.func transforms and forward-mode AD differentiate (genfast.ops._common.transformed)
    if not _uses_kernel(x) or transformed():
        return F.gelu(x, approximate="tanh").contiguous()
    return torch.ops.genfast.gelu_tanh(x)


def gelu_tanh_inference(x):
    """gelu_tanh(x) that may overwrite x: in plain eager mode without autograd, on a contiguous CPU
    tensor, the kernel runs in place (no second activation-sized buffer, which large allocations
    pay for in page faults on every call); otherwise exactly gelu_tanh(x). For callers that own x
    (an fc1 output)."""
    if not (needs_grad(x) or dispatcher_needed(x)) and x.is_contiguous() and _uses_kernel(x):
        _native.module("_C").gelu_tanh(x.data_ptr(), x.data_ptr(), x.numel(), DTYPE_CODE[x.dtype])
        return x
    return gelu_tanh(x)


# The last output buffer of each direction and dtype (CPU), reused once nothing else holds it: an MLP's
# activations are its largest tensors, and a fresh one page-faults in on every training step (measured
# in the DiT-S block: the backward kernel 0.75 ms into warm memory, 1.3-2.5 ms into a fresh buffer).
# free_workspace() drops them.
_kept = {}


def free_workspace():
    _kept.clear()


def _uses_kernel(x):
    if x.device.type != "cpu" or x.dtype not in DTYPE_CODE or backends.forced() not in (None, "cpu"):
        return False
    return _native.module("_C") is not None


def _fwd_impl(x):
    if not _uses_kernel(x):
        return F.gelu(x, approximate="tanh").contiguous()
    x = x.contiguous()
    y = reused_buffer(_kept, ("fwd", x.dtype), x.shape, x.dtype, x.device)
    _native.module("_C").gelu_tanh(x.data_ptr(), y.data_ptr(), x.numel(), DTYPE_CODE[x.dtype])
    return y


def fwd_bias_fp32(h, bias, inplace, out=None):
    """gelu_tanh(h + bias) for fp32 contiguous CPU h [M, K] made by a GEMM without its bias (the DiT
    block's fused path): h + bias is written back into h (the Linear's output, which the backward
    reads) and the activation goes to out, a kept buffer where out is None, or over h with inplace
    (inference). Callers check fp32, contiguity and _uses_kernel."""
    y = h if inplace else out if out is not None else reused_buffer(_kept, ("fwd", h.dtype), h.shape, h.dtype, h.device)
    _native.module("_C").gelu_tanh_bias_fp32(h.data_ptr(), y.data_ptr(), bias.data_ptr(), h.shape[0], h.shape[1])
    return y


def _bwd_impl(grad, x):
    if not _uses_kernel(x):
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh").contiguous()
    grad, x = grad.contiguous(), x.contiguous()
    dx = reused_buffer(_kept, ("bwd", x.dtype), x.shape, x.dtype, x.device)
    _native.module("_C").gelu_tanh_backward(grad.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(),
                                            DTYPE_CODE[x.dtype])
    return dx


for _key in ("CPU", "CUDA"):
    LIB.impl("gelu_tanh", _fwd_impl, _key)
    LIB.impl("gelu_tanh_backward", _bwd_impl, _key)


@torch.library.register_fake("genfast::gelu_tanh")
def _fake_fwd(x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.register_fake("genfast::gelu_tanh_backward")
def _fake_bwd(grad, x):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    if backward_by_reference(grad):  # create_graph or batched grads (backward_by_reference)
        return graph_grads(lambda x: F.gelu(x, approximate="tanh"), (x,), (True,), (grad,))[0]
    return torch.ops.genfast.gelu_tanh_backward(grad, x)


torch.library.register_autograd("genfast::gelu_tanh", _backward, setup_context=_setup_context)


# ------------------------------------------------------------------- backward + bias gradient
_reasons = kernel_reasons  # both fused passes run on the four kernel backends, fp32 / fp16 / bf16
ROWS = 32  # rows per partial column sum of dbias: a constant, so every backend and device sums alike
GROUP = 32  # chunk sums added per first-level sum (then the groups' sums): see csrc/gelu.h


def gelu_tanh_backward_bias(grad, h):
    """(dh, dbias) of a = gelu_tanh(h) for h = x @ w.t() + b: dh = grad * gelu_tanh'(h) and
    dbias = dh.sum(0), in one pass over grad and h on the GPU backends.

    Args:
        grad: [M, K] gradient of the activation; h's dtype and device.
        h: [M, K] pre-activation, fp32 / fp16 / bf16 (fp64 runs on the reference). Non-contiguous
            inputs are copied.
    Returns:
        dh: [M, K] contiguous, h's dtype: computed in fp32, rounded once.
        dbias: [K], h's dtype: the column sums of the rounded dh values, accumulated in fp32 as
            partial sums over fixed chunks of ROWS rows, added in order in groups of GROUP chunks,
            then the groups in order, rounded once (the same bits on every call, and on the Triton
            and CUDA kernels where their dh agree).
    """
    check_float_tensor("grad", grad)
    check_float_tensor("h", h)
    if h.dim() != 2:
        raise ValueError(f"h must be 2-D [M, K] (rows, features), got shape {tuple(h.shape)}")
    check_like("grad", grad, "h", h)
    return _bwd_bias_impl(grad, h)


def _bwd_bias_impl(grad, h):
    """gelu_tanh_backward_bias without the argument checks (callers that made grad and h: the DiT block)."""
    m, k = h.shape
    dtype = h.dtype
    if m == 0 or k == 0:
        return torch.empty(m, k, dtype=dtype, device=h.device), torch.zeros(k, dtype=dtype, device=h.device)
    grad, h = _contig(grad), _contig(h)
    name = backends.choose_cached("gelu_tanh_backward_bias", h.device.type, (dtype,), _reasons)
    if name == "reference":
        dh = torch.ops.aten.gelu_backward(grad, h, approximate="tanh").contiguous()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return dh, dh.to(acc).sum(0).to(dtype)
    dh = (reused_buffer(_kept, ("bwd", dtype), (m, k), dtype, h.device) if name == "cpu"  # as _bwd_impl's
          else torch.empty(m, k, dtype=dtype, device=h.device))
    dbias = torch.empty(k, dtype=dtype, device=h.device)
    partial = _sums_workspace(m, k, h.device)
    if name == "triton":
        from genfast.kernels import gelu as tk

        tk.gelu_tanh_backward_bias(dh, dbias, partial, grad, h, M=m, K=k, chunk_rows=ROWS, chunk_group=GROUP)
    else:
        # positional: pybind11 matches keywords ~3 us slower per call (host-bound DiT block backward)
        _native.for_backend(name).gelu_tanh_backward_bias(
            dh.data_ptr(), dbias.data_ptr(), partial.data_ptr(), grad.data_ptr(), h.data_ptr(), m, k, ROWS, GROUP,
            DTYPE_CODE[dtype], cuda_stream(h) if name == "cuda" else 0)
    return dh, dbias


def _contig(t):
    return t if t.is_contiguous() else t.contiguous()  # (is_contiguous: ~0.3 us; contiguous(): ~1-2 us)


def _sums_workspace(m, width, device):
    """The kernels' fp32 workspace for the column sums of m rows: chunks of ROWS rows, padded to whole
    groups of GROUP chunks, then one row per group (csrc/gelu.h)."""
    ngroups = -(-m // (ROWS * GROUP))
    return torch.empty(ngroups * (GROUP + 1), width, dtype=torch.float32, device=device)


def column_sums(tensors):
    """[sum of widths] column sums of [t0 | t1 | t2] (1 to 3 [M, width_i] tensors of one dtype and
    device): the bias gradients of a fused qkv projection from its q, k and v gradients, one pass on
    the GPU kernels (chunks of ROWS rows, groups of GROUP chunks, fp32, as gelu_tanh_backward_bias),
    torch's sums elsewhere. For genfast's own callers: no argument checks."""
    m, dtype, dev = tensors[0].shape[0], tensors[0].dtype, tensors[0].device
    total = sum(t.shape[1] for t in tensors)
    if m == 0:
        return torch.zeros(total, dtype=dtype, device=dev)
    name = backends.choose_cached("column_sums", dev.type, (dtype,), _reasons)
    if name == "reference":
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return torch.cat([t.sum(0, dtype=acc) for t in tensors]).to(dtype)
    tensors = [_contig(t) for t in tensors]
    out = torch.empty(total, dtype=dtype, device=dev)
    partial = _sums_workspace(m, total, dev)
    if name == "triton":
        from genfast.kernels import gelu as tk

        tk.column_sums(tensors, out, partial, M=m, chunk_rows=ROWS, chunk_group=GROUP)
    else:
        _native.for_backend(name).column_sums(
            [t.data_ptr() for t in tensors], [t.shape[1] for t in tensors], out.data_ptr(), partial.data_ptr(), m,
            ROWS, GROUP, DTYPE_CODE[dtype], cuda_stream(out) if name == "cuda" else 0)
    return out
