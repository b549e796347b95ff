"""genfast.ops.gelu.gelu_tanh against F.gelu(approximate="tanh") (DESIGN.md §5 tolerance)."""
import pytest
import torch
import torch.nn.functional as F

import genfast

from genfast.ops.gelu import gelu_tanh, gelu_tanh_inference
from genfast.testing import assert_within_reference_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cases(dtype):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3, 1037, generator=g) * 4  # odd length: the 16-lane tails
    wide = torch.cat([torch.linspace(-30, 30, 301), torch.tensor([0.0, -0.0, 1e-8, -1e-8])])
    return {
        "odd": big.to(dtype),
        "wide_range": wide.to(dtype),
        "non_contiguous": (torch.randn(40, 33, generator=g) * 3).to(dtype).t(),
        "one": torch.tensor([0.5]).to(dtype),
        "empty": torch.empty(0, 7, dtype=dtype),
    }


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_torch(dtype, backend, use_backend):
    use_backend(backend)
    for name, x in _cases(dtype).items():
        x = x.detach().requires_grad_(True)
        g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        y = gelu_tanh(x)
        assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
        (dx,) = torch.autograd.grad(y, x, g)
        xl = x.detach().requires_grad_(True)
        yl = F.gelu(xl, approximate="tanh")
        (dxl,) = torch.autograd.grad(yl, xl, g)
        xh = x.detach().double().requires_grad_(True)
        yh = F.gelu(xh, approximate="tanh")
        (dxh,) = torch.autograd.grad(yh, xh, g.double())
        assert_within_reference_error(name, y, yl, yh, floor=1e-6)
        assert_within_reference_error(f"{name}: dx", dx, dxl, dxh, floor=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_special_values_as_torch(dtype, backend, use_backend):
    """NaN, +-inf and values past fp32's exp range give torch's answers (NaN for -inf and NaN, inf
    for inf, -0 and x for huge negative and positive x); values deep in the negative tail may be
    tinier than torch's -0 (its 1 + tanh(u) cancels there) but not larger."""
    use_backend(backend)
    x = torch.tensor([float("-inf"), float("inf"), float("nan"), -1e30, 1e30, -1000.0, -20.0, -9.0, 0.0, 3.0]).to(dtype)
    got, want = gelu_tanh(x), F.gelu(x, approximate="tanh")
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (got, want)
    finite = ~torch.isnan(want)
    assert torch.equal(torch.isinf(got[finite]), torch.isinf(want[finite])) and torch.equal(got[4], want[4])
    torch.testing.assert_close(got[finite & ~torch.isinf(want)], want[finite & ~torch.isinf(want)],
                               rtol=2 * torch.finfo(dtype).eps, atol=1e-20)


def test_opcheck_and_compile():
    x = torch.randn(5, 19)
    torch.library.opcheck(torch.ops.genfast.gelu_tanh.default, (x,))
    torch.library.opcheck(torch.ops.genfast.gelu_tanh_backward.default, (torch.randn(5, 19), x))
    x.requires_grad_(True)
    fn = lambda t: (gelu_tanh(t * 2.0) ** 2).sum()  # noqa: E731
    eager = torch.autograd.grad(fn(x), x)[0]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, fn(x))
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], eager)


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x"):
        gelu_tanh(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="x"):
        gelu_tanh([1.0, 2.0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inference_variant_in_place_only_without_autograd(dtype):
    x = (torch.randn(4, 37) * 3).to(dtype)
    want = gelu_tanh(x)
    with torch.no_grad():
        xc = x.clone()
        y = gelu_tanh_inference(xc)
        assert y.data_ptr() == xc.data_ptr()  # in place
        t = x.t()  # not contiguous: a new tensor, x untouched
        assert not torch.equal(gelu_tanh_inference(t), t) and torch.equal(t, x.t())
    torch.testing.assert_close(y, want, atol=0, rtol=0)
    xg = x.clone().requires_grad_(True)
    yg = gelu_tanh_inference(xg)  # autograd on: never in place
    assert yg.data_ptr() != xg.data_ptr()
    torch.testing.assert_close(yg, want, atol=0, rtol=0)
    (yg.float().sum()).backward()
    assert xg.grad is not None and torch.isfinite(xg.grad.float()).all()


def test_output_buffers_reused_only_when_free(reuse_small_buffers):
    """The CPU kernel's outputs come from a kept buffer once nothing else holds it (no page faults
    every step), never while a caller still holds the last one; values unaffected."""
    from genfast.ops import gelu

    gelu.free_workspace()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 96, generator=gen).requires_grad_()
    g = torch.randn(64, 96, generator=gen)
    y1 = gelu_tanh(x)
    y2 = gelu_tanh(x)  # y1 still held: a new buffer
    assert y1.data_ptr() != y2.data_ptr()
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    ptr = y2.data_ptr()
    del y1, y2
    y3 = gelu_tanh(x)  # the kept buffer is free again: reused
    assert y3.data_ptr() == ptr
    (d1,) = torch.autograd.grad(y3, x, g)
    (d2,) = torch.autograd.grad(gelu_tanh(x), x, g)
    assert d1.data_ptr() != d2.data_ptr()  # d1 held
    torch.testing.assert_close(d1, d2, rtol=0, atol=0)
    x64 = x.detach().double().requires_grad_()
    high = torch.autograd.grad(F.gelu(x64, approximate="tanh"), x64, g.double())[0]
    assert_within_reference_error("dx", d1, torch.autograd.grad(F.gelu(x, approximate="tanh"), x, g)[0], high)
    genfast.free_workspace()
    assert not gelu._kept


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_torch_way_has_no_python_autograd_node(backend, use_backend):
    """Where genfast's kernel does not run (GPUs, fp64, a forced reference), gelu_tanh is torch's own
    F.gelu under its C++ autograd: no Python backward node, which costs most on a GPU's backward
    thread (benchmarks/gpu/NOTES.md). The kernel way goes through the registered op."""
    use_backend(backend)
    x = torch.randn(4, 9, requires_grad=True)
    name = type(gelu_tanh(x).grad_fn).__name__
    assert name.startswith("GeluBackward") == (backend == "reference"), name
    assert type(gelu_tanh(x.double()).grad_fn).__name__.startswith("GeluBackward")


@pytest.mark.parametrize("rows,cols", [(5, 37), (3, 1536), (1, 1), (0, 7)])
def test_bias_folded_forward_fp32(rows, cols):
    """gelu_tanh(h + bias) with the bias folded in (the DiT block's fp32 CPU path): h + bias written
    back into h exactly as torch adds it, the activation within the reference error, in place or
    into a buffer alike; odd widths reach the masked 16-lane tail."""
    from genfast.ops.gelu import _uses_kernel, fwd_bias_fp32

    g = torch.Generator().manual_seed(2)
    h0, bias = torch.randn(rows, cols, generator=g) * 3, torch.randn(cols, generator=g)
    if not _uses_kernel(h0):
        pytest.skip("the CPU kernels are not built")
    want_h = h0 + bias
    h = h0.clone()
    y = fwd_bias_fp32(h, bias, inplace=False)
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    assert_within_reference_error("gelu(h + bias)", y, F.gelu(want_h, approximate="tanh"),
                                  F.gelu(want_h.double(), approximate="tanh"), floor=1e-6)
    inplace = fwd_bias_fp32(h0.clone(), bias, inplace=True)
    torch.testing.assert_close(inplace, y, rtol=0, atol=0)
