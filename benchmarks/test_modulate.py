"""adaLN modulate and gated residual: genfast vs eager PyTorch, torch.compile and (GPU) Liger's LayerNorm.

The baselines are written as a DiT user writes them: `F.layer_norm(x, (C,), eps=eps) * (1 + scale[:, None])
+ shift[:, None]` (the reference DiT's `modulate(norm(x), shift, scale)`) and `x + gate[:, None] * y`.
Forward+backward cases take the gradient of x, shift and scale with torch.autograd.grad (nothing
accumulates into .grad between calls). Bytes per call: forward reads x and writes out; backward
also reads x and grad and writes dx (the [B, C] modulation and [B, N] statistics are noise).
"""
import pytest
import torch
import torch.nn.functional as F

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")
from genfast.testing import with_backend  # noqa: E402

CUDA = torch.cuda.is_available()
EPS = 1e-6
SHAPES = [(32, 1024, 1152), (32, 256, 1152)] if CUDA else [(8, 256, 1152)]  # DiT-XL/2 widths
DTYPES = {"bf16": torch.bfloat16} if CUDA else {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = {"eager": 2.0, "compile": 1.0} if not CUDA else None  # the CPU targets


def modulate_eager(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=EPS) * (1 + scale[:, None]) + shift[:, None]


def gated_eager(x, gate, y):
    return x + gate[:, None] * y


def _liger(x, shift, scale):
    """Liger-Kernel's plain LayerNorm (no modulation) on GPU: the best installable peer of the norm."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except Exception as e:  # reported as skipped, never dropped
        return f"liger_kernel not importable ({type(e).__name__}: {e})"
    if x.device.type != "cuda":
        return "Liger-Kernel runs on CUDA tensors only"
    w, b = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype), torch.zeros(x.shape[-1], device=x.device, dtype=x.dtype)
    return lambda: LigerLayerNormFunction.apply(x, w, b, EPS)


def _backend(x, op="adaln_modulate"):
    try:
        return genfast.ops.modulate.backend_for(x, op)
    except Exception:  # an internal helper: the benchmark must not depend on it
        return "?"


def _inputs(shape, dtype, device, grad=False):
    b, n, c = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(b, n, c), mk(b, c) * 0.1 if not grad else mk(b, c), mk(b, c)


def _per_backend(fn):
    """GPU: genfast forced through each of its GPU backends, as extra rows (which one should lead)."""
    return {f"genfast:{b}": with_backend(b, fn) for b in ("cuda", "triton")} if CUDA else {}


def _name(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_modulate_forward(compare, shape, dtype):
    x, shift, scale = _inputs(shape, DTYPES[dtype], compare.device)
    torch.testing.assert_close(genfast.adaln_modulate(x, shift, scale, eps=EPS), modulate_eager(x, shift, scale),
                               rtol=2e-2 if dtype != "fp32" else 1e-4, atol=2e-2 if dtype != "fp32" else 1e-4)
    compiled = compare.compile(modulate_eager)
    impls = {"genfast": lambda: genfast.adaln_modulate(x, shift, scale, eps=EPS),
             "eager": lambda: modulate_eager(x, shift, scale),
             "compile": lambda: compiled(x, shift, scale)}
    if CUDA:
        impls["liger_ln"] = _liger(x, shift, scale)
        impls.update(_per_backend(impls["genfast"]))
    compare(f"adaln_modulate fwd {dtype} {_name(shape)}", impls, bytes=2 * x.numel() * x.element_size(),
            targets=TARGETS, note=f"genfast backend: {_backend(x)}; liger_ln = LayerNorm only (no modulation)")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_modulate_forward_backward(compare, shape, dtype):
    x, shift, scale = _inputs(shape, DTYPES[dtype], compare.device, grad=True)
    grad = torch.randn_like(x)
    leaves = (x, shift, scale)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x, shift, scale), leaves, grad)

    compiled = compare.compile(modulate_eager)
    compare(f"adaln_modulate fwd+bwd {dtype} {_name(shape)}", {
        "genfast": fwd_bwd(lambda a, b, c: genfast.adaln_modulate(a, b, c, eps=EPS)),
        "eager": fwd_bwd(modulate_eager),
        "compile": fwd_bwd(compiled),
        **_per_backend(fwd_bwd(lambda a, b, c: genfast.adaln_modulate(a, b, c, eps=EPS))),
    }, bytes=5 * x.numel() * x.element_size(), targets=TARGETS, note=f"genfast backend: {_backend(x)}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:1], ids=_name)
def test_gated_residual_forward_backward(compare, shape, dtype):
    x, gate, _ = _inputs(shape, DTYPES[dtype], compare.device, grad=True)
    y = torch.randn_like(x).requires_grad_()
    grad = torch.randn_like(x)
    leaves = (x, gate, y)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(x, gate, y), leaves, grad)

    compiled = compare.compile(gated_eager)
    compare(f"gated_residual fwd+bwd {dtype} {_name(shape)}", {
        "genfast": fwd_bwd(genfast.gated_residual),
        "eager": fwd_bwd(gated_eager),
        "compile": fwd_bwd(compiled),
        **_per_backend(fwd_bwd(genfast.gated_residual)),
    }, bytes=6 * x.numel() * x.element_size(), note=f"genfast backend: {_backend(x, 'gated_residual')}; "
                                                      "bytes: fwd x, y, out; bwd grad, y, dy (dx is grad itself)")
