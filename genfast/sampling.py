"""Rectified-flow sampling on the fused Euler / CFG step (the lecture notes' sampler)."""
import torch
from tqdm.auto import tqdm

from genfast import reference
from genfast.ops.flow_step import flow_euler_step


def sample_rectified_flow(model, shape, *, steps=50, guidance=None, labels=None, null_label=None,
                          schedule="uniform", shift=1.0, generator=None, progress=False,
                          device=None, dtype=torch.float32):
    """Samples x ~ data by walking t from 1 (noise) to 0 with Euler steps x <- x - dt * v.

    model(x, t) or model(x, t, labels) returns the velocity v = noise - data at time t ([B] float32).
    With `guidance` (a float or a per-sample tensor [B]) the model runs once on a doubled batch
    (labels, then `null_label`) and v = (1 + w) v_cond - w v_uncond, fused into the step.
    schedule "uniform" or "shifted" (t -> shift t / (1 + (shift - 1) t)). The noise comes from
    torch.randn(shape, generator=generator), so a plain loop with the same generator gives the same
    samples (genfast.reference.sample_rectified_flow is that loop).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if guidance is not None and (labels is None or null_label is None):
        raise ValueError("guidance needs labels and null_label (the unconditional class) for the doubled batch")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape[:1] != torch.Size(shape[:1])):
        raise ValueError(f"labels must be a tensor with batch size {shape[0]}")
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    t = reference.timesteps(steps, schedule=schedule, shift=shift, device=x.device)
    dts = t[:-1] - t[1:]
    b = shape[0]
    y2 = torch.cat([labels, torch.full_like(labels, null_label)]) if guidance is not None else None
    in_place = not torch.is_grad_enabled()
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        out = x if in_place else None
        if guidance is None:
            v = model(x, t[i].expand(b)) if labels is None else model(x, t[i].expand(b), labels)
            x = flow_euler_step(x, v, dt=dts[i], out=out)
        else:
            v = model(torch.cat([x, x]), t[i].expand(2 * b), y2)
            v_cond, v_uncond = v.chunk(2)  # strided halves, read in place by the fused step
            x = flow_euler_step(x, v_cond, v_uncond, dt=dts[i], guidance=guidance, out=out)
    return x
