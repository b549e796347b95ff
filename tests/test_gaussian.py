"""genfast.nn.GaussianPosterior / DiagonalGaussian against diffusers' DiagonalGaussianDistribution
semantics (its formulas restated here: diffusers is not a test dependency)."""
import math

import pytest
import torch

import genfast
from genfast.nn import DiagonalGaussian, GaussianPosterior


class DiffusersDiagonalGaussian:
    """diffusers.models.autoencoders.vae.DiagonalGaussianDistribution, restated (fp32 math)."""

    def __init__(self, parameters, deterministic=False):
        self.mean, self.logvar = torch.chunk(parameters.float(), 2, dim=1)
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, eps):
        return self.mean + self.std * eps

    def kl(self, other=None):
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=[1, 2, 3])

    def nll(self, sample):
        return 0.5 * torch.sum(math.log(2 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=[1, 2, 3])


def _params(dtype=torch.float32, b=2):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, 8, 5, 6, generator=g)
    h[:, 4:] *= 3  # logvar spread, some past the clamp after scaling below
    h[0, 5, 0, 0] = 40.0
    return h.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_diffusers_semantics(dtype):
    h = _params(dtype)
    ours, ref = DiagonalGaussian(h), DiffusersDiagonalGaussian(h)
    eps = torch.randn(ref.mean.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.sample(noise=eps).float(), ref.sample(eps.float()).to(dtype).float(), **tol)
    torch.testing.assert_close(ours.kl(), ref.kl(), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours.mode(), h.chunk(2, dim=1)[0])
    x = torch.randn(ref.mean.shape)
    torch.testing.assert_close(ours.nll(x), ref.nll(x), rtol=1e-5, atol=1e-3)
    other_h = _params(dtype, b=2).flip(0)
    torch.testing.assert_close(ours.kl(DiagonalGaussian(other_h)), ref.kl(DiffusersDiagonalGaussian(other_h)),
                               rtol=1e-4, atol=1e-2)
    z, kl = ours.sample_and_kl(noise=eps)
    torch.testing.assert_close(z, ours.sample(noise=eps))
    torch.testing.assert_close(kl, ours.kl())


def test_deterministic():
    h = _params()
    d = DiagonalGaussian(h, deterministic=True)
    assert torch.equal(d.sample(), d.mode())
    assert torch.equal(d.kl(), torch.zeros(2))
    assert torch.equal(d.std, torch.zeros_like(d.mean))


def test_module_forward_and_backward():
    torch.manual_seed(0)
    head = GaussianPosterior()
    h = _params().requires_grad_(True)
    torch.manual_seed(4)
    z, kl = head(h)
    torch.manual_seed(4)
    mu, lv = h.chunk(2, dim=1)
    z2, kl2 = genfast.reparam_kl(mu, lv)
    torch.testing.assert_close(z, z2)
    torch.testing.assert_close(kl, kl2)
    (z.sum() + kl.sum()).backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    assert h.grad[0, 5, 0, 0] == 0  # logvar 40 is past the clamp: no gradient, as torch.clamp
    m, kl3 = head(h, sample=False)
    assert torch.equal(m, mu)
    torch.testing.assert_close(kl3, kl)
    assert "reduction='per_sample'" in repr(head)


def test_module_reductions_and_free_bits():
    h = _params()
    eps = torch.zeros(2, 4, 5, 6)
    per = GaussianPosterior()(h, noise=eps)[1]
    assert GaussianPosterior(reduction="mean")(h, noise=eps)[1].item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert GaussianPosterior(reduction="sum")(h, noise=eps)[1].item() == pytest.approx(per.sum().item(), rel=1e-6)
    assert GaussianPosterior(reduction="none")(h, noise=eps)[1].shape == eps.shape
    fb = GaussianPosterior(free_bits=1.0)(h, noise=eps)[1]
    assert (fb >= per - 1e-3).all() and fb.mean() >= 1.0 * eps[0].numel() - 1e-3


def test_bad_parameters():
    with pytest.raises(ValueError, match="even size along dim 1"):
        GaussianPosterior()(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="parameters must be a torch.Tensor"):
        DiagonalGaussian([1.0, 2.0])


def test_compile_tiny_vae():
    torch._dynamo.reset()
    enc, dec, head = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(2, 1, 3, padding=1), GaussianPosterior(reduction="mean")

    def loss(x, eps):
        z, kl = head(enc(x), noise=eps)
        return torch.nn.functional.mse_loss(dec(z), x) + 1e-3 * kl

    x, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 2, 8, 8)
    params = list(enc.parameters()) + list(dec.parameters())
    eager = torch.autograd.grad(loss(x, eps), params)
    comp = torch.autograd.grad(torch.compile(loss, fullgraph=True)(x, eps), params)
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b)
