"""genfast.reparam_kl on every backend against the plain-PyTorch reference (issue 6)."""
import math

import pytest
import torch

import genfast
from genfast import reference
from genfast.testing import FLOAT_DTYPES, assert_within_reference_error, backends_to_test, reparam_kl_samples

ALL_BACKENDS = backends_to_test()
IDS = [f"{d}-{b}" for d, b in ALL_BACKENDS]
SEED = (123456789, 7)
# Our normals are within ~2.4e-7 relative of the fp64 Box-Muller (polynomial log / sincos); the
# floor (relative to the largest reference value) covers that on top of the 2x-reference rule.
FLOOR = 2e-6


def _eps(mu, seed=SEED, dtype=torch.float64):
    return reference.philox_normal(*seed, mu.numel(), dtype=dtype, device=mu.device).view(mu.shape)


def _kw(case, **extra):
    return {**case.kwargs, **extra}


def _refs(case, eps64, **kw):
    """(low, high): the reference in the inputs' precision with fp32-rounded eps, and in fp64."""
    kw = _kw(case, **kw)
    low = reference.reparam_kl(case.mu, case.logvar, noise=eps64.to(case.mu.dtype), **kw)
    high = reference.reparam_kl(case.mu.double(), case.logvar.double(), noise=eps64, **kw)
    return low, high


def _check_forward(case, got, eps64, **kw):
    (z_lo, kl_lo), (z_hi, kl_hi) = _refs(case, eps64, **kw)
    z, kl = got
    assert z.dtype == case.mu.dtype and z.shape == case.mu.shape
    want_kl_dtype = torch.float64 if case.mu.dtype == torch.float64 else torch.float32
    assert kl.dtype == want_kl_dtype, kl.dtype
    assert_within_reference_error(f"{case.name}: z", z, z_lo, z_hi, floor=FLOOR)
    assert_within_reference_error(f"{case.name}: kl", kl, kl_lo, kl_hi, floor=FLOOR)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_reference(device, backend, dtype, use_backend):
    use_backend(backend)
    for case in reparam_kl_samples(device, dtype, large=dtype == torch.float32 and backend in ("cpu", "reference")):
        eps64 = _eps(case.mu)
        _check_forward(case, genfast.reparam_kl(case.mu, case.logvar, seed=SEED, **case.kwargs), eps64)
        # explicit noise: the same formulas on the given eps
        noise = torch.randn(case.mu.shape, generator=torch.Generator().manual_seed(1)).to(case.mu)
        _check_forward(case, genfast.reparam_kl(case.mu, case.logvar, noise=noise, **case.kwargs), noise.double())


def _grads(mu, lv, z, kl, g):
    dz, dkl = g
    torch.autograd.backward([z, kl], [dz, dkl])
    return mu.grad, lv.grad


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_matches_reference(device, backend, dtype, use_backend):
    use_backend(backend)
    gen = torch.Generator().manual_seed(2)
    for case in reparam_kl_samples(device, dtype):
        if case.mu.numel() == 0:
            continue
        eps64 = _eps(case.mu)
        a, lo, hi = case.leaves(), case.leaves(), tuple(t.double() for t in case.leaves())
        hi = tuple(t.detach().requires_grad_(True) for t in hi)
        z, kl = genfast.reparam_kl(*a, seed=SEED, **case.kwargs)
        dz = torch.randn(z.shape, generator=gen).to(z)
        dkl = torch.randn(kl.shape, generator=gen).to(kl)
        got = _grads(*a, z, kl, (dz, dkl))
        zl, kll = reference.reparam_kl(*lo, noise=eps64.to(dtype), **case.kwargs)
        low = _grads(*lo, zl, kll, (dz, dkl))
        zh, klh = reference.reparam_kl(*hi, noise=eps64, **case.kwargs)
        high = _grads(*hi, zh, klh, (dz.double(), dkl.double()))
        for name, g, l, h in zip(("dmu", "dlogvar"), got, low, high):
            assert g.dtype == dtype and g.shape == case.mu.shape
            assert_within_reference_error(f"{case.name}: {name}", g, l, h, floor=FLOOR)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_only_one_output_used(device, backend, use_backend):
    """z alone or kl alone in the loss: the other gradient is absent, not garbage."""
    use_backend(backend)
    case = reparam_kl_samples(device)[0]
    eps64 = _eps(case.mu)
    for which in (0, 1):
        a, b = case.leaves(), case.leaves()
        out = genfast.reparam_kl(*a, seed=SEED)[which].sum()
        ref = reference.reparam_kl(*b, noise=eps64.float())[which].sum()
        out.backward()
        ref.backward()
        for x, y in zip(a, b):
            torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_reference_float64():
    mu = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    lv = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 3, 4, dtype=torch.float64)
    for kw in (dict(), dict(reduction="none"), dict(logvar_clamp=(-0.5, 0.5)), dict(free_bits=0.3)):
        assert torch.autograd.gradcheck(lambda m, l: reference.reparam_kl(m, l, noise=eps, **kw), (mu, lv))
        # the op's own backward (fp64 runs the reference backend of the custom op)
        assert torch.autograd.gradcheck(lambda m, l: genfast.reparam_kl(m, l, noise=eps, **kw), (mu, lv))


@pytest.mark.parametrize("device,backend", [p for p in ALL_BACKENDS if p[1] != "reference"],
                         ids=[i for i, p in zip(IDS, ALL_BACKENDS) if p[1] != "reference"])
def test_fused_backward_finite_differences(device, backend, use_backend):
    """The fp32 fused backward against central differences of L = <dz, z> + <dkl, kl> in fp64,
    with the kernel's own eps held fixed (regenerated from the seed)."""
    use_backend(backend)
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(2, 9, generator=gen).to(device)
    lv = torch.randn(2, 9, generator=gen).to(device)
    dz, dkl = torch.randn(2, 9, generator=gen).to(device), torch.randn(2, generator=gen).to(device)
    m, l = mu.clone().requires_grad_(), lv.clone().requires_grad_()
    z, kl = genfast.reparam_kl(m, l, seed=SEED, logvar_clamp=(-1.0, 1.0))
    torch.autograd.backward([z, kl], [dz, dkl])
    eps = _eps(mu)

    def loss(mu_, lv_):
        z_, kl_ = reference.reparam_kl(mu_, lv_, noise=eps, logvar_clamp=(-1.0, 1.0))
        return (dz.double() * z_).sum() + (dkl.double() * kl_).sum()

    h = 1e-6
    for t, grad in ((0, m.grad), (1, l.grad)):
        for idx in [(0, 0), (1, 4), (1, 8), (0, 5)]:
            args = [mu.double(), lv.double()]
            plus, minus = [a.clone() for a in args], [a.clone() for a in args]
            plus[t][idx] += h
            minus[t][idx] -= h
            fd = (loss(*plus) - loss(*minus)) / (2 * h)
            assert abs(grad[idx].item() - fd.item()) <= 1e-4 * max(1.0, abs(fd.item())), (t, idx, grad[idx], fd)


# ------------------------------------------------------------------------------- the noise
@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_noise_is_the_documented_philox_stream(device, backend, use_backend):
    """With mu = 0 and logvar = 0, z is eps itself: it must be reference.philox_normal."""
    use_backend(backend)
    n = 4099 if backend in ("triton", "cuda_emu") else 1 << 16
    zero = torch.zeros(3, n, device=device)
    z, _ = genfast.reparam_kl(zero, zero, seed=SEED)
    torch.testing.assert_close(z.double(), _eps(zero), rtol=0, atol=2e-6)


@pytest.mark.parametrize("device,backend", [p for p in ALL_BACKENDS if p[1] in ("cpu", "reference")],
                         ids=[i for i, p in zip(IDS, ALL_BACKENDS) if p[1] in ("cpu", "reference")])
def test_noise_statistics(device, backend, use_backend):
    scipy_stats = pytest.importorskip("scipy.stats")
    use_backend(backend)
    n = 1 << 20
    zero = torch.zeros(4, n // 4, device=device)
    torch.manual_seed(0)
    e1 = genfast.reparam_kl(zero, zero)[0].reshape(-1).double()
    e2 = genfast.reparam_kl(zero, zero)[0].reshape(-1).double()
    se = 1 / math.sqrt(n)
    for e in (e1, e2):
        assert abs(e.mean().item()) < 5 * se
        assert abs(e.var().item() - 1) < 5 * math.sqrt(2) * se
        assert abs((e**3).mean().item()) < 5 * math.sqrt(15) * se  # skewness of N(0, 1): 0
        assert abs((e**4).mean().item() - 3) < 5 * math.sqrt(96) * se  # kurtosis: 3
        assert scipy_stats.kstest(e[: 1 << 16].numpy(), "norm").pvalue > 1e-4
        assert scipy_stats.normaltest(e[: 1 << 16].numpy()).pvalue > 1e-4
        # neighbours: the same Philox group (lags 1-3), the next group (4), and far apart
        for lag in (1, 2, 3, 4, 5, 1000):
            c = torch.corrcoef(torch.stack([e[:-lag], e[lag:]]))[0, 1].item()
            assert abs(c) < 5 * se, (lag, c)
        # the cosine and sine halves of one Box-Muller pair are uncorrelated in square too
        c2 = torch.corrcoef(torch.stack([e[0::2] ** 2, e[1::2] ** 2]))[0, 1].item()
        assert abs(c2) < 5 * math.sqrt(2) * se
    assert abs(torch.corrcoef(torch.stack([e1, e2]))[0, 1].item()) < 5 * se  # across calls
    assert not torch.equal(e1, e2)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_backward_sees_the_forward_noise(device, backend, use_backend):
    """mu = 0, logvar = 0, dz = 1, no KL gradient: dlogvar = eps / 2 exactly as z = eps."""
    use_backend(backend)
    mu = torch.zeros(3, 1031, device=device, requires_grad=True)
    lv = torch.zeros(3, 1031, device=device, requires_grad=True)
    torch.manual_seed(5)
    z, kl = genfast.reparam_kl(mu, lv)
    z.backward(torch.ones_like(z))
    torch.testing.assert_close(lv.grad, 0.5 * z.detach(), rtol=0, atol=0)
    torch.testing.assert_close(mu.grad, torch.ones_like(z), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
def test_seed_and_generator_reproduce(device, backend, use_backend):
    use_backend(backend)
    mu, lv = torch.randn(2, 33, device=device), torch.randn(2, 33, device=device)
    a = genfast.reparam_kl(mu, lv, seed=11)[0]
    assert torch.equal(a, genfast.reparam_kl(mu, lv, seed=11)[0])
    assert torch.equal(a, genfast.reparam_kl(mu, lv, seed=(11, 0))[0])
    assert not torch.equal(a, genfast.reparam_kl(mu, lv, seed=(11, 1))[0])
    assert not torch.equal(a, genfast.reparam_kl(mu, lv, seed=12)[0])
    torch.manual_seed(3)
    b = genfast.reparam_kl(mu, lv)[0]
    c = genfast.reparam_kl(mu, lv)[0]
    torch.manual_seed(3)
    assert torch.equal(b, genfast.reparam_kl(mu, lv)[0])
    assert not torch.equal(b, c)
    g1, g2 = torch.Generator(device).manual_seed(9), torch.Generator(device).manual_seed(9)
    assert torch.equal(genfast.reparam_kl(mu, lv, generator=g1)[0], genfast.reparam_kl(mu, lv, generator=g2)[0])
    assert torch.equal(genfast.reparam_kl(mu, lv, seed=-1)[0], genfast.reparam_kl(mu, lv, seed=2**64 - 1)[0])


def test_backends_share_the_stream(use_backend):
    """Every CPU-tensor backend draws the same Philox normals (to a few ulp)."""
    mu, lv = torch.zeros(2, 4001), torch.zeros(2, 4001)
    outs = {}
    for _, backend in [p for p in ALL_BACKENDS if p[0] == "cpu"]:
        use_backend(backend)
        outs[backend] = genfast.reparam_kl(mu, lv, seed=SEED)[0]
    for name, z in outs.items():
        torch.testing.assert_close(z, outs["reference"], rtol=0, atol=2e-6, msg=name)


# ---------------------------------------------------------------------------- the op contract
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend, use_backend):
    use_backend(backend)
    for case in reparam_kl_samples("cpu", torch.float32):
        seed = torch.tensor([5, 6])
        for per_row in (True, False):
            args = (case.mu, case.logvar, None, seed, -30.0, 20.0, True, per_row)
            torch.library.opcheck(torch.ops.genfast.reparam_kl.default, args)
        noise = torch.randn(case.mu.shape)
        torch.library.opcheck(torch.ops.genfast.reparam_kl.default,
                              (case.mu, case.logvar, noise, None, -1.0, 1.0, True, True))
        b = case.mu.shape[0]
        bw = (torch.randn(case.mu.shape), torch.randn(b), case.mu, case.logvar, None, seed, -30.0, 20.0, True)
        torch.library.opcheck(torch.ops.genfast.reparam_kl_backward.default, bw)


@pytest.mark.parametrize("reduction", ["per_sample", "mean", "none"])
def test_compile_matches_eager(reduction):
    torch._dynamo.reset()
    head = torch.nn.Conv2d(3, 8, 3, padding=1)

    def step(x, seed_noise):
        mu, lv = head(x).chunk(2, dim=1)
        z, kl = genfast.reparam_kl(mu, lv, noise=seed_noise, reduction=reduction)
        return (z**2).mean() + kl.mean()

    x = torch.randn(2, 3, 6, 5)
    noise = torch.randn(2, 4, 6, 5)
    compiled = torch.compile(step, fullgraph=True)
    eager_loss = step(x, noise)
    eager_grads = torch.autograd.grad(eager_loss, list(head.parameters()))
    comp_loss = compiled(x, noise)
    comp_grads = torch.autograd.grad(comp_loss, list(head.parameters()))
    torch.testing.assert_close(comp_loss, eager_loss)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_compile_with_seed_and_generator_draws():
    torch._dynamo.reset()

    def f(mu, lv):
        return genfast.reparam_kl(mu, lv, seed=42)

    mu, lv = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    z_c, kl_c = torch.compile(f, fullgraph=True)(mu, lv)
    z_e, kl_e = f(mu, lv)
    torch.testing.assert_close(z_c, z_e)
    torch.testing.assert_close(kl_c, kl_e)
    # without a seed the compiled graph draws its own (seed, offset) each call
    g = torch.compile(lambda m, l: genfast.reparam_kl(m, l)[0], fullgraph=True)
    assert not torch.equal(g(mu, lv), g(mu, lv))


# ------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(logvar=torch.randn(2, 5)), ValueError, "logvar has shape"),
    (dict(logvar=torch.randn(2, 4, dtype=torch.float64)), TypeError, "logvar has dtype"),
    (dict(logvar=torch.randn(2, 4, device="meta")), ValueError, "logvar is on"),
    (dict(mu=torch.ones(2, 4, dtype=torch.int64), logvar=torch.ones(2, 4, dtype=torch.int64)), TypeError, "mu must have a floating"),
    (dict(mu=torch.tensor(1.0), logvar=torch.tensor(1.0)), ValueError, "mu must have a batch"),
    (dict(mu=[1.0]), TypeError, "mu must be a torch.Tensor"),
    (dict(reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(free_bits=-0.1), ValueError, "free_bits must be"),
    (dict(free_bits="1"), TypeError, "free_bits must be a float"),
    (dict(logvar_clamp=(5.0, -5.0)), ValueError, "logvar_clamp must satisfy"),
    (dict(logvar_clamp=3.0), TypeError, "logvar_clamp must be None or"),
    (dict(noise=torch.randn(2, 3)), ValueError, "noise has shape"),
    (dict(noise=torch.randn(2, 4, dtype=torch.float16)), TypeError, "noise has dtype"),
    (dict(noise=torch.randn(2, 4, requires_grad=True)), ValueError, "noise is a constant"),
    (dict(noise=torch.randn(2, 4), seed=1), ValueError, "either noise or seed"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(seed=(1, 2, 3)), TypeError, "seed must be an int"),
    (dict(seed=1, generator=torch.Generator()), ValueError, "either seed or generator"),
    (dict(generator=3), TypeError, "generator must be a torch.Generator"),
])
def test_bad_inputs(kwargs, error, match):
    args = dict(mu=torch.randn(2, 4), logvar=torch.randn(2, 4))
    args.update(kwargs)
    mu, lv = args.pop("mu"), args.pop("logvar")
    with pytest.raises(error, match=match):
        genfast.reparam_kl(mu, lv, **args)


def test_forced_backend_that_cannot_run(use_backend):
    use_backend("cpu")
    with pytest.raises(ValueError, match="fp32, fp16, bf16 only"):
        genfast.reparam_kl(torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64), seed=1)


def test_fp16_extreme_logvar_stays_finite():
    mu = torch.zeros(2, 8, dtype=torch.float16, requires_grad=True)
    lv = torch.tensor([[50.0] * 4 + [-50.0] * 4] * 2, dtype=torch.float16, requires_grad=True)
    noise = torch.full((2, 8), 0.5, dtype=torch.float16)
    z, kl = genfast.reparam_kl(mu, lv, noise=noise)
    (z.float().sum() + kl.sum()).backward()
    for t in (z, kl, mu.grad, lv.grad):
        assert torch.isfinite(t).all()


# ------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_stream_matches_cpu(backend, use_backend):
    """The GPU kernels draw the documented stream (same Philox words as the CPU kernel)."""
    use_backend(backend)
    zero = torch.zeros(3, 40001, device="cuda")
    z = genfast.reparam_kl(zero, zero, seed=SEED)[0].cpu()
    use_backend("cpu")
    torch.testing.assert_close(z, genfast.reparam_kl(zero.cpu(), zero.cpu(), seed=SEED)[0], rtol=0, atol=2e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_graph_replay_draws_fresh_noise(backend, use_backend):
    """(seed, offset) are drawn on the device inside the graph: each replay gets new noise, and
    the backward (captured too) sees the forward's."""
    use_backend(backend)
    mu = torch.zeros(4, 4096, device="cuda", requires_grad=True)
    lv = torch.zeros(4, 4096, device="cuda", requires_grad=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph
        for _ in range(2):
            z, kl = genfast.reparam_kl(mu, lv)
            gmu, glv = torch.autograd.grad((z, kl), (mu, lv), (torch.ones_like(z), torch.zeros_like(kl)))
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z, kl = genfast.reparam_kl(mu, lv)
        gmu, glv = torch.autograd.grad((z, kl), (mu, lv), (torch.ones_like(z), torch.zeros_like(kl)))
    outs = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(z.clone())
        torch.testing.assert_close(glv, 0.5 * z, rtol=0, atol=0)
        assert abs(z.mean().item()) < 0.03 and abs(z.var().item() - 1) < 0.05
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_global_index_past_2_31(backend, use_backend):
    """Element indices past 2^31 (int64 offsets, Philox counters past 2^29 groups)."""
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs ~20 GiB of GPU memory")
    use_backend(backend)
    cols = 2**30 + 3
    mu = torch.zeros(2, cols, device="cuda", dtype=torch.bfloat16)
    z, kl = genfast.reparam_kl(mu, mu, seed=SEED)
    start = 2 * cols - 4099  # the last elements: global index ~2^31
    want = reference.philox_normal(*SEED, 4099, start=start, dtype=torch.float64)
    torch.testing.assert_close(z[1, -4099:].double().cpu(), want.to(torch.bfloat16).double(), rtol=0, atol=2e-2)
    torch.testing.assert_close(kl.cpu(), torch.zeros(2), rtol=0, atol=0)


# ------------------------------------------------------------- the CUDA source under TSan
def test_cuda_kernels_race_free_under_tsan(tmp_path):
    """csrc/cuda/kl.cu with one OS thread per CUDA thread under ThreadSanitizer (csrc/emu)."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[1] / "csrc"
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        pytest.skip(f"{cxx} not found")
    exe = tmp_path / "kl_tsan"
    r = subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fsanitize=thread", "-DGENFAST_EMULATE", "-fno-strict-aliasing",
                        "-pthread", f"-I{csrc}", str(csrc / "emu" / "kl_tsan_check.cpp"), "-x", "c++",
                        str(csrc / "cuda" / "kl.cu"), "-o", str(exe)], capture_output=True, text=True)
    if r.returncode and "sanitize" in r.stderr:
        pytest.skip(f"no ThreadSanitizer here: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    env = {**os.environ, "TSAN_OPTIONS": "halt_on_error=0 exitcode=66"}
    for prefix in ([], ["setarch", os.uname().machine, "-R"]):  # older TSan needs ASLR off
        r = subprocess.run(prefix + [str(exe)], capture_output=True, text=True, timeout=300, env=env)
        if "FATAL: ThreadSanitizer" not in r.stderr:
            break
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0 and "kl: results ok" in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_logvar_stays_nan_through_the_clamp(device, backend, dtype, use_backend):
    """A NaN logvar (a diverged encoder) gives NaN z and KL for that element, as torch.clamp keeps NaN:
    fminf / fmaxf-style clamps would turn it into lo and hide it."""
    use_backend(backend)
    mu = torch.tensor([[0.5, 0.0], [0.1, 0.2]], dtype=dtype, device=device)
    lv = torch.tensor([[float("nan"), 0.0], [1.0, -1.0]], dtype=dtype, device=device)
    noise = torch.ones_like(mu)
    z, kl = genfast.reparam_kl(mu, lv, noise=noise, reduction="none")
    assert torch.equal(z.isnan(), lv.isnan()) and torch.equal(kl.isnan(), lv.isnan())
    _, kl_sample = genfast.reparam_kl(mu, lv, seed=SEED)
    assert kl_sample.isnan().tolist() == [True, False]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the Triton interpreter's exp (numpy)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("registered", [False, True], ids=["eager", "op"])
def test_unused_output_adds_no_term_to_dlogvar(device, backend, registered, use_backend):
    """Without a clamp, exp(logvar) is inf from logvar ~ 88.7 in fp32 while exp(logvar / 2) is not: a
    loss through z alone has a finite dlogvar (autograd's formula has no KL term), which 0 * inf
    would make NaN. Likewise the KL alone at logvar 200 (exp(100) = inf): the z term is left out.
    Both the eager fast path and the registered op (gradients not materialised as zeros)."""
    use_backend(backend)
    mu = torch.zeros(1, 3, device=device)
    for lv0, which in ((torch.tensor([[100.0, 90.0, 50.0]]), 0), (torch.tensor([[200.0, 120.0, 10.0]]), 1)):
        noise = torch.ones(1, 3, device=device)
        m, l = mu.clone().requires_grad_(), lv0.to(device).requires_grad_()
        if registered:
            outs = torch.ops.genfast.reparam_kl(m, l, noise, None, 0.0, 0.0, False, False)
        else:
            outs = genfast.reparam_kl(m, l, noise=noise, logvar_clamp=None, reduction="none")
        outs[which].sum().backward()
        mr, lr = mu.clone().requires_grad_(), lv0.to(device).requires_grad_()
        reference.reparam_kl(mr, lr, noise=noise, logvar_clamp=None, reduction="none")[which].sum().backward()
        assert not l.grad.isnan().any(), l.grad
        torch.testing.assert_close(l.grad, lr.grad, rtol=1e-5, atol=0)
        torch.testing.assert_close(m.grad, mr.grad, rtol=1e-5, atol=0)


def test_registered_op_and_eager_fast_path_agree():
    """genfast.reparam_kl calls the kernels through an autograd.Function in plain eager mode and
    through torch.ops.genfast.reparam_kl otherwise: same values and gradients."""
    case = reparam_kl_samples("cpu")[0]
    a, b = case.leaves(), case.leaves()
    za, kla = genfast.reparam_kl(*a, seed=SEED)
    seed = torch.tensor(list(SEED))
    zb, klb = torch.ops.genfast.reparam_kl(*b, None, seed, -30.0, 20.0, True, True)
    assert torch.equal(za, zb) and torch.equal(kla, klb)
    g = (torch.randn_like(za), torch.randn_like(kla))
    torch.autograd.backward([za, kla], list(g))
    torch.autograd.backward([zb, klb], list(g))
    assert torch.equal(a[0].grad, b[0].grad) and torch.equal(a[1].grad, b[1].grad)


@pytest.mark.skipif(not any(b == "triton" for _, b in ALL_BACKENDS), reason="triton backend not testable here")
def test_tritons_own_philox_words_match_at_offset_zero():
    """Triton's tl.randint4x(seed, g // 4) is Philox4x32-10 with counter (g // 4, 0, 0) and the
    same key: its words equal ours at offset 0 (tl.randn then maps them to normals differently,
    which is why kernels/kl.py does its own Box-Muller)."""
    import triton
    import triton.language as tl

    @triton.jit
    def words(out_ptr, seed, N: tl.constexpr):
        grp = tl.arange(0, N).to(tl.int64) + (1 << 33)  # counters past 2^32 use the high word too
        a, b, c, d = tl.randint4x(seed, grp)
        base = tl.arange(0, N) * 4
        tl.store(out_ptr + base, a.to(tl.int64, bitcast=False) & 0xFFFFFFFF)
        tl.store(out_ptr + base + 1, b.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + base + 2, c.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out_ptr + base + 3, d.to(tl.int64) & 0xFFFFFFFF)

    n, seed = 64, 0x1234567890AB
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(4 * n, dtype=torch.int64, device=device)
    words[(1,)](out, seed, N=n)
    grp = torch.arange(n, dtype=torch.int64) + (1 << 33)
    zero = torch.zeros_like(grp)
    want = reference.philox4x32_10(grp & 0xFFFFFFFF, grp >> 32, zero, zero, seed & 0xFFFFFFFF, seed >> 32)
    assert torch.equal(out.cpu().view(n, 4), torch.stack(want, dim=1))


def test_bf16_extreme_logvar_with_philox_noise_stays_finite():
    mu = torch.zeros(4, 1000, dtype=torch.bfloat16, requires_grad=True)
    lv = torch.full((4, 1000), 50.0, dtype=torch.bfloat16)
    lv[:, ::2] = -50.0
    lv.requires_grad_(True)
    z, kl = genfast.reparam_kl(mu, lv, seed=3)
    (z.float().sum() + kl.sum()).backward()
    for t in (z, kl, mu.grad, lv.grad):
        assert torch.isfinite(t).all()
