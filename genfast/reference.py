"""Plain-PyTorch references of every genfast op: the ground truth of the tests and the backend of
last resort. Only torch here; no genfast kernels are imported (the oracle must stay independent)."""
import torch


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(value, x, ct):
    """A float stays a float; a 0-d or [B] tensor becomes [B, 1, ...] in the compute dtype."""
    if isinstance(value, torch.Tensor):
        return value.to(device=x.device, dtype=ct).reshape((-1,) + (1,) * (x.dim() - 1))
    return float(value)


def flow_euler_step(x, v_cond, v_uncond=None, *, dt, guidance=0.0):
    """x - dt * ((1 + w) * v_cond - w * v_uncond), or x - dt * v_cond without v_uncond.

    dt and guidance (w) are floats, 0-d tensors or per-sample tensors [B]. Math in fp32 (fp64 for
    fp64 inputs), result in x's dtype."""
    ct = _compute_dtype(x)
    dt = _per_sample(dt, x, ct)
    v = v_cond.to(ct)
    if v_uncond is not None:
        w = _per_sample(guidance, x, ct)
        v = (1 + w) * v - w * v_uncond.to(ct)
    return (x.to(ct) - dt * v).to(x.dtype)


def timesteps(steps, *, schedule="uniform", shift=1.0, device=None):
    """t_0 = 1 (noise) > t_1 > ... > t_steps = 0 (data), float32, as used by sample_rectified_flow.

    "shifted": t -> shift * t / (1 + (shift - 1) * t) (SD3's resolution shift; shift 1 = uniform)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    if schedule == "shifted":
        t = shift * t / (1 + (shift - 1) * t)
    elif schedule != "uniform":
        raise ValueError(f"schedule must be 'uniform' or 'shifted', got {schedule!r}")
    return t.to(torch.float32)


def sample_rectified_flow(model, shape, *, steps=50, guidance=None, labels=None, null_label=None,
                          schedule="uniform", shift=1.0, generator=None, device=None, dtype=torch.float32):
    """The plain loop: noise at t=1, Euler steps x <- x - dt * v down to t=0, CFG on a doubled batch."""
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    t = timesteps(steps, schedule=schedule, shift=shift, device=x.device)
    b = shape[0]
    for i in range(steps):
        dt = t[i] - t[i + 1]
        if guidance is None:
            v = model(x, t[i].expand(b)) if labels is None else model(x, t[i].expand(b), labels)
            x = flow_euler_step(x, v, dt=dt)
        else:
            y = torch.cat([labels, torch.full_like(labels, null_label)])
            v = model(torch.cat([x, x]), t[i].expand(2 * b), y)
            vc, vu = v.chunk(2)
            x = flow_euler_step(x, vc, vu, dt=dt, guidance=guidance)
    return x


def _per_sample_or_token(t, x, ct):
    """shift / scale / gate: [B, C] -> [B, 1, C]; [B, 1, C] or [B, N, C] as they are."""
    t = t.to(ct)
    return t.unsqueeze(1) if t.dim() == 2 else t


def adaln_modulate(x, shift, scale, *, eps=1e-6, norm="layer"):
    """norm(x, no affine) * (1 + scale) + shift over the last dim of x [B, N, C].

    norm="layer": (x - mean) / sqrt(var + eps); "rms": x / sqrt(mean(x^2) + eps). shift/scale are
    [B, C] (per sample) or [B, N, C] (per token); shift may be None. Statistics and math in fp32
    (fp64 for fp64 x), the variance as mean((x - mean)^2), result in x's dtype."""
    ct = _compute_dtype(x)
    xf = x.to(ct)
    if norm == "layer":
        xc = xf - xf.mean(-1, keepdim=True)
        xn = xc * torch.rsqrt((xc * xc).mean(-1, keepdim=True) + eps)
    elif norm == "rms":
        xn = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)
    else:
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    out = xn * (1 + _per_sample_or_token(scale, x, ct))
    if shift is not None:
        out = out + _per_sample_or_token(shift, x, ct)
    return out.to(x.dtype)


def gated_residual(x, gate, y):
    """x + gate * y: x, y [B, N, C], gate [B, C] (per sample) or [B, N, C]. fp32 math."""
    ct = _compute_dtype(x)
    return (x.to(ct) + _per_sample_or_token(gate, x, ct) * y.to(ct)).to(x.dtype)
