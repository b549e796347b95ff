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


# ------------------------------------------------------------------------------------------ VQ
VQ_NORM_EPS = 1e-12  # F.normalize's eps: a zero vector scores 0 in cosine mode, not NaN


def unit_rows(t):
    """F.normalize(t, dim=-1, eps=VQ_NORM_EPS), computed in fp32 for fp16 / bf16 t and rounded back:
    in fp16 the eps underflows to 0, so a zero vector would give 0 / 0 = NaN. Differentiable."""
    return torch.nn.functional.normalize(t.to(_compute_dtype(t)), dim=-1, eps=VQ_NORM_EPS).to(t.dtype)


def _vq_compute_dtype(z, codebook):
    return torch.float64 if torch.float64 in (z.dtype, codebook.dtype) else torch.float32


def vq_scores(z2, codebook, metric="l2"):
    """[n, k] scores whose row-wise argmin is the nearest code (what the kernels rank, vq.h):
    l2 -> |c|^2 - 2 z.c (|z|^2 dropped: it ranks nothing); cosine -> -(z.c) / max(|c|, eps)."""
    if metric == "cosine":
        return -(z2 @ (codebook / codebook.norm(dim=1, keepdim=True).clamp_min(VQ_NORM_EPS)).T)
    return (codebook * codebook).sum(1) - 2 * (z2 @ codebook.T)


def vq_distance(z2, c2, metric="l2"):
    """Row-wise distance of z2 [n, d] to c2 [n, d], computed directly: l2 -> |z - c|^2, cosine ->
    |z/|z| - c/|c||^2 (= 2 - 2 cos)."""
    if metric == "cosine":
        z2 = z2 / z2.norm(dim=1, keepdim=True).clamp_min(VQ_NORM_EPS)
        c2 = c2 / c2.norm(dim=1, keepdim=True).clamp_min(VQ_NORM_EPS)
    return ((z2 - c2) ** 2).sum(1)


def vq_nearest(z, codebook, *, metric="l2", return_distance=False, chunk=4096):
    """Index of the nearest codebook row for every z[..., :] (int64, shape z.shape[:-1]).

    Math in fp32 (fp64 when either input is fp64). Ties (equal scores) go to the lowest index; a
    NaN score never wins (a row of all-NaN scores, i.e. NaN in z, gets index 0). Rows are taken
    `chunk` at a time so the reference holds chunk x k scores, not n x k. The scores come from a
    BLAS matmul, whose rounding may depend on a code's position in the codebook: here bit-identical
    codes can score a last bit apart and a later copy win (seen in fp32 with hundreds of copies);
    genfast's kernels score every code alike and return the first copy."""
    ct = _vq_compute_dtype(z, codebook)
    d = codebook.shape[1]
    z2 = z.reshape(-1, d).to(ct)
    c = codebook.to(ct)
    out = torch.empty(z2.shape[0], dtype=torch.int64, device=z.device)
    for i in range(0, z2.shape[0], chunk):
        s = vq_scores(z2[i:i + chunk], c, metric)
        out[i:i + chunk] = s.nan_to_num(nan=float("inf")).argmin(1)  # argmin alone lets NaN win
    idx = out.reshape(z.shape[:-1])
    if not return_distance:
        return idx
    return idx, vq_distance(z2, c[out], metric).reshape(z.shape[:-1])


def code_counts(indices, codebook_size):
    """How many times each code appears in indices: int64 [codebook_size]."""
    return torch.bincount(indices.reshape(-1), minlength=codebook_size)


def vector_quantize(z, codebook, *, beta=0.25, metric="l2"):
    """(z_q, indices, loss) of the VQ-VAE (van den Oord et al. 2017, arXiv:1711.00937):

        z_q  = z + sg(c - z)                 straight-through: dz_q/dz = 1, value c
        loss = |sg(z) - c|^2 + beta |z - sg(c)|^2   (means over every element; fp32)

    with c = codebook[indices] (in z's dtype). Cosine: z and the codebook are L2-normalised
    first (unit_rows), so z_q is the unit code and the losses compare unit vectors."""
    if metric == "cosine":
        z, codebook = unit_rows(z), unit_rows(codebook)
    idx = vq_nearest(z.detach(), codebook.detach(), metric="l2")
    c = codebook[idx]
    zf, cf = z.float() if z.dtype != torch.float64 else z, c.float() if c.dtype != torch.float64 else c
    loss = ((zf.detach() - cf) ** 2).mean() + beta * ((zf - cf.detach()) ** 2).mean()
    z_q = z + (c.to(z.dtype) - z).detach()
    return z_q, idx, loss


def ema_codebook_step(cluster_size, embed_sum, z2, indices, *, decay, eps):
    """One EMA step of the VQ-VAE codebook (arXiv:1711.00937 App. A.1, with Laplace smoothing of
    the cluster sizes as in Sonnet / VQ-VAE-2): returns (cluster_size, embed_sum, codebook)."""
    k = cluster_size.shape[0]
    onehot = torch.nn.functional.one_hot(indices.reshape(-1), k).to(cluster_size.dtype)
    cluster_size = decay * cluster_size + (1 - decay) * onehot.sum(0)
    embed_sum = decay * embed_sum + (1 - decay) * (onehot.T @ z2.to(embed_sum.dtype))
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]
# ------------------------------------------------------------------------------- reparam_kl
# Philox4x32-10 in plain integer torch ops (the oracle of the kernels' noise; csrc/philox.h defines
# the stream): words are held in int64 tensors, products of two 32-bit words split in 16-bit halves
# so no intermediate passes 2^63.
_M32 = 0xFFFFFFFF


def _mul_hi_lo(m, x):
    """(hi, lo) 32-bit words of the 64-bit product of the constant m and the words x."""
    lo16, hi16 = x & 0xFFFF, x >> 16
    a = m * lo16  # < 2^48
    b = m * hi16  # < 2^48
    mid = a + ((b & 0xFFFF) << 16)  # < 2^49
    return ((b >> 16) + (mid >> 32)) & _M32, mid & _M32


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors of 32-bit counter words; k0, k1: ints."""
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(0xD2511F53, c0)
        hi1, lo1 = _mul_hi_lo(0xCD9E8D57, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def philox_normal(seed, offset, numel, *, start=0, dtype=torch.float32, device=None):
    """The normals genfast's kernels draw for elements start .. start + numel of a call with
    (seed, offset), computed in float64 from the same Philox words and returned in `dtype`.
    Element g uses output g % 4 of Philox at counter (g // 4, offset), key seed; pairs of words give
    two normals by Box-Muller (u from the first word's top 24 bits, in (0, 1]; the angle from the
    second's, in turns)."""
    seed, offset = int(seed) & (2**64 - 1), int(offset) & (2**64 - 1)
    if numel == 0:
        return torch.empty(0, dtype=dtype, device=device)
    g = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    first, last = start // 4, (start + numel - 1) // 4
    grp = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(grp)
    words = philox4x32_10(grp & _M32, grp >> 32, zero + (offset & _M32), zero + (offset >> 32),
                          seed & _M32, seed >> 32)
    out = []
    for xu, xa in ((words[0], words[1]), (words[2], words[3])):
        u = ((xu >> 8) + 1).double() * 2.0**-24
        a = (xa >> 8).double() * 2.0**-24
        r = torch.sqrt(-2.0 * torch.log(u))
        out += [r * torch.cos(2 * torch.pi * a), r * torch.sin(2 * torch.pi * a)]
    normals = torch.stack(out, dim=1).reshape(-1)  # group-major: n0 n1 n2 n3 of each group
    return normals[g - 4 * first].to(dtype)


REDUCTIONS = ("per_sample", "sum", "mean", "none")


def reparam_kl(mu, logvar, *, noise, reduction="per_sample", free_bits=0.0, logvar_clamp=(-30.0, 20.0)):
    """z = mu + noise * exp(lv / 2) and KL(N(mu, exp(lv)) || N(0, 1)) = 0.5 (mu^2 + exp(lv) - 1 - lv),
    lv = logvar clamped to logvar_clamp (None: no clamp). Math in fp32 (fp64 for fp64 inputs); z in
    mu's dtype, the KL in the math dtype. free_bits > 0: per latent dimension (an element of the
    non-batch dims), the batch mean of the KL is clamped from below; a dimension under the floor
    contributes free_bits per sample and no gradient. Reductions: "none" element-wise, "per_sample"
    sum over the non-batch dims [B], "sum" / "mean" of that over the batch."""
    ct = _compute_dtype(mu)
    m, lv = mu.to(ct), logvar.to(ct)
    if logvar_clamp is not None:
        lv = torch.clamp(lv, logvar_clamp[0], logvar_clamp[1])
    z = (m + noise.to(ct) * torch.exp(0.5 * lv)).to(mu.dtype)
    kl = -0.5 * (1 + lv - m.pow(2) - torch.exp(lv))
    if free_bits > 0 and kl.numel() > 0:
        keep = kl.mean(0, keepdim=True) >= free_bits
        kl = torch.where(keep, kl, torch.full_like(kl, free_bits))
    if reduction == "none":
        return z, kl
    per_sample = kl.flatten(1).sum(1) if kl.dim() > 1 else kl  # 1-D: one latent per sample
    if reduction == "per_sample":
        return z, per_sample
    return z, per_sample.sum() if reduction == "sum" else per_sample.mean()


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


class DiTBlock(torch.nn.Module):
    """The DiT block with adaLN-Zero in plain PyTorch (facebookresearch/DiT models.py with timm's
    Attention and Mlp, attention through F.scaled_dot_product_attention): the eager baseline of the
    tests and benchmarks of genfast.nn.DiTBlock, whose parameter names it shares."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        nn = torch.nn
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.attn.proj = nn.Linear(hidden_size, hidden_size)
        hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(hidden_size, hidden), nn.Linear(hidden, hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def attention(self, x):
        b, n, c = x.shape
        q, k, v = self.attn.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.attn.proj(out.transpose(1, 2).reshape(b, n, c))

    def forward(self, x, c):
        def modulate(t, shift, scale):
            return t * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

        sm, cm, gm, sp, cp, gp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gm.unsqueeze(1) * self.attention(modulate(self.norm1(x), sm, cm))
        h = self.mlp.fc1(modulate(self.norm2(x), sp, cp))
        return x + gp.unsqueeze(1) * self.mlp.fc2(torch.nn.functional.gelu(h, approximate="tanh"))
