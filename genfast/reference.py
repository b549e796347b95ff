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


def attention_allowed(nq, nk, *, causal=False, key_padding_mask=None, device=None):
    """Bool [B or 1, 1, Nq, Nk]: which (query, key) pairs take part. causal is top-left aligned,
    as in torch's scaled_dot_product_attention(is_causal=True): query i sees keys 0..i.
    key_padding_mask [B, Nk]: True = a real key (attend), False = padding (ignored)."""
    allowed = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed.tril()
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


def attention(q, k, v, *, causal=False, scale=None, key_padding_mask=None, upcast=True):
    """softmax(q k^T * scale + mask) v over [B, H, N, D], written as plain PyTorch writes it.

    upcast=True: math in fp32 (fp64 for fp64 inputs), the result cast to q's dtype (the ground
    truth). upcast=False: matmuls and softmax in the inputs' dtype, as a user's low-precision
    eager code runs (the "reference error" side of the tolerance rule).
    A query row whose keys are all masked (a fully padded sample, or causal rows before the first
    real key) gives zeros, and zero (finite) gradients."""
    ct = (torch.float64 if q.dtype == torch.float64 else torch.float32) if upcast else q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if causal or key_padding_mask is not None:
        allowed = attention_allowed(q.shape[-2], k.shape[-2], causal=causal,
                                    key_padding_mask=key_padding_mask, device=q.device)
        any_key = allowed.any(-1, keepdim=True)
        # Fully masked rows: a finite row (softmax stays finite) zeroed afterwards.
        s = s.masked_fill(~allowed, float("-inf")).masked_fill(~any_key, 0.0)
        p = torch.softmax(s, dim=-1) * any_key
    else:
        p = torch.softmax(s, dim=-1)
    return torch.matmul(p.to(ct), v.to(ct)).to(q.dtype)


def attention_lse(q, k, *, causal=False, scale=None, key_padding_mask=None):
    """fp32 (fp64) log-sum-exp of each query row's scaled scores [B, H, Nq]; -inf for fully
    masked rows. What the kernels keep for the backward."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if causal or key_padding_mask is not None:
        allowed = attention_allowed(q.shape[-2], k.shape[-2], causal=causal,
                                    key_padding_mask=key_padding_mask, device=q.device)
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.logsumexp(s, dim=-1)
