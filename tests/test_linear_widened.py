"""genfast.ops.linear for bf16 / fp16 on CPUs without 16-bit GEMM instructions (WIDENED): fp32 GEMMs
of the widened operands, rounded once. Forward and all gradients against F.linear in the 16-bit
dtype (the low reference) and fp64 (the high one) with the tolerance rule, on oneDNN's and torch's
fp32 GEMMs; the default by CPU flags; compile; the cases that stay on F.linear."""
import pytest
import torch
import torch.nn.functional as F

from genfast.ops import linear as lin
from genfast.testing import assert_within_reference_error

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _widened(monkeypatch):
    """The widened path is tested on every CPU, also where torch's 16-bit GEMMs are the default."""
    monkeypatch.setattr(lin, "WIDENED", frozenset(DTYPES))


def test_default_by_cpu_flags():
    """Widened only on x86 CPUs (AVX2) without the 16-bit GEMM instructions (AVX-512 BF16 / FP16, AMX)."""
    bf16, fp16 = torch.bfloat16, torch.float16
    for flags, want in (({"avx2", "fma"}, {bf16, fp16}), ({"avx2", "avx512f", "avx512_bf16"}, {fp16}),
                        ({"avx2", "amx_bf16", "amx_fp16"}, set()), ({"avx2", "avx512_bf16", "avx512_fp16"}, set()),
                        (set(), set()), ({"neon", "bf16"}, set())):
        assert lin.default_widened(frozenset(flags)) == want, flags


def _inputs(shape, n_out, dtype, bias=True, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape[:-1], shape[-1] * (2 if strided else 1), generator=g)
    x = x[..., ::2] if strided else x
    w = torch.randn(n_out, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(n_out, generator=g) if bias else None
    return tuple(None if t is None else t.to(dtype) for t in (x, w, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn32", "blas32"])
@pytest.mark.parametrize("shape,n_out,bias,strided", [((7, 13), 5, True, False), ((2, 17, 33), 65, False, True),
                                                      ((3, 4, 5, 64), 192, True, True), ((1, 1), 1, True, False),
                                                      ((129, 40), 24, False, False)])
def test_forward_backward_within_reference_error(dtype, onednn, shape, n_out, bias, strided, monkeypatch):
    if onednn and not lin.onednn_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(lin, "USE_ONEDNN", onednn)
    x, w, b = _inputs(shape, n_out, dtype, bias, strided)
    params = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    high = [t.double().detach().requires_grad_(True) for t in params]
    g = torch.randn(*shape[:-1], n_out, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run(fn, ts, gr):
        y = fn(ts[0], ts[1], ts[2] if bias else None)
        return (y, *torch.autograd.grad(y, ts, gr))

    assert lin._takes_own_gemm(*(params + [None])[:3])
    got = run(lin.linear, params, g)
    low = run(F.linear, params, g)
    ref = run(F.linear, high, g.double())
    for name, a, lo, hi in zip(["out", "dx", "dw", "db"], got, low, ref):
        assert a.dtype == dtype and a.shape == lo.shape, name
        assert_within_reference_error(f"widened {dtype} linear {name}", a, lo, hi)


def test_rounds_once_from_the_fp32_product():
    """The output is the fp32 GEMM of the widened operands rounded once (not a 16-bit GEMM's result)."""
    x, w, b = _inputs((33, 40), 17, torch.bfloat16)
    want = F.linear(x.float(), w.float(), b.float()).bfloat16()
    assert torch.equal(lin.linear(x, w, b), want)


def test_widened_gemms_are_really_taken(monkeypatch):
    """A spy on the fp32 GEMMs: forward (F.linear on fp32 operands) and both backward GEMMs run in fp32."""
    monkeypatch.setattr(lin, "USE_ONEDNN", False)
    seen = []
    real_mm, real_linear = lin._mm32, F.linear
    monkeypatch.setattr(lin, "_mm32", lambda a, b: (seen.append(("mm", a.dtype, b.dtype)), real_mm(a, b))[1])
    monkeypatch.setattr(lin.F, "linear", lambda *a: (seen.append(("fwd",) + tuple(t.dtype for t in a[:2])),
                                                     real_linear(*a))[1])
    x, w, b = (t.requires_grad_(True) for t in _inputs((5, 16), 8, torch.bfloat16))
    lin.linear(x, w, b).sum().backward()
    f32 = torch.float32
    assert seen == [("fwd", f32, f32), ("mm", f32, f32), ("mm", f32, f32)], seen
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.bfloat16


def test_only_needed_gradients_empty_and_off(monkeypatch):
    x, w, b = _inputs((6, 8), 3, torch.bfloat16)
    w.requires_grad_(True)
    (dw,) = torch.autograd.grad(lin.linear(x, w, b).sum(), [w])
    assert_within_reference_error("dw", dw, torch.ones(6, 3).bfloat16().t() @ x,
                                  torch.ones(6, 3).double().t() @ x.double())
    e = torch.empty(0, 8, dtype=torch.bfloat16, requires_grad=True)
    out = lin.linear(e, w, b)
    assert out.shape == (0, 3) and out.dtype == torch.bfloat16
    out.sum().backward()
    assert e.grad.shape == (0, 8)
    monkeypatch.setattr(lin, "WIDENED", frozenset())
    assert not lin._takes_own_gemm(x, w, b)
    assert not lin._takes_own_gemm(x, w.float(), b)  # mixed dtypes: F.linear (and its error)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lin._takes_own_gemm(x, w, b)


def test_compiled_equals_eager_and_keeps_the_op():
    """Under torch.compile a widened bf16 linear is genfast::linear: the same GEMMs, the same bits."""
    x, w, b = _inputs((3, 10, 16), 24, torch.bfloat16)
    ts = [t.clone().requires_grad_(True) for t in (x, w, b)]
    g = torch.randn(3, 10, 24).bfloat16()

    def f(x, w, b):
        return lin.linear(x, w, b) * 2

    want = (f(*ts), *torch.autograd.grad(f(*ts), ts, g))
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return torch._inductor.compile(gm, inputs)

    cf = torch.compile(f, fullgraph=True, backend=backend)
    got = (cf(*ts), *torch.autograd.grad(cf(*ts), ts, g))
    assert any("genfast.linear" in s for s in graphs)
    for a, e in zip(got, want):
        assert torch.equal(a, e)


def test_opcheck_bf16():
    x, w, b = _inputs((4, 6, 8), 5, torch.bfloat16)
    for args in [(x, w, b), (x, w, None), (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))]:
        torch.library.opcheck(torch.ops.genfast.linear.default, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_autocast_casts_then_widens(dtype):
    """Under CPU autocast to a widened dtype: autocast's casts (gradients back in fp32), then the widened
    GEMMs: the bits of the fp32 product of the cast operands, rounded once; gradients within the error
    of F.linear under autocast (the low reference) against fp64; a backward called inside the region too."""
    x, w, b = _inputs((3, 9, 24), 10, torch.float32)
    ts = [t.clone().requires_grad_(True) for t in (x, w, b)]
    g = torch.randn(3, 9, 10, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=dtype):
        y = lin.linear(*ts)
        grads = torch.autograd.grad(y, ts, g.to(dtype))
        lows = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        y_low = F.linear(*lows)
        low = torch.autograd.grad(y_low, lows, g.to(dtype))
    assert y.dtype == dtype and all(gr.dtype == torch.float32 for gr in grads)
    assert torch.equal(y, F.linear(*(t.to(dtype).float() for t in (x, w, b))).to(dtype))
    high = [t.double().requires_grad_(True) for t in (x, w, b)]
    y_high = F.linear(*high)
    ref = torch.autograd.grad(y_high, high, g.to(dtype).double())
    assert_within_reference_error("autocast out", y, y_low, y_high)
    for name, a, lo, hi in zip(["dx", "dw", "db"], grads, low, ref):
        assert_within_reference_error(f"autocast {name}", a, lo, hi)


def test_autocast_elsewhere_stays_f_linear(monkeypatch):
    x, w, b = _inputs((4, 8), 3, torch.float32)
    monkeypatch.setattr(lin, "WIDENED", frozenset())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin._autocast_widened(x, w, b) is None
    monkeypatch.setattr(lin, "WIDENED", frozenset(DTYPES))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin._autocast_widened(x, w, b) == torch.bfloat16
        assert lin._autocast_widened(x.double(), w.double(), b.double()) is None  # autocast leaves fp64 be
        assert lin._autocast_widened(x[:0], w, b) is None
    assert lin._autocast_widened(x, w, b) is None  # no autocast


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_compiled_autocast_widens_too(dtype):
    """torch.compile under CPU autocast to a widened dtype: the casts, then genfast::linear in the graph
    (not torch's 16-bit GEMM), with the bits and gradients of the eager call under autocast."""
    x, w, b = _inputs((3, 9, 24), 10, torch.float32)
    ts = [t.clone().requires_grad_(True) for t in (x, w, b)]
    g = torch.randn(3, 9, 10, generator=torch.Generator().manual_seed(1)).to(dtype)

    def f(x, w, b):
        return lin.linear(x, w, b) * 2

    def run(fn):
        with torch.autocast("cpu", dtype=dtype):
            y = fn(*ts)
            return (y, *torch.autograd.grad(y, ts, g))

    want = run(f)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return torch._inductor.compile(gm, inputs)

    got = run(torch.compile(f, fullgraph=True, backend=backend))
    assert any("genfast.linear" in s for s in graphs), graphs
    assert got[0].dtype == dtype and all(a.dtype == torch.float32 for a in got[1:])
    for a, e in zip(got, want):
        assert torch.equal(a, e)
