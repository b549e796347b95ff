"""Tiny random-config diffusers models and the CFG sampling loop as diffusers pipelines write it,
shared by the sampling tests (tests/test_patch_sampling.py, tests/test_patch_scheduler.py).
Not a test module: tests/conftest.py puts this folder on sys.path (pytest runs in importlib mode).

The loops are compared with the tolerance rule: the low-precision reference is the loop as a
pipeline writes it (fp32), the high one the same loop in fp64 (model, latents and Euler update in
fp64, same sigmas)."""
import torch
from diffusers import (DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel,
                       SD3Transformer2DModel)

B, STEPS, SCALE = 2, 10, 4.0  # SCALE: diffusers' guidance_scale g; genfast's guidance is g - 1
NULL = 10  # DiT's unconditional class (num_embeds_ada_norm)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # adaLN-Zero and the output projections start at zero: make every layer work
        p.data.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def dit(seed=0):
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NULL)
    return randomize(m, seed), (B, 4, 8, 8)


def sd3(seed=0):
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                              pooled_projection_dim=6, out_channels=4, pos_embed_max_size=16)
    return randomize(m, seed), (B, 4, 8, 12)  # non-square latents


def pixart(seed=0):
    torch.manual_seed(seed)
    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12,
                                 use_additional_conditions=False)
    return randomize(m, seed), (B, 4, 8, 8)


def text(seed, length=5, width=12, pooled=6, mask=False):
    """(cond, uncond) dicts of batched text conditioning; mask: a padded text key mask (PixArt)."""
    g = torch.Generator().manual_seed(seed)
    cond, uncond = ({"encoder_hidden_states": torch.randn(B, length, width, generator=g)} for _ in range(2))
    if pooled:
        cond["pooled_projections"], uncond["pooled_projections"] = (torch.randn(B, pooled, generator=g)
                                                                    for _ in range(2))
    if mask:
        cond["encoder_attention_mask"] = torch.tensor([[1] * length, [1] * (length - 2) + [0] * 2])
        uncond["encoder_attention_mask"] = torch.tensor([[1] * 2 + [0] * (length - 2), [1] * length])
    return cond, uncond


def scheduler(steps=STEPS, shift=3.0, **config):
    s = FlowMatchEulerDiscreteScheduler(shift=shift, **config)
    s.set_timesteps(steps)
    return s


def noise(shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(dtype)


def cast(cond, dtype):
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in cond.items()}


def cfg_loop(guided_velocity, sched, latents):
    """Euler over sched's timesteps with guided_velocity(latents, t) -> noise_pred. fp64 latents: the
    update is written out (scheduler.step computes in fp32), the high-precision reference."""
    sigmas = sched.sigmas.double()
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            noise_pred = guided_velocity(latents, t)
            if latents.dtype == torch.float64:
                latents = latents + (sigmas[i + 1] - sigmas[i]) * noise_pred
            else:
                latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def diffusers_loop(model, shape, cond, uncond, *, dtype=torch.float32, uncond_first=True, kwargs=None, steps=STEPS):
    """CFG sampling as the DiT / PixArt / SD3 pipelines write it (one call on the doubled batch; SD3:
    uncond first, DiT: cond first)."""
    model = model.to(dtype)
    if isinstance(cond, torch.Tensor):
        both = {"class_labels": torch.cat([uncond, cond] if uncond_first else [cond, uncond])}
    else:
        first, second = (uncond, cond) if uncond_first else (cond, uncond)
        both = {k: torch.cat([cast(first, dtype)[k], cast(second, dtype)[k]]) for k in cond}

    def guided_velocity(latents, t):
        out = model(torch.cat([latents] * 2), timestep=t.expand(2 * shape[0]), return_dict=False,
                    **both, **(kwargs or {}))[0]
        out = out[:, :shape[1]]  # learned variance (DiT, PixArt): the pipelines keep the first half
        first, second = out.chunk(2)
        noise_uncond, noise_cond = (first, second) if uncond_first else (second, first)
        return noise_uncond + SCALE * (noise_cond - noise_uncond)

    latents = cfg_loop(guided_velocity, scheduler(steps), noise(shape, dtype))
    model.float()
    return latents
