"""genfast.adaln_modulate and genfast.gated_residual on every backend against the plain-PyTorch
reference (forward and every gradient), plus opcheck, torch.compile, determinism and bad input."""
import pytest
import torch

import genfast
import genfast.nn
from genfast import reference
from genfast.testing import FLOAT_DTYPES, assert_within_reference_error, backends_to_test, modulate_samples

ALL_BACKENDS = backends_to_test()
IDS = [f"{d}-{b}" for d, b in ALL_BACKENDS]


def _up(t):
    return t.detach().double() if isinstance(t, torch.Tensor) else t


def _modulate(impl, c, x=None, shift=None, scale=None):
    return impl(c.x if x is None else x, c.shift if shift is None else shift, c.scale if scale is None else scale,
                **c.kwargs)


def _grads(fn, case, g):
    """Output and gradients of fn over the case's leaves (x, shift, scale, y)."""
    lv = case.leaves()
    out = fn(lv)
    out.backward(g)
    return out, [t.grad if t is not None else None for t in (lv.x, lv.shift, lv.scale, lv.y)]


def _check_fwd_bwd(case, ours, ref):
    """ours/ref: callables taking a leaves case and returning the output."""
    out_ref_high, _ = None, None
    g = torch.randn(case.x.shape, generator=torch.Generator().manual_seed(1)).to(case.x)
    got, got_g = _grads(ours, case, g)
    low, low_g = _grads(ref, case, g)
    hi_case = case.leaves()
    hi_case = type(case)(case.name, *[_up(t).requires_grad_(True) if t is not None else None
                                      for t in (hi_case.x, hi_case.shift, hi_case.scale, hi_case.y)], case.kwargs)
    high = ref(hi_case)
    high.backward(_up(g))
    assert got.dtype == case.x.dtype and got.shape == case.x.shape
    assert_within_reference_error(case.name, got, low, high)
    for name, a, b, t in zip(("x", "shift", "scale", "y"), got_g, low_g, (hi_case.x, hi_case.shift, hi_case.scale,
                                                                         hi_case.y)):
        if t is None or b is None:
            continue
        assert a is not None and a.shape == t.shape, f"{case.name}: grad of {name}"
        assert_within_reference_error(f"{case.name}: grad of {name}", a, b, t.grad, floor=1e-5)
    del out_ref_high


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_modulate_matches_reference(device, backend, dtype, use_backend):
    use_backend(backend)
    for case in modulate_samples(device, dtype):
        _check_fwd_bwd(case, lambda c: _modulate(genfast.adaln_modulate, c),
                       lambda c: _modulate(reference.adaln_modulate, c))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gated_residual_matches_reference(device, backend, dtype, use_backend):
    use_backend(backend)
    for case in modulate_samples(device, dtype):
        case.shift, case.kwargs = None, {}
        _check_fwd_bwd(case, lambda c: genfast.gated_residual(c.x, c.scale, c.y),
                       lambda c: reference.gated_residual(c.x, c.scale, c.y))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_partial_gradients(device, backend, use_backend):
    """Only some inputs require grad: the others get none, the rest stay right."""
    use_backend(backend)
    x, sh, sc = (torch.randn(*s, device=device) for s in ((2, 40, 24), (2, 24), (2, 24)))
    for wants in [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]:
        a = [t.clone().requires_grad_(w) for t, w in zip((x, sh, sc), wants)]
        b = [t.clone().requires_grad_(w) for t, w in zip((x, sh, sc), wants)]
        genfast.adaln_modulate(*a).sum().backward()
        reference.adaln_modulate(*b).sum().backward()
        for ta, tb in zip(a, b):
            assert (ta.grad is None) == (tb.grad is None)
            if ta.grad is not None:
                torch.testing.assert_close(ta.grad, tb.grad)
        gated = [t.clone().requires_grad_(w) for t, w in zip((x, sc, x.flip(1)), wants)]
        genfast.gated_residual(*gated).sum().backward()
        for t, w in zip(gated, wants):
            assert (t.grad is not None) == w


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_large_magnitude_fp16_statistics(device, backend, use_backend):
    """fp16 tokens around 1000 (x^2 overflows fp16; E[x^2] - mean^2 cancels in fp32): fp32
    statistics as mean((x - mean)^2) keep the output at fp16 rounding of the exact value."""
    use_backend(backend)
    g = torch.Generator().manual_seed(3)
    x = (1000 + torch.randn(2, 8, 96, generator=g)).half().to(device)
    sc, sh = torch.zeros(2, 96, device=device).half(), torch.zeros(2, 96, device=device).half()
    got = genfast.adaln_modulate(x, sh, sc)
    exact = reference.adaln_modulate(x.double(), sh.double(), sc.double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), exact, atol=4e-3, rtol=2e-3)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_single_channel_layer_norm_gradient_is_zero(device, backend, dtype, per_token, use_backend):
    """C = 1: x - mean(x) = 0, so the output is shift and dx is 0 in exact arithmetic; a kernel that
    rounds each product as the formula says gets dxhat - mean(dxhat) = 0 too. The CPU kernels once
    fused g (1 + scale) - mean into one FMA there (GCC's contraction) and gave |dx| ~ 1e-4."""
    use_backend(backend)
    g = torch.Generator().manual_seed(7)
    b, n = 3, 5
    side = (b, n, 1) if per_token else (b, 1)
    x, shift, scale = (torch.randn(*s, generator=g).to(device, dtype).requires_grad_() for s in ((b, n, 1), side, side))
    out = genfast.adaln_modulate(x, shift, scale)
    assert torch.equal(out, (shift if per_token else shift[:, None]).expand(b, n, 1))
    grad = torch.randn(b, n, 1, generator=g).to(device, dtype)
    dx, dshift, dscale = torch.autograd.grad(out, (x, shift, scale), grad)
    if device == "cuda" and backend == "triton":
        # Triton's compiler may fuse g * (1 + scale) - mean into an FMA on a GPU: allow one fp32 rounding of dxhat
        bound = 1e3 * 2 ** -23 * (grad.float().abs() * (1 + scale.float().abs().view(*side[:2], 1))).max().item()
        assert dx.float().abs().max().item() <= bound
    else:
        assert torch.equal(dx, torch.zeros_like(dx))
    assert torch.equal(dscale, torch.zeros_like(dscale))
    expect = grad if per_token else grad.float().sum(1).to(dtype)
    torch.testing.assert_close(dshift, expect, atol=0, rtol=2 ** -7 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_per_sample_gradients_are_deterministic(device, backend, use_backend):
    use_backend(backend)
    x, sh, sc = (torch.randn(*s, device=device) for s in ((3, 100, 40), (3, 40), (3, 40)))
    g = torch.randn(3, 100, 40, device=device)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, sh, sc)]
        genfast.adaln_modulate(*leaves).backward(g)
        runs.append([t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b", [1, 3])
def test_cpu_per_sample_sums_in_thread_match_partials(b, dtype, monkeypatch, use_backend):
    """The CPU kernel sums per-sample gradients either in the thread that owns the sample or
    through the partial-sum buffer (genfast.ops.modulate._sums_in_thread): same bits, and within
    the reference error (N = 100: three full row chunks and a remainder)."""
    use_backend("cpu")
    import genfast.ops.modulate as mod

    gen = torch.Generator().manual_seed(3)
    x, y, g = (torch.randn(b, 100, 40, generator=gen).to(dtype) for _ in range(3))
    sh, sc, gate = (torch.randn(b, 40, generator=gen).to(dtype) for _ in range(3))
    runs = []
    for in_thread in (True, False):
        monkeypatch.setattr(mod, "_sums_in_thread", lambda name, n, v=in_thread: v)
        leaves = [t.clone().requires_grad_() for t in (x, sh, sc, gate, y)]
        out = genfast.gated_residual(leaves[0], leaves[3], genfast.adaln_modulate(*leaves[:3]) * leaves[4])
        out.backward(g)
        runs.append([t.grad for t in leaves])
    for name, a, c in zip(("x", "shift", "scale", "gate", "y"), *runs):
        assert torch.equal(a, c), f"grad of {name} differs between the two summation paths"
    hi = [t.double().requires_grad_() for t in (x, sh, sc, gate, y)]
    lo = [t.clone().requires_grad_() for t in (x, sh, sc, gate, y)]
    for leaves in (hi, lo):
        f = leaves[0] + leaves[3][:, None] * (reference.adaln_modulate(*leaves[:3]) * leaves[4])
        f.backward(g.to(f.dtype))
    for name, got, low, high in zip(("x", "shift", "scale", "gate", "y"), runs[0], lo, hi):
        assert_within_reference_error(f"grad of {name}", got, low.grad, high.grad, floor=1e-5)


def _shared_modulation_model(modulate, gated):
    """A DiT-style block skeleton: one adaLN projection feeds the modulation of two norms and two gates."""
    def f(x, c, w):
        shift1, scale1, gate1, shift2, scale2, gate2 = (torch.nn.functional.silu(c) @ w).chunk(6, dim=1)
        h = gated(x, gate1, torch.tanh(modulate(x, shift1, scale1)))
        h = gated(h, gate2, modulate(h, shift2, scale2, norm="rms") * 0.5)
        return h
    return f


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_shared_modulation_tensor_gradients(backend, use_backend):
    """One modulation tensor (adaLN chunks) feeding several norms and gates: gradients of genfast
    equal eager PyTorch's, and torch.compile(fullgraph=True) equals eager."""
    use_backend(backend)
    torch.manual_seed(0)
    x, c, w = torch.randn(2, 9, 16), torch.randn(2, 8), torch.randn(8, 96) * 0.3
    ours = _shared_modulation_model(genfast.adaln_modulate, genfast.gated_residual)
    eager = _shared_modulation_model(reference.adaln_modulate, reference.gated_residual)
    compiled = torch.compile(ours, fullgraph=True)
    results = []
    for fn in (ours, eager, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, c, w)]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        results.append([out] + [t.grad for t in leaves])
    for name, a, b, cmp in zip(("out", "x", "c", "w"), *results):
        torch.testing.assert_close(a, b, msg=f"genfast vs eager: {name}")
        torch.testing.assert_close(cmp, a, rtol=1e-6, atol=1e-6, msg=f"compiled vs eager genfast: {name}")


def test_per_sample_modulation_enters_the_graph_as_given():
    """Eager calls with [B, C] shift / scale / gate that require grad: the [B, 1, C] view the kernels
    take is made inside the autograd node, so the graph has no view node in front of it (one
    more node a call), and the gradients come back as [B, C]."""
    x = torch.randn(2, 5, 8, requires_grad=True)
    shift, scale, gate = (torch.randn(2, 8, requires_grad=True) for _ in range(3))
    for out, leaves in ((genfast.adaln_modulate(x, shift, scale), (x, shift, scale)),
                        (genfast.gated_residual(x, gate, x), (x, gate))):
        inputs = {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
        assert inputs == {"AccumulateGrad"}, inputs
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        assert [g.shape for g in grads] == [t.shape for t in leaves]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend, use_backend):
    use_backend(backend)
    ops = torch.ops.genfast
    for case in modulate_samples("cpu", torch.float32):
        x, sh, sc = case.x, case.shift, case.scale
        sh3 = sh.unsqueeze(1) if sh is not None and sh.dim() == 2 else sh
        sc3 = sc.unsqueeze(1) if sc.dim() == 2 else sc
        rms = case.kwargs.get("norm") == "rms"
        eps = case.kwargs.get("eps", 1e-6)
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, sh3, sc3)]
        torch.library.opcheck(ops.adaln_modulate.default, (*leaves, eps, rms))
        _, mean, rstd = ops.adaln_modulate(x, sh3, sc3, eps, rms)
        g = torch.randn_like(x)
        torch.library.opcheck(ops.adaln_modulate_backward.default,
                              (g, x, sh3, sc3, mean, rstd, eps, rms, [True, sh3 is not None and sh3.shape[1] == 1, True]))
        gl = [t.detach().clone().requires_grad_() for t in (x, sc3, case.y)]
        torch.library.opcheck(ops.gated_residual.default, tuple(gl))
        torch.library.opcheck(ops.gated_residual_backward.default, (g, sc3, case.y, [True, True]))


def test_gradcheck_float64():
    x, sh, sc = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 3, 5), (2, 5), (2, 3, 5)))
    assert torch.autograd.gradcheck(lambda a, b, c: genfast.adaln_modulate(a, b, c, norm="layer"), (x, sh, sc))
    assert torch.autograd.gradcheck(lambda a, b, c: genfast.gated_residual(a, b, c), (x, sh, sc))


def test_bad_inputs():
    x, s = torch.randn(2, 3, 8), torch.randn(2, 8)
    cases = [
        (TypeError, "x", lambda: genfast.adaln_modulate("x", s, s)),
        (ValueError, "x must be 3-D", lambda: genfast.adaln_modulate(x[0], s, s)),
        (TypeError, "x must have a floating dtype", lambda: genfast.adaln_modulate(x.long(), s, s)),
        (ValueError, "scale must have shape", lambda: genfast.adaln_modulate(x, s, torch.randn(2, 7))),
        (ValueError, "shift must have shape", lambda: genfast.adaln_modulate(x, torch.randn(3, 8), s)),
        (ValueError, "scale must have shape", lambda: genfast.adaln_modulate(x, s, torch.randn(2, 2, 8))),
        (ValueError, "scale must have shape", lambda: genfast.adaln_modulate(x, s, torch.randn(8))),
        (TypeError, "scale has dtype", lambda: genfast.adaln_modulate(x, s, s.double())),
        (TypeError, "scale must be a torch.Tensor", lambda: genfast.adaln_modulate(x, s, None)),
        (ValueError, "norm must be", lambda: genfast.adaln_modulate(x, s, s, norm="batch")),
        (ValueError, "eps must be", lambda: genfast.adaln_modulate(x, s, s, eps=-1.0)),
        (ValueError, "y has shape", lambda: genfast.gated_residual(x, s, x[:, :2])),
        (ValueError, "gate must have shape", lambda: genfast.gated_residual(x, torch.randn(2, 3), x)),
        (TypeError, "y has dtype", lambda: genfast.gated_residual(x, s, x.half())),
        (ValueError, "y must be 3-D", lambda: genfast.gated_residual(x, s, x[0])),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_forced_backend_that_cannot_run_raises(use_backend):
    use_backend("cpu")
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        genfast.adaln_modulate(x, None, torch.randn(2, 8, dtype=torch.float64))


class _TinyDiTBranch(torch.nn.Module):
    """The adaLN-Zero pattern of a DiT block around an MLP, with genfast's modules or eager ones."""

    def __init__(self, c, fused):
        super().__init__()
        self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(c, 3 * c))
        self.norm = genfast.nn.AdaLNModulate(c, eps=1e-6) if fused else torch.nn.LayerNorm(c, elementwise_affine=False,
                                                                                             eps=1e-6)
        self.mlp = torch.nn.Linear(c, c)
        self.fused = fused

    def forward(self, x, cond):
        shift, scale, gate = self.adaLN_modulation(cond).chunk(3, dim=1)
        if self.fused:
            return genfast.gated_residual(x, gate, self.mlp(self.norm(x, shift, scale)))
        h = self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return x + gate.unsqueeze(1) * self.mlp(h)


def test_adaln_modulate_module_is_a_drop_in():
    torch.manual_seed(0)
    eager, fused = _TinyDiTBranch(32, False), _TinyDiTBranch(32, True)
    fused.load_state_dict(eager.state_dict())  # the LayerNorm without affine has no parameters either
    x, cond = torch.randn(2, 11, 32), torch.randn(2, 32)
    compiled = torch.compile(fused, fullgraph=True)
    outs = []
    for m in (eager, fused, compiled):
        m.zero_grad()
        xl = x.clone().requires_grad_()
        out = m(xl, cond)
        out.square().sum().backward()
        outs.append((out, xl.grad, [p.grad for p in m.parameters()]))
    (o_e, gx_e, gp_e), (o_f, gx_f, gp_f), (o_c, gx_c, gp_c) = outs
    torch.testing.assert_close(o_f, o_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_f, gx_e, rtol=1e-4, atol=1e-4)
    for a, b in zip(gp_f, gp_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o_c, o_f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_c, gx_f, rtol=1e-6, atol=1e-6)
    for a, b in zip(gp_c, gp_f):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_adaln_modulate_module_casts_modulation_and_checks_width():
    m = genfast.nn.AdaLNModulate(16, norm="rms")
    x = torch.randn(2, 3, 16)
    sh, sc = torch.randn(2, 16).bfloat16(), torch.randn(2, 16).bfloat16()
    out = m(x, sh, sc)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference.adaln_modulate(x, sh.float(), sc.float(), norm="rms"))
    assert m(x, None, sc).shape == x.shape
    with pytest.raises(ValueError, match="hidden_size"):
        m(torch.randn(2, 3, 8), None, torch.randn(2, 8))
    with pytest.raises(ValueError, match="norm"):
        genfast.nn.AdaLNModulate(16, norm="group")
    assert "16, eps=1e-06, norm='rms'" in repr(m)


@pytest.mark.slow
def test_cuda_kernels_under_tsan(tmp_path):
    """csrc/cuda/modulate.cu with one OS thread per CUDA thread under ThreadSanitizer: no races."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None or not (repo / "csrc" / "cuda" / "modulate.cu").exists():
        pytest.skip("needs g++ and the csrc/ sources (run from a checkout)")
    exe = tmp_path / "tsan_modulate"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fsanitize=thread", "-DGENFAST_EMULATE",
                            "-fno-strict-aliasing", "-pthread", f"-I{repo / 'csrc'}", str(repo / "tests" / "tsan_modulate.cpp"),
                            "-x", "c++", str(repo / "csrc" / "cuda" / "modulate.cu"), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "sanitize" in build.stderr:
        pytest.skip(f"ThreadSanitizer unavailable: {build.stderr[-300:]}")
    assert build.returncode == 0, build.stderr[-2000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "GENFAST_EMU_RUNNER": "threads"})
    assert run.returncode == 0 and "ok" in run.stdout, (run.stdout + run.stderr)[-3000:]
