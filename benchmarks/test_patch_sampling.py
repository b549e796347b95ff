"""diffusers flow-matching CFG sampling: the loop as diffusers pipelines write it (transformer on the
doubled batch, CFG combination, FlowMatchEulerDiscreteScheduler.step) vs genfast's (the transformer
driven by genfast.sample_rectified_flow through FlowTransformer, fused CFG + Euler step; the
transformer also under genfast.patch(model) when that is on this branch), eager and torch.compile,
in one run (issue 8, items 3 and 4). Random weights at real sizes, nothing downloaded.

  genfast          genfast loop, patched transformer (genfast.patch) if available, else unpatched
  genfast_unpatched  genfast loop, unpatched transformer (only the step is fused)
  eager            diffusers-style loop, unpatched transformer
  compile          diffusers-style loop, torch.compile(transformer)   (GPU: also mode="reduce-overhead")

CPU: DiT-S-sized DiTTransformer2DModel (hidden 384, 6 heads, depth 12, 32x32x4 latents, patch 2 =
256 tokens), batch 4 (8 on the doubled batch), 10 steps, fp32: minutes per case on 2 cores, so run
it with --bench-quick on a shared machine. GPU: DiT-XL/2 size in bf16, batch 1 and 8, 50 steps,
genfast with cuda_graph=True vs eager and compile(mode="reduce-overhead").
"""
import copy
import os

import pytest
import torch

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")
diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed (pip install .[diffusers])")
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler  # noqa: E402

from genfast.patch.sampling import FlowTransformer, guided_step, patch_scheduler  # noqa: E402

CUDA = torch.cuda.is_available()
SCALE = 4.0  # diffusers' guidance_scale; genfast's guidance is SCALE - 1
NULL = 1000  # DiT's unconditional class
# The CPU loops take ~8 s (quiet) to minutes (loaded) per 10 steps; every step costs the same, so on
# a loaded shared machine GENFAST_BENCH_CPU_STEPS=2 gives the same ratios sooner (and says so).
CPU_STEPS = int(os.environ.get("GENFAST_BENCH_CPU_STEPS", "10"))


def _patch_fn():
    """genfast.patch(model) from the patch branch, or None when it is not merged here."""
    p = getattr(genfast, "patch", None)
    if p is None:
        try:
            import genfast.patch as p
        except ImportError:
            return None
    return p if callable(p) else getattr(p, "patch", None)


def _dit(size, device, dtype):
    torch.manual_seed(0)
    heads, head_dim, depth = {"S": (6, 64, 12), "XL": (16, 72, 28)}[size]
    m = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
                              num_layers=depth, sample_size=32, patch_size=2, num_embeds_ada_norm=NULL)
    with torch.no_grad():
        for p in m.parameters():  # adaLN-Zero starts at zero: make every block do real work
            p.add_(0.02 * torch.randn_like(p))
    return m.eval().to(device, dtype)


def _scheduler(steps, device):
    s = FlowMatchEulerDiscreteScheduler(shift=1.0)
    s.set_timesteps(steps, device=device)
    return s


def diffusers_loop(model, batch, steps, dtype, device):
    """What DiTPipeline-style code does, with the flow-matching scheduler."""
    def run():
        sched = _scheduler(steps, device)
        g = torch.Generator(device).manual_seed(1)
        latents = torch.randn(batch, 4, 32, 32, generator=g, device=device, dtype=dtype)
        y = torch.arange(batch, device=device) % NULL
        y2 = torch.cat([y, torch.full_like(y, NULL)])
        with torch.no_grad():
            for t in sched.timesteps:
                out = model(torch.cat([latents] * 2), timestep=t.expand(2 * batch), class_labels=y2,
                            return_dict=False)[0][:, :4]
                cond, uncond = out.chunk(2)
                latents = sched.step(uncond + SCALE * (cond - uncond), t, latents, return_dict=False)[0]
        return latents
    return run


def genfast_loop(model, batch, steps, dtype, device, cuda_graph=False):
    flow = FlowTransformer(model)
    sigmas = _scheduler(steps, "cpu").sigmas

    def run():
        g = torch.Generator(device).manual_seed(1)
        y = torch.arange(batch, device=device) % NULL
        with torch.no_grad():
            return genfast.sample_rectified_flow(flow, (batch, 4, 32, 32), sigmas=sigmas, guidance=SCALE - 1, labels=y,
                                                 null_label=NULL, generator=g, device=device, dtype=dtype,
                                                 cuda_graph=cuda_graph)
    return run


def _patched_copy(model):
    """(patched deep copy, None) or (None, 'skipped: why')."""
    patch = _patch_fn()
    if patch is None:
        return None, "skipped: genfast.patch(model) is not on this branch (issue 8 item 1, branch patch)"
    m = copy.deepcopy(model)
    patch(m)
    return m, None


def _flops(model, batch, steps):
    n = 256  # tokens
    hidden = model.config.num_attention_heads * model.config.attention_head_dim
    per_token_layer = 2 * 12 * hidden * hidden + 2 * 2 * n * hidden  # qkv/proj/mlp + attention
    return steps * 2 * batch * n * model.config.num_layers * per_token_layer


@pytest.mark.skipif(CUDA, reason="CPU case (the GPU runs the DiT-XL/2 cases)")
def test_dit_s_cfg_sampling_eager(compare):
    model = _dit("S", "cpu", torch.float32)
    patched, why = _patched_copy(model)
    batch, steps = 4, CPU_STEPS
    subject = genfast_loop(patched if patched is not None else model, batch, steps, torch.float32, "cpu")
    torch.testing.assert_close(subject(), diffusers_loop(model, batch, steps, torch.float32, "cpu")(),
                               rtol=1e-3, atol=1e-3)  # the timed loops give the same latents
    impls = {"genfast": subject}
    impls["genfast_unpatched"] = why or genfast_loop(model, batch, steps, torch.float32, "cpu")
    impls["eager"] = diffusers_loop(model, batch, steps, torch.float32, "cpu")
    compare(f"diffusers DiT-S CFG sampling, batch 4 x {steps} steps, fp32"
            + (" (genfast unpatched model)" if why else ""), impls, flops=_flops(model, batch, steps),
            targets={"eager": 1.15},
            note="genfast = fused CFG step + genfast.patch(model) when available; eager = diffusers-style loop")


@pytest.mark.skipif(CUDA, reason="CPU case (the GPU runs the DiT-XL/2 cases)")
def test_dit_s_cfg_sampling_compiled(compare):
    model = _dit("S", "cpu", torch.float32)
    patched, why = _patched_copy(model)
    batch, steps = 4, CPU_STEPS
    subject_model = torch.compile(patched if patched is not None else model, fullgraph=True, dynamic=False)
    baseline_model = torch.compile(model, fullgraph=True, dynamic=False)
    compare(f"diffusers DiT-S CFG sampling under torch.compile, batch 4 x {steps} steps, fp32"
            + (" (genfast unpatched model)" if why else ""), {
                "genfast": genfast_loop(subject_model, batch, steps, torch.float32, "cpu"),
                "compile": diffusers_loop(baseline_model, batch, steps, torch.float32, "cpu"),
            }, flops=_flops(model, batch, steps), targets={"compile": 1.0},
            note="both transformers under torch.compile(fullgraph=True); genfast adds the fused CFG step")


# DiT-S/XL latents (32x32x4) and SD3-1024px-like latents (128x128x16)
STEP_SHAPES = [(4, 4, 32, 32), (1, 16, 128, 128)] + ([(8, 4, 32, 32), (8, 16, 128, 128)] if CUDA else [])


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cfg_scheduler_step(compare, shape):
    """One CFG combination + scheduler step on the doubled batch's output: guided_step (fused, one
    pass) and the patched step vs the pipelines' two lines, eager and compiled."""
    dev = compare.device
    dtype = torch.bfloat16 if CUDA else torch.float32
    x = torch.randn(*shape, device=dev, dtype=dtype)
    out = torch.randn(2 * shape[0], *shape[1:], device=dev, dtype=dtype)
    plain, fused, patched = _scheduler(50, dev), _scheduler(50, dev), _scheduler(50, dev)
    patch_scheduler(patched)
    t = plain.timesteps[0]

    def again(s):  # the same step every call: reset the index diffusers advances
        s._step_index = 0
        return s

    def pipeline(s):
        def run():
            uncond, cond = out.chunk(2)
            return again(s).step(uncond + SCALE * (cond - uncond), t, x, return_dict=False)[0]
        return run

    def cfg_update(o, xx, dt):
        uncond, cond = o.chunk(2)
        return xx + dt * (uncond + SCALE * (cond - uncond))

    compiled = compare.compile(cfg_update)
    dt = (plain.sigmas[1] - plain.sigmas[0]).to(dev)
    compare(f"CFG + FlowMatchEuler step, {'x'.join(map(str, shape))} {str(dtype)[6:]}", {
        "guided_step": lambda: guided_step(again(fused), out, t, x, guidance_scale=SCALE)[0],
        "patched_step": pipeline(patched),
        "eager": pipeline(plain),
        "compile": lambda: compiled(out, x, dt),
    }, bytes=x.numel() * x.element_size() * 4,
        note="bytes: read both halves and x, write x; compile: the combination + update only (no scheduler)")


# ------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: DiT-XL/2 bf16 50-step sampling")
@pytest.mark.parametrize("batch", [1, 8])
def test_dit_xl_cfg_sampling_cuda_graph(compare, batch):
    dev, dtype, steps = torch.device("cuda"), torch.bfloat16, 50
    model = _dit("XL", dev, dtype)
    patched, why = _patched_copy(model)
    subject = genfast_loop(patched if patched is not None else model, batch, steps, dtype, dev, cuda_graph=True)
    err = (subject().float() - diffusers_loop(model, batch, steps, dtype, dev)().float()).abs().max().item()
    reduce_overhead = torch.compile(model, mode="reduce-overhead", dynamic=False)
    compare(f"diffusers DiT-XL/2 CFG sampling, batch {batch} x {steps} steps, bf16, CUDA graph"
            + (" (genfast unpatched model)" if why else ""), {
                "genfast": subject,
                "genfast_eager": genfast_loop(patched if patched is not None else model, batch, steps, dtype, dev),
                "eager": diffusers_loop(model, batch, steps, dtype, dev),
                "reduce-overhead": diffusers_loop(reduce_overhead, batch, steps, dtype, dev),
            }, flops=_flops(model, batch, steps), targets={"eager": 10.0, "reduce-overhead": 1.1},
            note=f"genfast: one step (transformer + fused CFG step) captured in a CUDA graph and replayed; "
                 f"max |genfast - eager| latents after {steps} bf16 steps: {err:.3g}")
