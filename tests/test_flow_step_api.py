"""flow_euler_step's contract beyond numerics: bad inputs, torch.compile, the sampler, info."""
import subprocess
import sys

import pytest
import torch

import genfast
from genfast import reference


def _xv(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)


@pytest.mark.parametrize("call,exc,words", [
    (lambda x, vc, vu: genfast.flow_euler_step(x.int(), vc, vu, dt=0.1), TypeError, ["x", "floating"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc.half(), vu, dt=0.1), TypeError, ["v_cond", "dtype"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu[:1], dt=0.1), ValueError, ["v_uncond", "shape"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu.to("meta"), dt=0.1), ValueError, ["v_uncond", "device"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, [1.0], vu, dt=0.1), TypeError, ["v_cond", "Tensor"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=0.1, guidance=float("nan")), ValueError, ["guidance", "finite"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=0.1, guidance=float("inf")), ValueError, ["guidance", "finite"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=torch.ones(5)), ValueError, ["dt", "shape"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=torch.ones(4, 1)), ValueError, ["dt", "shape"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt="0.1"), TypeError, ["dt"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=torch.ones(4, dtype=torch.bool)), TypeError, ["dt"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=0.1, out=vc), ValueError, ["out", "v_cond"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=0.1, out=vu), ValueError, ["out", "v_uncond"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=0.1, out=x.double()), TypeError, ["out", "dtype"]),
    (lambda x, vc, vu: genfast.flow_euler_step(vc, vc, vu, dt=0.1, out=vc), ValueError, ["out", "v_cond"]),
    (lambda x, vc, vu: genfast.flow_euler_step(vu, vc, vu, dt=0.1, out=vu), ValueError, ["out", "v_uncond"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x, vc, vu, dt=True), TypeError, ["dt"]),
    (lambda x, vc, vu: genfast.flow_euler_step(x[0, 0, 0], vc[0, 0, 0], vu[0, 0, 0], dt=0.1), ValueError, ["x", "batch"]),
])
def test_bad_input_names_the_argument(call, exc, words):
    x, vc, vu = _xv(4, 3, 8)
    with pytest.raises(exc) as info:
        call(x, vc, vu)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_out_aliasing_a_half_of_the_doubled_batch_is_refused():
    v = torch.randn(9, 3)
    vc, vu = v[:4], v[4:8]
    with pytest.raises(ValueError, match="v_uncond"):
        genfast.flow_euler_step(vc.clone(), vc, vu, dt=0.1, out=v[5:9])


def test_the_samplers_call_takes_the_short_path_and_others_do_not():
    """The launch-bound sampler call (contiguous, float dt/w, out None or x) skips the general
    checks; this pins which calls do, so the general path keeps every other case."""
    from genfast.ops.flow_step import _fast_step

    from genfast.ops.flow_step import _FAST_KERNELS, backend_for

    if _FAST_KERNELS[backend_for(torch.empty(1))] is None:
        pytest.skip("no compiled module with flow_step_contiguous (rebuild: pip install .)")
    x, vc, vu = _xv(4, 3, 8)
    want = reference.flow_euler_step(x, vc, vu, dt=0.1, guidance=2)
    assert _fast_step(x, vc, vu, 0.1, 2, None) is not None
    got = x.clone()
    assert _fast_step(got, vc, vu, 0.1, 2.0, got) is got
    torch.testing.assert_close(got, want)
    for args in [(x[:, :, ::2], vc[:, :, ::2], vu[:, :, ::2], 0.1, 2.0, None),  # strided
                 (x, vc, vu, torch.tensor(0.1), 2.0, None), (x, vc, vu, 0.1, 2.0, vc),  # tensor dt, out a velocity
                 (x.double(), vc.double(), vu.double(), 0.1, 2.0, None), (x, vc, vu, 0.1, float("nan"), None),
                 (x, vc.requires_grad_(), vu, 0.1, 2.0, None), (x[:0], vc[:0], vu[:0], 0.1, 2.0, None)]:
        assert _fast_step(*args) is None


def test_out_is_not_differentiable():
    x, vc, vu = _xv(2, 3)
    vc.requires_grad_()
    with pytest.raises(ValueError, match="out= is not differentiable"):
        genfast.flow_euler_step(x, vc, vu, dt=0.1, out=x)


def test_forcing_a_backend_that_cannot_run_lists_the_reasons(use_backend):
    use_backend("cuda")
    x, vc, vu = _xv(2, 3)
    with pytest.raises(ValueError, match="forced backend 'cuda'.*cuda tensors"):
        genfast.flow_euler_step(x, vc, vu, dt=0.1)
    use_backend("cpu")
    with pytest.raises(ValueError, match="float64"):
        genfast.flow_euler_step(x.double(), vc.double(), vu.double(), dt=0.1)
    use_backend("nonsense")
    with pytest.raises(ValueError, match="GENFAST_BACKEND"):
        genfast.flow_euler_step(x, vc, vu, dt=0.1)


def test_float64_falls_back_to_the_reference_silently():
    x, vc, vu = _xv(2, 3, dtype=torch.float64)
    got = genfast.flow_euler_step(x, vc, vu, dt=0.1, guidance=2.0)
    torch.testing.assert_close(got, reference.flow_euler_step(x, vc, vu, dt=0.1, guidance=2.0), rtol=0, atol=0)


def test_compiled_equals_eager_without_graph_breaks():
    x, vc, vu = _xv(4, 3, 8)
    dt, w = torch.rand(4), torch.tensor(3.0)

    def step(x, v, dt, w):
        vc, vu = v.chunk(2)
        return genfast.flow_euler_step(x, vc, vu, dt=dt, guidance=w) * 2

    v = torch.cat([vc, vu])
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x, v, dt, w), step(x, v, dt, w))

    def step_in_place(x, v, dt):
        vc, vu = v.chunk(2)
        genfast.flow_euler_step(x, vc, vu, dt=dt, guidance=1.5, out=x)
        return x

    want = step_in_place(x.clone(), v, dt)
    torch.testing.assert_close(torch.compile(step_in_place, fullgraph=True)(x.clone(), v, dt), want)


def test_dynamic_compile_with_python_float_arguments():
    """torch.compile(dynamic=True) traces Python floats symbolically: the ops' checks of float arguments
    (finite dt / guidance / scale, free_bits, the logvar clamp) must not break the graph (math.isfinite
    on a symbolic float did, in reparam_kl with its default arguments and in flow_euler_step)."""
    torch._dynamo.reset()
    x, vc, vu = _xv(3, 4, 5)
    step = torch.compile(lambda x, vc, vu, dt, w: genfast.flow_euler_step(x, vc, vu, dt=dt, guidance=w),
                         dynamic=True, fullgraph=True)
    for dt, w in ((0.1, 2.0), (0.25, 1.5)):
        torch.testing.assert_close(step(x, vc, vu, dt, w), reference.flow_euler_step(x, vc, vu, dt=dt, guidance=w))
    kl = torch.compile(lambda m, l, fb: genfast.reparam_kl(m, l, seed=1, free_bits=fb, logvar_clamp=(-20.0, 10.0)),
                       dynamic=True, fullgraph=True)
    for fb in (0.0, 0.5):
        got = kl(x, vc, fb)
        want = genfast.reparam_kl(x, vc, seed=1, free_bits=fb, logvar_clamp=(-20.0, 10.0))
        torch.testing.assert_close(got, want)
    q = torch.randn(1, 2, 5, 8)
    att = torch.compile(lambda q, s: genfast.attention(q, q, q, scale=s), dynamic=True, fullgraph=True)
    torch.testing.assert_close(att(q, 0.3), genfast.attention(q, q, q, scale=0.3))


def test_fifty_step_compiled_loop_compiles_once():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()

    @torch.compile(backend=counter, fullgraph=True)
    def step(x, v, dt, w):
        vc, vu = v.chunk(2)
        return genfast.flow_euler_step(x, vc, vu, dt=dt, guidance=w)

    x = torch.randn(2, 5)
    ts = genfast.reference.timesteps(50, schedule="shifted", shift=3.0)
    for i in range(50):
        x = step(x, torch.randn(4, 5), ts[i] - ts[i + 1], ts[i] * 4)
    assert counter.frame_count == 1


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("schedule", ["uniform", "shifted"])
def test_sampler_equals_plain_loop(guided, schedule):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))
    emb = torch.nn.Embedding(4, 1)

    def model(x, t, y=None):
        h = torch.cat([x, t[:, None], emb(y) if y is not None else torch.zeros_like(t[:, None])], 1)
        return net(h)

    kw = dict(steps=12, schedule=schedule, shift=3.0)
    if guided:
        kw.update(guidance=torch.tensor([0.0, 1.0, 4.0]), labels=torch.tensor([0, 1, 2]), null_label=3)
    with torch.no_grad():
        got = genfast.sample_rectified_flow(model, (3, 4), generator=torch.Generator().manual_seed(5), **kw)
        want = reference.sample_rectified_flow(model, (3, 4), generator=torch.Generator().manual_seed(5), **kw)
    torch.testing.assert_close(got, want)


def test_sampler_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        genfast.sample_rectified_flow(lambda x, t: x, (2, 3), steps=0)
    with pytest.raises(ValueError, match="null_label"):
        genfast.sample_rectified_flow(lambda x, t, y: x, (2, 3), guidance=2.0, labels=torch.zeros(2, dtype=torch.long))


def test_info_reports_modules_backends_and_versions():
    text = genfast.info.__globals__["report"]()
    for word in ("genfast._C", "genfast._cuda_emu", "flow_euler_step", "torch", "triton"):
        assert word in text
    out = subprocess.run([sys.executable, "-m", "genfast", "info"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and "flow_euler_step" in out.stdout, out.stderr
