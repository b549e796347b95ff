"""genfast.nn.VectorQuantizer: a drop-in VQ bottleneck on genfast's fused nearest-code search.

    vq = VectorQuantizer(dim=64, codebook_size=8192, ema=True, dead_code_threshold=1.0)
    z_q, indices, loss = vq(z)             # z [..., dim]; or [B, dim, H, W] with accept_image_fmap
    x_hat = decoder(z_q); (recon + loss).backward()
    vq.usage()                             # {"perplexity": ..., "used_fraction": ...} of the last batch
    z_q = vq.decode(indices)

Follows vector-quantize-pytorch's `VectorQuantize(dim, codebook_size)` where that makes sense:
forward(x) returns (quantize, indices, loss); channel-last input, or channels-first image
feature maps with accept_image_fmap=True. Differences, on purpose:
  - gradients: the plain straight-through estimator (VQ-VAE); vector-quantize-pytorch defaults to
    the rotation trick. loss = codebook loss + beta * commitment loss (beta = its
    commitment_weight, default 0.25 here vs 1.0 there); with ema=True the codebook is not
    trained by gradients, so loss = beta * commitment loss only (as there).
  - ema defaults to False (a learnable codebook, nn.Parameter); decay defaults to 0.99 (0.8 there).
  - no heads, projections, k-means init, masks, stochastic sampling or orthogonal regularisation.
  - no collective communication inside forward: under DDP every rank calls
    `sync_statistics_()` after each training forward (see there); vector-quantize-pytorch
    all-reduces inside forward when distributed.
  - NaN in the input: a vector containing NaN gets index 0 (genfast.vq_nearest's rule), and
    with ema=True it would poison code 0's statistics; the module does not filter it.
  - dtype: .to(dtype) casts the statistics buffers with the rest (as BatchNorm's running stats);
    the updates are computed in fp32 (fp64 for fp64 buffers) and stored in the buffers' dtype. In
    bf16 / fp16 buffers an EMA step smaller than the buffer's resolution is lost: keep the
    quantizer in fp32 (autocast around it) for long EMA training.
"""
import math

import torch
import torch.nn.functional as F

from genfast.ops.vq import _check_precision, code_counts, vector_quantize, vq_nearest
from genfast.reference import _compute_dtype, unit_rows


def _lerp_(buf, target, weight):
    """buf <- buf + weight (target - buf), computed in target's dtype (the callers': _compute_dtype(buf)) and
    stored in buf's dtype (a module cast with .to(dtype) has its buffers in that dtype; fp32 buffers update
    in place, as before)."""
    if buf.dtype == target.dtype:
        buf.lerp_(target, weight)
    else:
        buf.copy_(buf.to(target.dtype).lerp_(target, weight))


class VectorQuantizer(torch.nn.Module):
    """Args:
        dim: vector length D.  codebook_size: number of codes K.
        beta: commitment weight.  metric: "l2" or "cosine" (inputs and codes L2-normalised).
        ema: codebook follows exponential moving averages of its assigned vectors (cluster sizes
            Laplace-smoothed with eps) instead of gradients.  decay: EMA decay (also used for the
            usage statistics when ema=False).
        dead_code_threshold: in training, a code whose EMA cluster size falls below this is
            re-seeded with a random vector of the batch, and its EMA state is reset with it
            (cluster size = threshold, sum = vector * threshold). 0 disables.
        accept_image_fmap: forward takes [B, D, H, W] and returns z_q in that layout (read in
            place through a channels-last view; no copy for the search).
        precision: the nearest-code search's ("fp32", "bf16-screen", "tf32x3": genfast.vq_nearest).
    Buffers: cluster_size [K] (EMA of per-code counts, starts at 1), embed_avg [K, D] (ema only),
    last_counts [K] (counts of the last training batch)."""

    def __init__(self, dim, codebook_size, *, beta=0.25, metric="l2", ema=False, decay=0.99, eps=1e-5,
                 dead_code_threshold=0, accept_image_fmap=False, precision="fp32"):
        super().__init__()
        _check_precision(precision)
        self.precision = precision
        if metric not in ("l2", "cosine"):
            raise ValueError(f"metric must be 'l2' or 'cosine', got {metric!r}")
        for name, v in (("dim", dim), ("codebook_size", codebook_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, v in (("beta", beta), ("decay", decay), ("eps", eps), ("dead_code_threshold", dead_code_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(v).__name__}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.dim, self.codebook_size, self.beta, self.metric = dim, codebook_size, float(beta), metric
        self.ema, self.decay, self.eps = bool(ema), float(decay), float(eps)
        self.dead_code_threshold, self.accept_image_fmap = float(dead_code_threshold), accept_image_fmap
        init = torch.empty(codebook_size, dim)
        torch.nn.init.kaiming_uniform_(init)  # vector-quantize-pytorch's default init
        if metric == "cosine":
            init = F.normalize(init, dim=-1)
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_avg", init.clone())
        else:
            self.codebook = torch.nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("last_counts", torch.zeros(codebook_size, dtype=torch.int64))
        self.register_buffer("_reseeded", torch.zeros(codebook_size, dtype=torch.bool), persistent=False)

    def extra_repr(self):
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, beta={self.beta}, metric={self.metric!r}, "
                f"ema={self.ema}, decay={self.decay}, dead_code_threshold={self.dead_code_threshold}"
                + ("" if self.precision == "fp32" else f", precision={self.precision!r}"))

    def forward(self, x):
        """x [..., D] (or [B, D, H, W] with accept_image_fmap) -> (quantize, indices, loss)."""
        z = x.permute(0, 2, 3, 1) if self.accept_image_fmap else x
        if z.shape[-1] != self.dim:
            raise ValueError(f"x has {z.shape[-1]} features (dim {'1' if self.accept_image_fmap else '-1'}) "
                             f"but the quantizer has dim={self.dim}")
        if self.ema:
            z_in = unit_rows(z) if self.metric == "cosine" else z
            idx = vq_nearest(z_in, self.codebook, precision=self.precision)
            c = self.codebook[idx].to(z.dtype)
            loss = self.beta * ((z_in.float() - c.float()) ** 2).mean()
            z_q = z_in + (c - z_in).detach()
        else:
            z_q, idx, loss = vector_quantize(z, self.codebook, beta=self.beta, metric=self.metric,
                                             precision=self.precision)
            z_in = unit_rows(z) if self.metric == "cosine" else z
        if self.training:
            self._update(z_in.detach(), idx)
        if self.accept_image_fmap:
            z_q = z_q.permute(0, 3, 1, 2)
        return z_q, idx, loss

    @torch.no_grad()
    def _update(self, z, idx):
        counts = code_counts(idx, self.codebook_size)
        self.last_counts.copy_(counts)
        ct = _compute_dtype(self.cluster_size)
        z2 = z.reshape(-1, self.dim).to(ct)
        _lerp_(self.cluster_size, counts.to(ct), 1 - self.decay)
        if self.ema:
            batch_sum = torch.zeros(self.embed_avg.shape, dtype=ct, device=z2.device).index_add_(0, idx.reshape(-1), z2)
            _lerp_(self.embed_avg, batch_sum, 1 - self.decay)
        if self.dead_code_threshold > 0 and z2.shape[0] > 0:
            dead = self.cluster_size < self.dead_code_threshold
            n_dead = int(dead.sum())
            if n_dead:
                pick = torch.randint(0, z2.shape[0], (n_dead,), device=z2.device)
                seeds = z2[pick]
                self.cluster_size[dead] = self.dead_code_threshold
                if self.ema:
                    self.embed_avg[dead] = (seeds * self.dead_code_threshold).to(self.embed_avg.dtype)
                else:
                    self.codebook.data[dead] = seeds.to(self.codebook.dtype)
                self._reseeded |= dead
        if self.ema:
            self._codebook_from_ema()

    def _codebook_from_ema(self):
        ct = _compute_dtype(self.cluster_size)
        size = self.cluster_size.to(ct)
        n = size.sum()
        smoothed = (size + self.eps) / (n + self.codebook_size * self.eps) * n
        cb = self.embed_avg.to(ct) / smoothed[:, None]
        if self.metric == "cosine":
            cb = unit_rows(cb)
        self.codebook.copy_(cb)

    def decode(self, indices):
        """Codebook vectors for integer indices [...] -> [..., D] (unit vectors for cosine)."""
        cb = self.codebook
        if self.metric == "cosine" and not self.ema:
            cb = unit_rows(cb)
        return cb[indices]

    def usage(self, counts=None):
        """Usage statistics of a histogram (default: the last training batch): perplexity
        exp(H(p)) of the code distribution and the fraction of codes used at least once."""
        counts = self.last_counts if counts is None else counts
        total = counts.sum()
        p = counts.double() / total.clamp_min(1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum()
        return {"perplexity": math.exp(entropy.item()), "used_fraction": (counts > 0).double().mean().item(),
                "dead_codes": int((self.cluster_size < self.dead_code_threshold).sum()) if self.dead_code_threshold else 0}

    @torch.no_grad()
    def sync_statistics_(self, group=None):
        """Makes the EMA statistics (and re-seeded codes) identical on every rank. genfast does no
        collective communication on its own: under DDP, EVERY rank must call this after each
        training forward (before the next one), e.g. `out = model(x); vq.sync_statistics_()`.

        cluster_size and embed_avg are averaged over the ranks (the EMA is linear, so that equals
        an EMA of the averaged batch statistics); codes re-seeded since the last call take rank
        0's seeds; then the codebook is recomputed (ema) or the seeds are copied into it. No-op
        when torch.distributed is not initialised."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            self._reseeded.zero_()
            return
        world = dist.get_world_size(group)
        src = dist.get_global_rank(group, 0) if group is not None else 0
        reseeded = self._reseeded.to(torch.uint8)
        dist.all_reduce(reseeded, op=dist.ReduceOp.MAX, group=group)
        reseeded = reseeded.bool()
        seeded_state = [self.cluster_size.clone(), (self.embed_avg if self.ema else self.codebook.data).clone()]
        for t in seeded_state:
            dist.broadcast(t, src=src, group=group)
        for t in (self.cluster_size,) + ((self.embed_avg,) if self.ema else ()):
            dist.all_reduce(t, group=group)
            t.div_(world)
        self.cluster_size[reseeded] = seeded_state[0][reseeded]
        if self.ema:
            self.embed_avg[reseeded] = seeded_state[1][reseeded]
            self._codebook_from_ema()
        else:
            self.codebook.data[reseeded] = seeded_state[1][reseeded]
        self._reseeded.zero_()
