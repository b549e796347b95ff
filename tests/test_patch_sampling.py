"""diffusers flow-matching sampling driven by genfast (issue 8, items 3 and 4): FlowTransformer
driving genfast.sample_rectified_flow, and sample_rectified_flow(cuda_graph=True). Tiny random-config
diffusers models (tests/diffusers_tiny.py), nothing downloaded; the patched scheduler and
guided_step are in tests/test_patch_scheduler.py."""
import types

import pytest
import torch

import genfast
import genfast.sampling
from genfast.sampling import CudaGraphStep, _graph_key
from genfast.testing import assert_within_reference_error

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed (pip install .[diffusers])")
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel  # noqa: E402

import diffusers_tiny as tiny  # noqa: E402
from diffusers_tiny import B, NULL, SCALE, STEPS  # noqa: E402
from genfast.patch.sampling import FlowTransformer, patch_scheduler  # noqa: E402


def genfast_loop(model, shape, cond, uncond, *, kwargs=None, cuda_graph=False, device="cpu"):
    sched = tiny.scheduler()
    flow = FlowTransformer(model, **(kwargs or {}))
    with torch.no_grad():
        return genfast.sample_rectified_flow(
            flow, shape, sigmas=sched.sigmas, guidance=SCALE - 1, labels=cond, null_label=uncond,
            generator=torch.Generator(device).manual_seed(7), device=device, cuda_graph=cuda_graph)


def _check_against_diffusers(name, model, shape, cond, uncond, got, **kw):
    low = tiny.diffusers_loop(model, shape, cond, uncond, **kw)
    high = tiny.diffusers_loop(model, shape, cond, uncond, dtype=torch.float64, **kw)
    assert (low - high).abs().max() > 0  # the fp64 loop really is another computation
    assert_within_reference_error(name, got, low, high)


# ------------------------------------------------------------------- (b) the sampler adapter
def test_sampler_drives_dit_like_the_diffusers_loop():
    model, shape = tiny.dit()
    y = torch.tensor([1, 7])
    got = genfast_loop(model, shape, y, torch.full_like(y, NULL))
    _check_against_diffusers("DiT", model, shape, y, torch.full_like(y, NULL), got, uncond_first=False)


def test_sampler_drives_sd3_with_text_conditioning():
    model, shape = tiny.sd3()
    cond, uncond = tiny.text(1)
    got = genfast_loop(model, shape, cond, uncond)
    _check_against_diffusers("SD3", model, shape, cond, uncond, got)


def test_sampler_drives_pixart_with_padded_text_mask():
    model, shape = tiny.pixart()
    cond, uncond = tiny.text(2, length=7, pooled=0, mask=True)
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    got = genfast_loop(model, shape, cond, uncond, kwargs=extra)
    _check_against_diffusers("PixArt", model, shape, cond, uncond, got, kwargs=extra)


def test_sampler_drives_flux_with_true_cfg():
    """Flux: packed latents [B, tokens, 16], timestep = sigma (the model scales by 1000 itself),
    img_ids / txt_ids unbatched, dynamic shifting (mu); its pipeline's true CFG runs the transformer
    twice (negative, then positive) where genfast runs it once on the doubled batch."""
    torch.manual_seed(6)
    model = tiny.randomize(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                                              pooled_projection_dim=6, axes_dims_rope=(4, 6, 6)), 6)
    shape, length = (B, 12, 16), 5  # 3 x 4 latent patches, 5 text tokens
    ids = {"img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"),
                                  -1).reshape(12, 3), "txt_ids": torch.zeros(length, 3)}
    cond, uncond = tiny.text(8, length=length)

    def scheduler():
        s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        s.set_timesteps(sigmas=torch.linspace(1.0, 1 / STEPS, STEPS).tolist(), mu=0.8)
        return s

    def flux_loop(dtype):
        m = model.to(dtype)

        def guided_velocity(latents, t):
            timestep = t.expand(B).to(dtype) / 1000
            pos, neg = (m(latents, timestep=timestep, return_dict=False, **ids, **tiny.cast(c, dtype))[0]
                        for c in (cond, uncond))
            return neg + SCALE * (pos - neg)

        latents = tiny.cfg_loop(guided_velocity, scheduler(), tiny.noise(shape, dtype))
        model.float()
        return latents

    with torch.no_grad():
        got = genfast.sample_rectified_flow(
            FlowTransformer(model, timestep_scale=1.0, **ids), shape, sigmas=scheduler().sigmas, guidance=SCALE - 1,
            labels=cond, null_label=uncond, generator=torch.Generator().manual_seed(7))
    low, high = flux_loop(torch.float32), flux_loop(torch.float64)
    assert_within_reference_error("Flux", got, low, high)


def _patch_fn():
    p = getattr(genfast, "patch", None)
    return p if callable(p) else None  # genfast.patch(model): issue 8 item 1 (branch patch)


@pytest.mark.skipif(_patch_fn() is None, reason="genfast.patch(model) is not on this branch (issue 8 item 1)")
@pytest.mark.parametrize("build", [tiny.dit, tiny.sd3], ids=["DiT", "SD3"])
def test_sampler_with_patched_transformer_equals_unpatched_loop(build):
    model, shape = build(5)
    if build is tiny.dit:
        cond, uncond, order = torch.tensor([2, 9]), torch.full((B,), NULL), False
    else:
        (cond, uncond), order = tiny.text(5), True
    with _patch_fn()(model):
        got = genfast_loop(model, shape, cond, uncond)
    _check_against_diffusers("patched", model, shape, cond, uncond, got, uncond_first=order)


class _PointMass:
    """A 'transformer' whose data is one point x0: the exact flow velocity is (x - x0) / sigma with
    sigma = timestep / 1000. Euler on straight paths is exact, so any schedule lands on x0: checks
    the sign of v, the timestep scale and dt against diffusers' conventions, independently of both."""

    def __init__(self, x0):
        self.x0 = x0

    def __call__(self, x, timestep, return_dict=False, **kw):
        sigma = (timestep / 1000).reshape(-1, *[1] * (x.dim() - 1))
        return ((x - self.x0) / sigma,)


def test_conventions_land_on_the_data_point():
    x0 = torch.randn(B, 4, 3, 5, generator=torch.Generator().manual_seed(3))
    sched = tiny.scheduler(steps=7, shift=2.0)  # sigmas end at 0: the last step lands on the data
    got = genfast.sample_rectified_flow(FlowTransformer(_PointMass(x0)), x0.shape, sigmas=sched.sigmas)
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)
    latents = torch.randn(x0.shape)
    with patch_scheduler(sched):
        for t in sched.timesteps:
            latents = sched.step(_PointMass(x0)(latents, t.expand(B))[0], t, latents).prev_sample
    torch.testing.assert_close(latents, x0, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="timestep_scale"):
        FlowTransformer(lambda *a, **k: None, timestep_scale=0)
    with pytest.raises(TypeError, match="cond"):
        FlowTransformer(lambda *a, **k: None)(torch.randn(1, 2), torch.ones(1), cond=[1])
    f = FlowTransformer(lambda x, **k: (x,))
    with pytest.raises(ValueError, match="sigmas"):
        genfast.sample_rectified_flow(f, (2, 3), sigmas=torch.ones(1))
    with pytest.raises(ValueError, match="steps"):
        genfast.sample_rectified_flow(f, (2, 3), steps=4, sigmas=torch.linspace(1, 0, 3))
    cond, uncond = tiny.text(0)
    with pytest.raises(ValueError, match="null_label"):
        genfast.sample_rectified_flow(f, (B, 3), steps=2, guidance=1.0, labels=cond, null_label=3)
    with pytest.raises(ValueError, match=r"labels\['pooled_projections'\]"):
        genfast.sample_rectified_flow(f, (B, 3), steps=2, labels={**cond, "pooled_projections": torch.ones(3, 6)})
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        genfast.sample_rectified_flow(f, (2, 3), steps=2, cuda_graph=True, device="cpu")


def test_compiled_sampling_step_equals_eager():
    """torch.compile(fullgraph=True) over the adapter-driven step (model + fused CFG step)."""
    model, shape = tiny.dit(2)
    flow = FlowTransformer(model)
    y2 = torch.tensor([1, 2, NULL, NULL])

    def step(x, t, dt):
        v_cond, v_uncond = flow(torch.cat([x, x]), t.expand(2 * B), y2).chunk(2)
        return genfast.flow_euler_step(x, v_cond, v_uncond, dt=dt, guidance=SCALE - 1)

    x, t, dt = tiny.noise(shape), torch.tensor(0.7), torch.tensor(0.1)
    with torch.no_grad():
        want = step(x, t, dt)
        got = torch.compile(step, fullgraph=True)(x, t, dt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_graph_cache_key():
    """What decides whether sample_rectified_flow(cuda_graph=True) reuses its capture (checked here
    on the CPU; the GPU tests replay)."""
    model, shape = tiny.dit(3)
    flow, x, y = FlowTransformer(model), torch.zeros(shape), torch.zeros(2, dtype=torch.long)
    key = _graph_key(flow, x, y, 3.0)
    assert key == _graph_key(flow, torch.ones(shape), torch.ones(2, dtype=torch.long), 3.0)
    assert key != _graph_key(flow, x, y, 2.0)  # a float guidance is baked into the graph
    assert key != _graph_key(flow, torch.zeros(1, 4, 8, 8), y[:1], 3.0)
    assert _graph_key(flow, x, {"a": x}, None) != _graph_key(flow, x, {"b": x}, None)
    next(model.parameters()).data = torch.zeros_like(next(model.parameters()))
    assert key != _graph_key(flow, x, y, 3.0)
    assert _graph_key(lambda x, t: x, x, None, None) is None  # weights not visible: captured every call
    with pytest.raises(ValueError, match="CUDA"):
        CudaGraphStep(flow, x)


class _PythonReplay(CudaGraphStep):
    """CudaGraphStep whose 'graph' replays the Python step: checks the static buffers, the copies
    before each replay and the reuse logic on the CPU (the capture itself needs a GPU)."""
    captures = 0

    def _capture(self, device):
        _PythonReplay.captures += 1
        return types.SimpleNamespace(replay=self._step)


def test_cuda_graph_buffers_and_reuse_with_python_replay(monkeypatch):
    monkeypatch.setattr(genfast.sampling, "_require_cuda", lambda device: None)
    monkeypatch.setattr(genfast.sampling, "CudaGraphStep", _PythonReplay)
    genfast.sampling.clear_cuda_graphs()
    model, shape = tiny.sd3(9)
    flow, sigmas = FlowTransformer(model), tiny.scheduler().sigmas
    runs = [(tiny.text(10), torch.tensor([1.0, 3.0]), 1), (tiny.text(11), torch.tensor([2.0, 0.5]), 2)]
    for cuda_graph in (True, False):  # graphed first: a stale buffer would show in the second graphed run
        out = []
        for (cond, uncond), w, seed in runs:
            with torch.no_grad():
                out.append(genfast.sample_rectified_flow(
                    flow, shape, sigmas=sigmas, guidance=w, labels=cond, null_label=uncond,
                    generator=torch.Generator().manual_seed(seed), cuda_graph=cuda_graph))
        if cuda_graph:
            graphed = out
    assert _PythonReplay.captures == 1  # the second call reused the first capture
    for g, e in zip(graphed, out):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert not torch.equal(graphed[0], graphed[1])
    genfast.sampling.clear_cuda_graphs()


# ------------------------------------------------------------------------------ GPU only
def _gpu_dit(dtype):
    model, shape = tiny.dit(4)
    return model.to("cuda", dtype), shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(dtype):
    model, shape = _gpu_dit(dtype)
    y = torch.tensor([1, 5], device="cuda")
    flow = FlowTransformer(model)
    sigmas = tiny.scheduler().sigmas

    def run(cuda_graph):
        g = torch.Generator("cuda").manual_seed(11)
        with torch.no_grad():
            x = genfast.sample_rectified_flow(flow, shape, sigmas=sigmas, guidance=SCALE - 1, labels=y,
                                              null_label=NULL, generator=g, device="cuda", dtype=dtype,
                                              cuda_graph=cuda_graph)
        return x, torch.randn(3, generator=g, device="cuda")  # the generator's state after sampling

    (eager, after_eager), (graphed, after_graphed) = run(False), run(True)
    # the same kernels in the same order; cuBLAS may pick another algorithm on the capture stream
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(after_graphed, after_eager, rtol=0, atol=0)  # the RNG moved as in eager


@pytest.mark.gpu
def test_cuda_graph_replay_has_no_host_sync_and_no_recompile():
    model, shape = _gpu_dit(torch.float32)
    flow = torch.compile(FlowTransformer(model).__call__)
    y2 = torch.tensor([1, 5, NULL, NULL], device="cuda")
    t = tiny.scheduler().sigmas.cuda()
    with torch.no_grad():
        x = torch.randn(shape, device="cuda")
        graphed = CudaGraphStep(flow, x, y2, SCALE - 1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            graphed.run(x, t, t[:-1] - t[1:], cond=y2.flip(0))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.compiler.set_stance("fail_on_recompile")
        try:  # a second sampler run: new noise, same shapes, must not recompile
            genfast.sample_rectified_flow(flow, shape, sigmas=tiny.scheduler().sigmas, guidance=SCALE - 1,
                                          labels=y2[:B], null_label=NULL, device="cuda", cuda_graph=True)
        finally:
            torch.compiler.set_stance("default")


@pytest.mark.gpu
def test_cuda_graph_is_reused_and_recaptured_when_weights_change(monkeypatch):
    model, shape = _gpu_dit(torch.float32)
    flow, sigmas = FlowTransformer(model), tiny.scheduler().sigmas
    captures = []
    monkeypatch.setattr(CudaGraphStep, "_step", lambda self, f=CudaGraphStep._step: (captures.append(1), f(self)))

    def run(y, seed, cuda_graph):
        with torch.no_grad():
            return genfast.sample_rectified_flow(
                flow, shape, sigmas=sigmas, guidance=torch.tensor([1.0, SCALE - 1], device="cuda"), labels=y,
                null_label=NULL, generator=torch.Generator("cuda").manual_seed(seed), device="cuda",
                cuda_graph=cuda_graph)

    first = run(torch.tensor([1, 2], device="cuda"), 0, True)
    n = len(captures)  # warm-up + capture
    second = run(torch.tensor([3, 4], device="cuda"), 1, True)
    assert len(captures) == n, "the second call with new labels and noise re-captured"
    torch.testing.assert_close(second, run(torch.tensor([3, 4], device="cuda"), 1, False))
    assert not torch.equal(first, second)  # the returned tensors are not the graph's buffer
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data * 1.01  # new tensors: the old graph would read freed memory
    n = len(captures)
    third = run(torch.tensor([3, 4], device="cuda"), 1, True)
    assert len(captures) > n
    torch.testing.assert_close(third, run(torch.tensor([3, 4], device="cuda"), 1, False))

