"""diffusers flow-matching sampling on genfast's fused step (issue 8, items 3 and 4): the patched
FlowMatchEulerDiscreteScheduler, guided_step, FlowTransformer driving genfast.sample_rectified_flow,
and sample_rectified_flow(cuda_graph=True). Tiny random-config diffusers models, nothing downloaded.

The loops are compared with the tolerance rule: ref_low is the loop as diffusers pipelines write it
(fp32), ref_high the same loop in fp64 (model, latents and Euler update in fp64, same sigmas)."""
import types

import pytest
import torch

import genfast
import genfast.sampling
from genfast.sampling import CudaGraphStep, _graph_key
from genfast.testing import assert_within_reference_error, backends_to_test

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed (pip install .[diffusers])")
from diffusers import (  # noqa: E402
    DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, PixArtTransformer2DModel,
    SD3Transformer2DModel)

from genfast.patch.sampling import FlowTransformer, guided_step, patch_scheduler  # noqa: E402

B, STEPS, SCALE = 2, 10, 4.0  # SCALE: diffusers' guidance_scale g; genfast's guidance is g - 1
NULL = 10  # DiT's unconditional class (num_embeds_ada_norm)


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # adaLN-Zero and the output projections start at zero: make every layer work
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _dit(seed=0):
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NULL)
    return _randomize(m, seed), (B, 4, 8, 8)


def _sd3(seed=0):
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                              pooled_projection_dim=6, out_channels=4, pos_embed_max_size=16)
    return _randomize(m, seed), (B, 4, 8, 12)  # non-square latents


def _pixart(seed=0):
    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12,
                                 use_additional_conditions=False)
    return _randomize(m, seed), (B, 4, 8, 8)


def _text(seed, length=5, width=12, pooled=6, mask=False):
    """(cond, uncond) dicts of batched text conditioning; mask: a padded text key mask (PixArt)."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = {"encoder_hidden_states": torch.randn(B, length, width, generator=g)}, {
        "encoder_hidden_states": torch.randn(B, length, width, generator=g)}
    if pooled:
        cond["pooled_projections"], uncond["pooled_projections"] = torch.randn(B, pooled, generator=g), torch.randn(
            B, pooled, generator=g)
    if mask:
        cond["encoder_attention_mask"] = torch.tensor([[1] * length, [1] * (length - 2) + [0] * 2])
        uncond["encoder_attention_mask"] = torch.tensor([[1] * 2 + [0] * (length - 2), [1] * length])
    return cond, uncond


def _scheduler(steps=STEPS, shift=3.0, **config):
    s = FlowMatchEulerDiscreteScheduler(shift=shift, **config)
    s.set_timesteps(steps)
    return s


def _noise(shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)


def _cast(cond, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()}


def diffusers_loop(model, shape, cond, uncond, *, dtype=torch.float32, uncond_first=True, kwargs=None, steps=STEPS):
    """CFG sampling as diffusers pipelines write it (SD3: uncond first; DiT: cond first). In fp64 the
    Euler update is written out (scheduler.step computes in fp32): the high-precision reference."""
    model = model.to(dtype)
    sched = _scheduler(steps)
    latents = _noise(shape, dtype)
    if isinstance(cond, torch.Tensor):
        both = {"class_labels": torch.cat([uncond, cond] if uncond_first else [cond, uncond])}
    else:
        first, second = (uncond, cond) if uncond_first else (cond, uncond)
        both = {k: torch.cat([_cast(first, dtype)[k], _cast(second, dtype)[k]]) for k in cond}
    sigmas = sched.sigmas.double()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            out = model(torch.cat([latents] * 2), timestep=t.expand(2 * shape[0]), return_dict=False,
                        **both, **(kwargs or {}))[0]
            out = out[:, :shape[1]]  # learned variance (DiT, PixArt): the pipelines keep the first half
            first, second = out.chunk(2)
            noise_uncond, noise_cond = (first, second) if uncond_first else (second, first)
            noise_pred = noise_uncond + SCALE * (noise_cond - noise_uncond)
            if dtype == torch.float64:
                latents = latents + (sigmas[i + 1] - sigmas[i]) * noise_pred
            else:
                latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
    model.float()
    return latents


def genfast_loop(model, shape, cond, uncond, *, kwargs=None, cuda_graph=False, device="cpu"):
    sched = _scheduler()
    flow = FlowTransformer(model, **(kwargs or {}))
    with torch.no_grad():
        return genfast.sample_rectified_flow(
            flow, shape, sigmas=sched.sigmas, guidance=SCALE - 1, labels=cond, null_label=uncond,
            generator=torch.Generator(device).manual_seed(7), device=device, cuda_graph=cuda_graph)


def _check_against_diffusers(name, model, shape, cond, uncond, got, **kw):
    low = diffusers_loop(model, shape, cond, uncond, **kw)
    high = diffusers_loop(model, shape, cond, uncond, dtype=torch.float64, **kw)
    assert (low - high).abs().max() > 0  # the fp64 loop really is another computation
    assert_within_reference_error(name, got, low, high)


# ------------------------------------------------------------------- (b) the sampler adapter
def test_sampler_drives_dit_like_the_diffusers_loop():
    model, shape = _dit()
    y = torch.tensor([1, 7])
    got = genfast_loop(model, shape, y, torch.full_like(y, NULL))
    _check_against_diffusers("DiT", model, shape, y, torch.full_like(y, NULL), got, uncond_first=False)


def test_sampler_drives_sd3_with_text_conditioning():
    model, shape = _sd3()
    cond, uncond = _text(1)
    got = genfast_loop(model, shape, cond, uncond)
    _check_against_diffusers("SD3", model, shape, cond, uncond, got)


def test_sampler_drives_pixart_with_padded_text_mask():
    model, shape = _pixart()
    cond, uncond = _text(2, length=7, pooled=0, mask=True)
    extra = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    got = genfast_loop(model, shape, cond, uncond, kwargs=extra)
    _check_against_diffusers("PixArt", model, shape, cond, uncond, got, kwargs=extra)


def test_sampler_drives_flux_with_true_cfg():
    """Flux: packed latents [B, tokens, 16], timestep = sigma (the model scales by 1000 itself),
    img_ids / txt_ids unbatched, dynamic shifting (mu); its pipeline's true CFG runs the transformer
    twice (negative, then positive) where genfast runs it once on the doubled batch."""
    torch.manual_seed(6)
    model = _randomize(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=12,
                                              pooled_projection_dim=6, axes_dims_rope=(4, 6, 6)), 6)
    shape, length = (B, 12, 16), 5  # 3 x 4 latent patches, 5 text tokens
    ids = {"img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"),
                                  -1).reshape(12, 3), "txt_ids": torch.zeros(length, 3)}
    cond, uncond = _text(8, length=length)

    def scheduler():
        s = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        s.set_timesteps(sigmas=torch.linspace(1.0, 1 / STEPS, STEPS).tolist(), mu=0.8)
        return s

    def flux_loop(dtype):
        sched, latents, m = scheduler(), _noise(shape, dtype), model.to(dtype)
        sigmas = sched.sigmas.double()
        with torch.no_grad():
            for i, t in enumerate(sched.timesteps):
                timestep = t.expand(B).to(dtype) / 1000
                pos, neg = (m(latents, timestep=timestep, return_dict=False, **ids, **_cast(c, dtype))[0]
                            for c in (cond, uncond))
                noise_pred = neg + SCALE * (pos - neg)
                if dtype == torch.float64:
                    latents = latents + (sigmas[i + 1] - sigmas[i]) * noise_pred
                else:
                    latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
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
@pytest.mark.parametrize("build", [_dit, _sd3], ids=["DiT", "SD3"])
def test_sampler_with_patched_transformer_equals_unpatched_loop(build):
    model, shape = build(5)
    if build is _dit:
        cond, uncond, order = torch.tensor([2, 9]), torch.full((B,), NULL), False
    else:
        (cond, uncond), order = _text(5), True
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
    sched = _scheduler(steps=7, shift=2.0)  # sigmas end at 0: the last step lands on the data
    got = genfast.sample_rectified_flow(FlowTransformer(_PointMass(x0)), x0.shape, sigmas=sched.sigmas)
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)
    latents = torch.randn(x0.shape)
    with patch_scheduler(sched):
        for t in sched.timesteps:
            latents = sched.step(_PointMass(x0)(latents, t.expand(B))[0], t, latents).prev_sample
    torch.testing.assert_close(latents, x0, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ (a) the patched scheduler
def _scheduler_loop(model, shape, y, *, patched, fused_cfg, **config):
    sched = _scheduler(**config)
    handle = patch_scheduler(sched) if patched else None
    latents = _noise(shape)
    y2 = torch.cat([y, torch.full_like(y, NULL)])
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(torch.cat([latents] * 2), timestep=t.expand(2 * B), class_labels=y2).sample[:, :4]
            if fused_cfg:
                latents = guided_step(sched, out, t, latents, guidance_scale=SCALE, uncond_first=False)[0]
            else:
                cond, uncond = out.chunk(2)
                latents = sched.step(uncond + SCALE * (cond - uncond), t, latents).prev_sample
    assert sched.step_index == STEPS
    if handle is not None:
        handle.unpatch()
    return latents


@pytest.mark.parametrize("fused_cfg", [False, True], ids=["step", "guided_step"])
def test_patched_scheduler_equals_unpatched(fused_cfg):
    model, shape = _dit(1)
    y = torch.tensor([3, 4])
    want = _scheduler_loop(model, shape, y, patched=False, fused_cfg=False)
    got = _scheduler_loop(model, shape, y, patched=True, fused_cfg=fused_cfg)
    high = diffusers_loop(model, shape, y, torch.full_like(y, NULL), dtype=torch.float64, uncond_first=False)
    assert_within_reference_error("patched scheduler", got, want, high)


def test_patched_step_matches_one_step_exactly_enough_in_every_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        plain, fused = _scheduler(), _scheduler()
        patch_scheduler(fused)
        x = torch.randn(3, 4, 5, 6).to(dtype)
        for t in plain.timesteps[:3]:
            v = torch.randn(3, 4, 5, 6).to(dtype)
            want = plain.step(v, t, x, return_dict=False)[0]
            got = fused.step(v, t, x, return_dict=False)[0]
            i = plain.step_index
            high = x.double() + (plain.sigmas[i].double() - plain.sigmas[i - 1].double()) * v.double()
            assert got.dtype == want.dtype == dtype and isinstance(got, torch.Tensor)
            assert_within_reference_error(f"step {dtype}", got, want, high)
            x = want
        assert fused.step_index == plain.step_index == 3


def test_first_step_index_without_a_device_lookup(monkeypatch):
    """The pipelines' `for t in scheduler.timesteps` finds its index from the view's position (no
    nonzero()/item()); begin_index wins; a float timestep is looked up on the host."""
    sched = _scheduler()
    patch_scheduler(sched)
    monkeypatch.setattr(sched, "index_for_timestep", lambda *a, **k: pytest.fail("looked the timestep up"))
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    sched.step(v, sched.timesteps[4], x)
    assert sched.step_index == 5
    sched.set_timesteps(STEPS)
    sched.set_begin_index(2)
    sched.step(v, sched.timesteps[0], x)
    assert sched.step_index == 3
    monkeypatch.undo()
    sched.set_timesteps(STEPS)
    sched.step(v, float(sched.timesteps[6]), x)
    assert sched.step_index == 7


def test_unfused_cases_run_the_original_step():
    x, v = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    for config, call in [({"stochastic_sampling": True}, {"generator": torch.Generator().manual_seed(0)}),
                         ({}, {"per_token_timesteps": torch.full((2, 3), 500.0)})]:
        plain, fused = _scheduler(**config), _scheduler(**config)
        patch_scheduler(fused)
        t = plain.timesteps[1]
        want = plain.step(v, t, x, **call).prev_sample
        call = {k: torch.Generator().manual_seed(0) if k == "generator" else c for k, c in call.items()}
        torch.testing.assert_close(fused.step(v, t, x, **call).prev_sample, want, rtol=0, atol=0)
    plain, fused = _scheduler(), _scheduler()
    patch_scheduler(fused)
    want = plain.step(v.double(), plain.timesteps[0], x.double()).prev_sample  # fp64: diffusers rounds to fp32
    torch.testing.assert_close(fused.step(v.double(), fused.timesteps[0], x.double()).prev_sample, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="integer"):
        fused.step(v, 3, x)


def test_patch_unpatch_and_patching_twice():
    sched = _scheduler()
    original = sched.step
    handle = patch_scheduler(sched)
    assert handle.patched and patch_scheduler(sched).patched and sched.step.__func__ is not type(sched).step
    handle.unpatch()
    assert not handle.patched and sched.step == original and "step" not in vars(sched)
    with patch_scheduler(sched) as h:
        assert h.patched
    assert not h.patched
    sched.step = lambda *a, **k: None
    with pytest.raises(ValueError, match="already replaced"):
        patch_scheduler(sched)


def test_guided_step_per_sample_scale():
    plain, fused = _scheduler(), _scheduler()
    x, out = torch.randn(2, 3, 4), torch.randn(4, 3, 4)
    g = torch.tensor([1.0, 6.0])
    t = plain.timesteps[0]
    uncond, cond = out.chunk(2)
    want = plain.step(uncond + g[:, None, None] * (cond - uncond), t, x).prev_sample
    got = guided_step(fused, out, t, x, guidance_scale=g)[0]
    high = x.double() + (plain.sigmas[1] - plain.sigmas[0]).double() * (
        uncond.double() + g.double()[:, None, None] * (cond.double() - uncond.double()))
    assert_within_reference_error("guided_step per-sample", got, want, high)
    assert fused.step_index == 1


@pytest.mark.parametrize("backend", [b for d, b in backends_to_test() if d == "cpu"])
def test_guided_step_on_every_backend(use_backend, backend):
    """The learned-variance slice of a doubled-batch output (out[:, :C], then its halves: strided
    views) through each kernel backend, as DiT and PixArt pipelines produce it."""
    use_backend(backend)
    plain, fused = _scheduler(), _scheduler()
    x = torch.randn(3, 4, 5, 7)
    out = torch.randn(6, 8, 5, 7)[:, :4]
    for t in plain.timesteps[:2]:
        cond, uncond = out.chunk(2)
        want = plain.step(uncond + SCALE * (cond - uncond), t, x).prev_sample
        got = guided_step(fused, out, t, x, guidance_scale=SCALE, uncond_first=False)[0]
        i = plain.step_index
        high = x.double() + (plain.sigmas[i] - plain.sigmas[i - 1]).double() * (
            uncond.double() + SCALE * (cond.double() - uncond.double()))
        assert_within_reference_error(f"guided_step {backend}", got, want, high)
        x = want


def test_bad_arguments():
    sched = _scheduler()
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        patch_scheduler(diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="noise_pred"):
        guided_step(sched, torch.randn(3, 4), sched.timesteps[0], torch.randn(3, 4), guidance_scale=2.0)
    with pytest.raises(TypeError, match="guidance_scale"):
        guided_step(sched, torch.randn(6, 4), sched.timesteps[0], torch.randn(3, 4), guidance_scale="2")
    with pytest.raises(ValueError, match="timestep_scale"):
        FlowTransformer(lambda *a, **k: None, timestep_scale=0)
    with pytest.raises(TypeError, match="cond"):
        FlowTransformer(lambda *a, **k: None)(torch.randn(1, 2), torch.ones(1), cond=[1])
    f = FlowTransformer(lambda x, **k: (x,))
    with pytest.raises(ValueError, match="sigmas"):
        genfast.sample_rectified_flow(f, (2, 3), sigmas=torch.ones(1))
    with pytest.raises(ValueError, match="steps"):
        genfast.sample_rectified_flow(f, (2, 3), steps=4, sigmas=torch.linspace(1, 0, 3))
    cond, uncond = _text(0)
    with pytest.raises(ValueError, match="null_label"):
        genfast.sample_rectified_flow(f, (B, 3), steps=2, guidance=1.0, labels=cond, null_label=3)
    with pytest.raises(ValueError, match=r"labels\['pooled_projections'\]"):
        genfast.sample_rectified_flow(f, (B, 3), steps=2, labels={**cond, "pooled_projections": torch.ones(3, 6)})
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        genfast.sample_rectified_flow(f, (2, 3), steps=2, cuda_graph=True, device="cpu")


def test_compiled_sampling_step_equals_eager():
    """torch.compile(fullgraph=True) over the adapter-driven step (model + fused CFG step)."""
    model, shape = _dit(2)
    flow = FlowTransformer(model)
    y2 = torch.tensor([1, 2, NULL, NULL])

    def step(x, t, dt):
        v_cond, v_uncond = flow(torch.cat([x, x]), t.expand(2 * B), y2).chunk(2)
        return genfast.flow_euler_step(x, v_cond, v_uncond, dt=dt, guidance=SCALE - 1)

    x, t, dt = _noise(shape), torch.tensor(0.7), torch.tensor(0.1)
    with torch.no_grad():
        want = step(x, t, dt)
        got = torch.compile(step, fullgraph=True)(x, t, dt)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cuda_graph_cache_key():
    """What decides whether sample_rectified_flow(cuda_graph=True) reuses its capture (checked here
    on the CPU; the GPU tests replay)."""
    model, shape = _dit(3)
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
    model, shape = _sd3(9)
    flow, sigmas = FlowTransformer(model), _scheduler().sigmas
    runs = [(_text(10), torch.tensor([1.0, 3.0]), 1), (_text(11), torch.tensor([2.0, 0.5]), 2)]
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
    model, shape = _dit(4)
    return model.to("cuda", dtype), shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager(dtype):
    model, shape = _gpu_dit(dtype)
    y = torch.tensor([1, 5], device="cuda")
    flow = FlowTransformer(model)
    sigmas = _scheduler().sigmas

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
    t = _scheduler().sigmas.cuda()
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
            genfast.sample_rectified_flow(flow, shape, sigmas=_scheduler().sigmas, guidance=SCALE - 1,
                                          labels=y2[:B], null_label=NULL, device="cuda", cuda_graph=True)
        finally:
            torch.compiler.set_stance("default")


@pytest.mark.gpu
def test_cuda_graph_is_reused_and_recaptured_when_weights_change(monkeypatch):
    model, shape = _gpu_dit(torch.float32)
    flow, sigmas = FlowTransformer(model), _scheduler().sigmas
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


@pytest.mark.gpu
def test_patched_scheduler_has_no_host_sync_on_gpu():
    x, v = torch.randn(2, 4, 8, 8, device="cuda"), torch.randn(2, 4, 8, 8, device="cuda")
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(STEPS, device="cuda")
    with pytest.raises(RuntimeError):  # the unpatched first step looks its index up on the device
        torch.cuda.set_sync_debug_mode("error")
        try:
            sched.step(v, sched.timesteps[0], x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sched.set_timesteps(STEPS, device="cuda")
    want, plain = x, _scheduler()
    with patch_scheduler(sched):
        torch.cuda.set_sync_debug_mode("error")
        try:
            for t in sched.timesteps:
                x = sched.step(v, t, x).prev_sample
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for t in plain.timesteps:
        want = plain.step(v.cpu(), t, want.cpu()).prev_sample
    torch.testing.assert_close(x.cpu(), want, rtol=1e-5, atol=1e-5)
