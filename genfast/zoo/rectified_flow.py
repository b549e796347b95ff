"""Rectified flow (the lecture notes' flow matching): training loss and three samplers.

Training: x_t = (1 - t) x + t z with z ~ N(0, I), target v = z - x, loss |model(x_t, t, y) - v|^2.
t is drawn "uniform" or "logit_normal" (sigmoid of N(m, s): more weight on mid-trajectory times,
SD3's non-uniform schedule). With label dropout, a fraction of labels is replaced by the null class
so that one model gives both v(x | y) and v(x) for classifier-free guidance.

Sampling walks t from 1 (noise) to 0; with guidance w the velocity is (1 + w) v(x|y) - w v(x):
  euler  genfast.sample_rectified_flow (the fused Euler / CFG step)
  heun   second order: Euler predictor, then the average of both velocities (the fused step again)
  sde    Euler-Maruyama on the reverse SDE with the same marginals (the score / SDE view): with the
         score s = -(x + (1 - t) v) / t of this interpolation and the noise schedule
         g(t)^2 = 2 eta t, a step of size h from t is
             x <- (1 - eta h) x - h (1 + eta (1 - t)) v + sqrt(2 eta t h) * eps,
         deterministic (eta = 0) it is Euler; the noise vanishes as t -> 0.
"""
import torch
from tqdm.auto import tqdm

import genfast
from genfast import reference
from genfast.zoo import _ops


def sample_timesteps(n, *, schedule="logit_normal", generator=None, device=None, mean=0.0, std=1.0):
    if schedule == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if schedule == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device))
    raise ValueError(f"schedule must be 'uniform' or 'logit_normal', got {schedule!r}")


def flow_loss(model, x, y=None, *, null_label=None, label_dropout=0.0, schedule="logit_normal", generator=None,
              noise=None, t=None):
    """Mean squared error of the velocity prediction on one batch (the draws come from `generator`)."""
    b = x.shape[0]
    if t is None:
        t = sample_timesteps(b, schedule=schedule, generator=generator, device=x.device)
    z = torch.randn(x.shape, generator=generator, device=x.device) if noise is None else noise
    tb = t.view(b, *([1] * (x.dim() - 1)))
    xt = (1 - tb) * x + tb * z
    if y is None:
        v = model(xt, t)
    else:
        if label_dropout > 0:
            drop = torch.rand(b, generator=generator, device=x.device) < label_dropout
            y = torch.where(drop, torch.full_like(y, null_label), y)
        v = model(xt, t, y)
    return (v.float() - (z - x).float()).pow(2).mean()


def _velocity(model, x, t, labels, null_label, guidance):
    """(v_cond, v_uncond or None) at time t (a float); CFG runs one doubled batch."""
    b = x.shape[0]
    tt = torch.full((b,), float(t), device=x.device)
    if guidance is None:
        return (model(x, tt) if labels is None else model(x, tt, labels)), None
    y2 = torch.cat([labels, torch.full_like(labels, null_label)])
    v = model(torch.cat([x, x]), torch.cat([tt, tt]), y2)
    return v.chunk(2)


def _euler_conditioned(model, shape, *, steps, guidance, labels, null_label, schedule, shift, generator,
                       progress, device):
    """The Euler (/ CFG) loop of genfast.sample_rectified_flow (same noise, times and steps, so the
    same samples) for a model with sampling_conditioning (the zoo DiT): the conditioning of every
    step computed before the loop, with CFG the image batch embedded once for both halves (no
    torch.cat of [x, x]), the fused step in place, under inference_mode. None when the model declines."""
    if guidance is not None and (labels is None or null_label is None):
        raise ValueError("guidance needs labels and null_label")
    y = labels if guidance is None else torch.cat([labels, torch.full_like(labels, null_label)])
    t = reference.timesteps(steps, schedule=schedule, shift=shift, device=labels.device)
    with torch.inference_mode():
        cond = model.sampling_conditioning(t[:-1], y)
    if cond is None:
        return None  # before drawing the noise: the caller's loop draws the same
    x = torch.randn(shape, generator=generator, device=device)
    t, dts, b = t.to(x.device), (t[:-1] - t[1:]).to(x.device), shape[0]
    with torch.inference_mode():
        for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
            v = model(x, None, None, cond=cond[i])
            if guidance is None:
                genfast.flow_euler_step(x, v, dt=dts[i], out=x)
            else:
                genfast.flow_euler_step(x, v[:b], v[b:], dt=dts[i], guidance=guidance, out=x)
    return x


def sample(model, shape, *, method="euler", steps=50, guidance=None, labels=None, null_label=None, generator=None,
           eta=1.0, schedule="uniform", shift=1.0, progress=False, device=None, eager=False):
    """Samples with `method` in euler | heun | sde; the noise is torch.randn(shape, generator=generator).
    eager=True runs the plain-PyTorch loop (genfast.reference) instead of the fused step (baselines)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")  # 0 returned the initial noise
    if method == "euler":
        if not eager and labels is not None and _ops.enabled() and hasattr(model, "sampling_conditioning"):
            x = _euler_conditioned(model, shape, steps=steps, guidance=guidance, labels=labels,
                                   null_label=null_label, schedule=schedule, shift=shift, generator=generator,
                                   progress=progress, device=device)
            if x is not None:
                return x
        if eager:
            return reference.sample_rectified_flow(model, shape, steps=steps, guidance=guidance, labels=labels,
                                                   null_label=null_label, schedule=schedule, shift=shift,
                                                   generator=generator, device=device)
        return genfast.sample_rectified_flow(model, shape, steps=steps, guidance=guidance, labels=labels,
                                             null_label=null_label, schedule=schedule, shift=shift,
                                             generator=generator, progress=progress, device=device)
    if method not in ("heun", "sde"):
        raise ValueError(f"method must be 'euler', 'heun' or 'sde', got {method!r}")
    if guidance is not None and (labels is None or null_label is None):
        raise ValueError("guidance needs labels and null_label")
    step = _ops._flow_euler_step if eager else _ops.flow_euler_step
    x = torch.randn(shape, generator=generator, device=device)
    ts = reference.timesteps(steps, schedule=schedule, shift=shift, device=x.device).tolist()
    w = 0.0 if guidance is None else guidance
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        h = t - t_next
        vc, vu = _velocity(model, x, t, labels, null_label, guidance)
        if method == "heun":
            x_pred = step(x, vc, vu, dt=h, guidance=w)
            if t_next > 0:  # average with the velocity at the predicted point
                vc2, vu2 = _velocity(model, x_pred, t_next, labels, null_label, guidance)
                vc, vu = vc + vc2, (None if vu is None else vu + vu2)
                x = step(x, vc, vu, dt=h / 2, guidance=w)
            else:
                x = x_pred
        else:
            g = eta if t_next > 0 else 0.0  # the last step is deterministic
            x = step(x * (1 - g * h), vc, vu, dt=h * (1 + g * (1 - t)), guidance=w)
            if g:
                x = x + (2 * g * t * h) ** 0.5 * torch.randn(shape, generator=generator, device=x.device)
    return x
