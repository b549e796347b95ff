"""genfast.ops.linear.linear: oneDNN's fp32 GEMM on the CPU (16-bit: test_linear_widened.py), F.linear elsewhere. Forward and all
gradients against F.linear in fp64 (the high reference) and fp32 (the low one) with the tolerance
rule; odd shapes, strided inputs, no bias, empty; the cases that must take F.linear."""
import pytest
import torch
import torch.nn.functional as F

from genfast.ops import linear as lin
from genfast.testing import assert_within_reference_error

pytestmark = pytest.mark.skipif(not lin.onednn_available(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def _onednn_on(monkeypatch):
    """The oneDNN path is tested on every CPU, also where it is not the default (Intel: MKL)."""
    monkeypatch.setattr(lin, "USE_ONEDNN", True)


def test_default_by_cpu_vendor(monkeypatch):
    """oneDNN by default on AVX-512 CPUs other than Intel's (MKL's AVX-512 GEMMs measured ahead on
    Intel; torch's GEMMs ahead on an AVX2-only AMD EPYC)."""
    for vendor, flags, want in (("GenuineIntel", {"avx512f"}, False), ("AuthenticAMD", {"avx512f", "avx2"}, True),
                                ("", {"avx512f"}, True), ("AuthenticAMD", {"avx2", "fma"}, False)):
        monkeypatch.setattr(lin, "cpu_vendor", lambda vendor=vendor: vendor)
        monkeypatch.setattr(lin, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert lin.default_use_onednn() == want


def _inputs(shape, n_out, bias=True, strided=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape[:-1], shape[-1] * (2 if strided else 1), generator=g)
    x = x[..., ::2] if strided else x
    w = torch.randn(n_out, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(n_out, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape,n_out", [((7, 13), 5), ((2, 17, 33), 65), ((3, 4, 5, 64), 192), ((1, 1), 1)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_forward_backward_match_f_linear(shape, n_out, bias, strided):
    x, w, b = _inputs(shape, n_out, bias, strided)
    params = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    high = [t.double().detach().requires_grad_(True) for t in params]
    g = torch.randn(*shape[:-1], n_out, generator=torch.Generator().manual_seed(1))

    def run(fn, ts, gr):
        y = fn(ts[0], ts[1], ts[2] if bias else None)
        return (y, *torch.autograd.grad(y, ts, gr))

    assert lin._takes_own_gemm(*(params + [None])[:3])
    got = run(lin.linear, params, g)
    low = run(F.linear, params, g)
    ref = run(F.linear, high, g.double())
    for name, a, lo, hi in zip(["out", "dx", "dw", "db"], got, low, ref):
        assert a.dtype == torch.float32 and a.shape == lo.shape
        assert_within_reference_error(f"linear {name}", a, lo, hi)


def test_module_parameters_take_onednn():
    layer = torch.nn.Linear(8, 3)
    assert lin._takes_own_gemm(torch.randn(2, 8), layer.weight, layer.bias)


def test_no_grad_and_inference_mode_paths():
    x, w, b = _inputs((9, 24), 40)
    want = F.linear(x, w, b)
    with torch.no_grad():
        torch.testing.assert_close(lin.linear(x, w, b), want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(lin.linear(x, w, b), want, rtol=1e-5, atol=1e-5)


def test_output_can_be_updated_in_place():
    """The zoo adds the position embedding in place to the patch embedding's output."""
    x, w, b = _inputs((2, 5, 8), 4)
    w.requires_grad_(True)
    y = lin.linear(x, w, b)
    y.add_(1.0).mul_(2.0).sum().backward()
    torch.testing.assert_close(w.grad, 2 * torch.ones(10, 4).t() @ x.reshape(10, 8), rtol=1e-5, atol=1e-5)


def test_only_needed_gradients_and_empty_input():
    x, w, b = _inputs((6, 8), 3)
    w.requires_grad_(True)
    y = lin.linear(x, w, b)  # x and b need no gradient
    (dw,) = torch.autograd.grad(y.sum(), [w])
    torch.testing.assert_close(dw, torch.ones(6, 3).t() @ x, rtol=1e-5, atol=1e-5)
    e = torch.empty(0, 8, requires_grad=True)
    out = lin.linear(e, w, b)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert e.grad.shape == (0, 8)


def test_cases_that_take_f_linear(monkeypatch):
    x, w, b = _inputs((4, 8), 3)
    assert not lin._takes_own_gemm(x.double(), w.double(), b.double())
    monkeypatch.setattr(lin, "WIDENED", frozenset())  # (16-bit widened GEMMs: tests/test_linear_widened.py)
    assert not lin._takes_own_gemm(x.bfloat16(), w.bfloat16(), b.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lin._takes_own_gemm(x, w, b)
        assert lin.linear(x, w, b).dtype == torch.bfloat16  # autocast's casts kept
    monkeypatch.setenv("GENFAST_BACKEND", "reference")
    assert not lin._takes_own_gemm(x, w, b)
    monkeypatch.delenv("GENFAST_BACKEND")
    monkeypatch.setattr(lin, "USE_ONEDNN", False)
    assert not lin._takes_own_gemm(x, w, b)


def test_onednn_backward_is_really_taken(monkeypatch):
    """The fast path is not silently skipped: a spy on the backward's oneDNN GEMMs sees the calls."""
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(lin, "gemm_nt", lambda a, b_t: (calls.append(1), real(a, b_t, None, "none", [], ""))[1])
    x, w, b = _inputs((5, 16), 8)
    w.requires_grad_(True)
    x.requires_grad_(True)
    lin.linear(x, w, b).sum().backward()
    assert len(calls) == 2  # dx and dw on oneDNN


def test_compiled_equals_eager_and_keeps_the_op():
    """Under torch.compile a CPU fp32 linear is genfast::linear (Inductor calls it as a kernel):
    forward and gradients equal eager's."""
    x, w, b = _inputs((3, 10, 16), 24)
    ts = [t.clone().requires_grad_(True) for t in (x, w, b)]
    g = torch.randn(3, 10, 24)

    def f(x, w, b):
        return lin.linear(x, w, b).relu()

    want = torch.autograd.grad(f(*ts), ts, g)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return torch._inductor.compile(gm, inputs)

    got = torch.autograd.grad(torch.compile(f, fullgraph=True, backend=backend)(*ts), ts, g)
    assert any("genfast.linear" in s for s in graphs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    cf = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(cf(x, w, b), f(x, w, b), rtol=1e-5, atol=1e-5)


def test_opcheck():
    x, w, b = _inputs((4, 6, 8), 5)
    for args in [(x, w, b), (x, w, None), (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True))]:
        torch.library.opcheck(torch.ops.genfast.linear.default, args)


def test_bad_input():
    x, w, b = _inputs((4, 8), 3)
    with pytest.raises(ValueError, match="weight"):
        lin.linear(x, w.t(), b)
    with pytest.raises(TypeError, match="tensors"):
        lin.linear([1.0], w, b)


def test_linear_layer_keeps_wrappers_own_forward():
    """linear_layer: a plain nn.Linear through linear(); any other module (a LoRA-style subclass
    here) runs its own forward, never just its base weight."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    plain = torch.nn.Linear(8, 4)
    torch.testing.assert_close(lin.linear_layer(plain, x), F.linear(x, plain.weight, plain.bias), rtol=1e-5, atol=1e-5)

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    wrapped = Scaled(8, 4)
    torch.testing.assert_close(lin.linear_layer(wrapped, x), 2 * F.linear(x, wrapped.weight, wrapped.bias))


def test_linear_layer_calls_modules_with_hooks_or_parametrizations():
    """A Linear with hooks (a forward hook; the old weight_norm's pre-hook that computes the weight),
    or parametrized (torch.nn.utils.parametrizations), is called, not bypassed: plain_linear is False."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(3, 8)
    hooked = torch.nn.Linear(8, 4)
    hooked.register_forward_hook(lambda mod, inp, out: out * 3)
    assert not lin.plain_linear(hooked)
    torch.testing.assert_close(lin.linear_layer(hooked, x), 3 * F.linear(x, hooked.weight, hooked.bias))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        normed = torch.nn.utils.weight_norm(torch.nn.Linear(8, 4))
    with torch.no_grad():
        normed.weight_g.mul_(2.0)  # the stale .weight attribute is not what normed(x) uses
    assert not lin.plain_linear(normed)
    torch.testing.assert_close(lin.linear_layer(normed, x), normed(x))
    param = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 4))
    assert not lin.plain_linear(param)
    torch.testing.assert_close(lin.linear_layer(param, x), param(x))
    assert lin.plain_linear(torch.nn.Linear(8, 4))
