"""The patched diffusers FlowMatchEulerDiscreteScheduler and guided_step (issue 8, item 3): the
fused step equals diffusers' own within the tolerance rule, no host lookup of the first step index,
the cases it does not fuse run the original code. Tiny random-config models (tests/diffusers_tiny.py)."""
import pytest
import torch

from genfast.testing import assert_within_reference_error, backends_to_test

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed (pip install .[diffusers])")
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402

import diffusers_tiny as tiny  # noqa: E402
from diffusers_tiny import B, NULL, SCALE, STEPS  # noqa: E402
from genfast.patch.sampling import guided_step, patch_scheduler  # noqa: E402


def _scheduler_loop(model, shape, y, *, patched, fused_cfg, **config):
    sched = tiny.scheduler(**config)
    handle = patch_scheduler(sched) if patched else None
    latents = tiny.noise(shape)
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
    model, shape = tiny.dit(1)
    y = torch.tensor([3, 4])
    want = _scheduler_loop(model, shape, y, patched=False, fused_cfg=False)
    got = _scheduler_loop(model, shape, y, patched=True, fused_cfg=fused_cfg)
    high = tiny.diffusers_loop(model, shape, y, torch.full_like(y, NULL), dtype=torch.float64, uncond_first=False)
    assert_within_reference_error("patched scheduler", got, want, high)


def test_patched_step_matches_one_step_exactly_enough_in_every_dtype():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        plain, fused = tiny.scheduler(), tiny.scheduler()
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
    sched = tiny.scheduler()
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
        plain, fused = tiny.scheduler(**config), tiny.scheduler(**config)
        patch_scheduler(fused)
        t = plain.timesteps[1]
        want = plain.step(v, t, x, **call).prev_sample
        call = {k: torch.Generator().manual_seed(0) if k == "generator" else c for k, c in call.items()}
        torch.testing.assert_close(fused.step(v, t, x, **call).prev_sample, want, rtol=0, atol=0)
    plain, fused = tiny.scheduler(), tiny.scheduler()
    patch_scheduler(fused)
    want = plain.step(v.double(), plain.timesteps[0], x.double()).prev_sample  # fp64: diffusers rounds to fp32
    torch.testing.assert_close(fused.step(v.double(), fused.timesteps[0], x.double()).prev_sample, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="integer"):
        fused.step(v, 3, x)


def test_patch_unpatch_and_patching_twice():
    sched = tiny.scheduler()
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
    plain, fused = tiny.scheduler(), tiny.scheduler()
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
    plain, fused = tiny.scheduler(), tiny.scheduler()
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
    sched = tiny.scheduler()
    with pytest.raises(TypeError, match="FlowMatchEulerDiscreteScheduler"):
        patch_scheduler(diffusers.DDIMScheduler())
    with pytest.raises(ValueError, match="noise_pred"):
        guided_step(sched, torch.randn(3, 4), sched.timesteps[0], torch.randn(3, 4), guidance_scale=2.0)
    with pytest.raises(TypeError, match="guidance_scale"):
        guided_step(sched, torch.randn(6, 4), sched.timesteps[0], torch.randn(3, 4), guidance_scale="2")


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
    want, plain = x, tiny.scheduler()
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
