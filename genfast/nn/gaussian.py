"""The VAE posterior head: encoder output -> (mu, logvar) -> reparameterized z and KL to N(0, 1),
in one fused pass each way (genfast.reparam_kl).

    head = GaussianPosterior()                   # in the VAE
    z, kl = head(encoder(x))                     # training: z ~ q(z|x), kl per sample [B]
    loss = recon(decoder(z), x) + beta * kl.mean()

    post = head.distribution(encoder(x))         # diffusers-style object
    post.sample(), post.mode(), post.kl(), post.nll(x)

`DiagonalGaussian` follows diffusers' `DiagonalGaussianDistribution` (diffusers/models/
autoencoders/vae.py): parameters chunked in two along dim 1, logvar clamped to (-30, 20),
std = exp(logvar / 2), var = exp(logvar); sample() = mean + std * eps; kl() = 0.5 * sum(mean^2 +
var - 1 - logvar); mode() = mean; nll(sample). Differences, all deliberate:
  - eps comes from genfast's counter-based Philox stream, not torch.randn: same distribution,
    different numbers for the same generator state (each call draws a fresh (seed, offset) from
    the generator, so torch.manual_seed still reproduces it). `noise=` takes an explicit eps.
  - kl() sums over every non-batch dim (diffusers: dims [1, 2, 3], i.e. 4-D latents only; the
    same for 4-D) and returns fp32 (fp64 for fp64 inputs) whatever the parameters' dtype; the
    math is fp32 for fp16/bf16 parameters (diffusers computes in the parameters' dtype).
  - deterministic=True: kl() returns zeros of shape [B] on the parameters' device (diffusers
    returns torch.Tensor([0.0]) on the CPU), nll() likewise; sample() returns the mean.
  - sample() and kl() are each one fused pass; sample_and_kl() gives both from one pass (the
    training path; what GaussianPosterior.forward calls). Their gradient goes to `parameters`
    directly, in one buffer the backward kernel writes (genfast.reparam_kl_moments), not through
    the `mean` / `raw_logvar` views: hooks on those views do not see it.
  - kl(other) (KL between two diagonal Gaussians) and nll() are plain PyTorch, as in diffusers.
"""
import math

import torch
from torch import nn

from genfast.ops.kl import reparam_kl_moments

DEFAULT_CLAMP = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution


class DiagonalGaussian:
    """A diagonal Gaussian posterior given the encoder output `parameters` (mean and logvar
    concatenated along `dim`). Holds views of `parameters`; nothing is computed until asked."""

    def __init__(self, parameters, deterministic=False, *, dim=1, logvar_clamp=DEFAULT_CLAMP):
        if not isinstance(parameters, torch.Tensor):
            raise TypeError(f"parameters must be a torch.Tensor, got {type(parameters).__name__}")
        if parameters.dim() < 2 or parameters.shape[dim] % 2:
            raise ValueError(f"parameters must have an even size along dim {dim} (mean and logvar), "
                             f"got shape {tuple(parameters.shape)}")
        self.parameters, self.dim = parameters, dim
        self.mean, self.raw_logvar = torch.chunk(parameters, 2, dim=dim)
        self.deterministic = deterministic
        self.logvar_clamp = tuple(logvar_clamp) if logvar_clamp is not None else None

    @property
    def logvar(self):
        return self.raw_logvar.clamp(*self.logvar_clamp) if self.logvar_clamp else self.raw_logvar

    @property
    def std(self):
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self):
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def _fused(self, *, generator=None, seed=None, noise=None, reduction="per_sample", free_bits=0.0):
        # through the parameters, not self.mean / self.raw_logvar: the backward writes both halves of
        # their gradient into one buffer (reparam_kl_moments)
        return reparam_kl_moments(self.parameters, dim=self.dim, generator=generator, seed=seed, noise=noise,
                                  reduction=reduction, free_bits=free_bits, logvar_clamp=self.logvar_clamp)

    def sample_and_kl(self, generator=None, *, seed=None, noise=None, reduction="per_sample", free_bits=0.0):
        """(z, kl) from one fused pass; see genfast.reparam_kl for reduction and free_bits."""
        if self.deterministic:
            return self.mean, self._zero_kl(reduction)
        return self._fused(generator=generator, seed=seed, noise=noise, reduction=reduction, free_bits=free_bits)

    def sample(self, generator=None, *, seed=None, noise=None):
        if self.deterministic:
            return self.mean
        return self._fused(generator=generator, seed=seed, noise=noise)[0]

    def kl(self, other=None):
        """KL(self || N(0, 1)) per sample [B] (fused), or KL(self || other) in plain PyTorch."""
        if self.deterministic:
            return self._zero_kl("per_sample")
        if other is None:
            zeros = torch.zeros_like(self.mean)  # noise is irrelevant to the KL; no RNG draw
            return self._fused(noise=zeros)[1]
        dims = list(range(1, self.mean.dim()))
        m, o = self.mean.float(), other.mean.float()
        lv, olv = self.logvar.float(), other.logvar.float()
        return 0.5 * torch.sum((m - o).pow(2) / olv.exp() + lv.exp() / olv.exp() - 1.0 - lv + olv, dim=dims)

    def nll(self, sample, dims=None):
        """-log N(sample; mean, var) summed over `dims` (default: every non-batch dim)."""
        if self.deterministic:
            return self._zero_kl("per_sample")
        dims = dims if dims is not None else list(range(1, self.mean.dim()))
        lv = self.logvar.float()
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + lv + (sample.float() - self.mean.float()).pow(2) / lv.exp(),
                               dim=dims)

    def mode(self):
        return self.mean

    def _zero_kl(self, reduction):
        ct = torch.float64 if self.mean.dtype == torch.float64 else torch.float32
        b = self.mean.shape[0]
        if reduction == "none":
            return torch.zeros(self.mean.shape, dtype=ct, device=self.mean.device)
        z = torch.zeros(b, dtype=ct, device=self.mean.device)
        return z if reduction == "per_sample" else z.sum()


class GaussianPosterior(nn.Module):
    """Drop-in VAE head: splits the encoder output into (mu, logvar) along `dim` and returns the
    reparameterized z and the KL to N(0, 1) from one fused pass (genfast.reparam_kl).

    Args:
        dim: the channel dim holding [mu; logvar] (diffusers: 1).
        reduction, free_bits, logvar_clamp: as genfast.reparam_kl (defaults: per-sample KL [B],
            no free bits, diffusers' (-30, 20) clamp).
    forward(h, *, sample=True, generator=None, seed=None, noise=None) -> (z, kl):
        sample=False returns the mode (mu, as diffusers' `sample_posterior=False`) with the KL.
    """

    def __init__(self, *, dim=1, reduction="per_sample", free_bits=0.0, logvar_clamp=DEFAULT_CLAMP):
        super().__init__()
        self.dim, self.reduction, self.free_bits = dim, reduction, free_bits
        self.logvar_clamp = tuple(logvar_clamp) if logvar_clamp is not None else None

    def distribution(self, h, deterministic=False):
        return DiagonalGaussian(h, deterministic, dim=self.dim, logvar_clamp=self.logvar_clamp)

    def forward(self, h, *, sample=True, generator=None, seed=None, noise=None):
        post = self.distribution(h)
        if not sample:
            zeros = torch.zeros_like(post.mean)  # the KL only: no RNG draw
            kl = post.sample_and_kl(noise=zeros, reduction=self.reduction, free_bits=self.free_bits)[1]
            return post.mean, kl
        return post.sample_and_kl(generator, seed=seed, noise=noise, reduction=self.reduction,
                                  free_bits=self.free_bits)

    def extra_repr(self):
        return f"dim={self.dim}, reduction={self.reduction!r}, free_bits={self.free_bits}, logvar_clamp={self.logvar_clamp}"
