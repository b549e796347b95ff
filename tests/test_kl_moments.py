"""genfast.reparam_kl_moments: reparam_kl on the two halves of one encoder output, with the gradient of
that output written by the backward kernel into one buffer (no split backward concatenating dmu and
dlogvar). It must give reparam_kl's bits on the chunks, forward and backward, on every backend."""
import pytest
import torch

import genfast
from genfast.nn.gaussian import GaussianPosterior
from genfast.testing import FLOAT_DTYPES, backends_to_test

ALL_BACKENDS = backends_to_test()
IDS = [f"{d}-{b}" for d, b in ALL_BACKENDS]
SEED = (2024, 3)


def _moments(kind, device, dtype, gen):
    """(h, dim): h holds mu and logvar along dim; kinds the fast path takes (contiguous, halves that
    are row-strided) and kinds it leaves to reparam_kl on the chunks."""
    if kind == "channels":  # a VAE encoder's [B, 2C, H, W]: the fast path
        return torch.randn(3, 6, 5, 3, generator=gen).to(device, dtype), 1
    if kind == "batch":  # halves along dim 0: contiguous halves, the fast path too
        return torch.randn(4, 7, generator=gen).to(device, dtype), 0
    if kind == "last":  # halves along the last dim: rows that do not merge, the chunks' path
        return torch.randn(2, 3, 10, generator=gen).to(device, dtype), -1
    if kind == "transposed":  # not contiguous: the chunks' path
        return torch.randn(6, 3, 4, generator=gen).to(device, dtype).transpose(0, 1), 1
    raise AssertionError(kind)


def _run(fn, h, dim, gen, **kw):
    """(z, kl, dh) of fn through a non-leaf h = w * 1 (an encoder output), with random output grads."""
    w = h.detach().clone().requires_grad_(True)
    hh = w * 1
    z, kl = fn(hh, dim, **kw)
    dz = torch.randn(z.shape, generator=gen).to(z)
    dkl = torch.randn(kl.shape, generator=gen).to(kl)
    (dh,) = torch.autograd.grad((z, kl), (w,), (dz, dkl))
    return z, kl, dh, hh, z.grad_fn


def _chunks(h, dim, **kw):
    return genfast.reparam_kl(*h.chunk(2, dim), **kw)


def _moments_op(h, dim, **kw):
    return genfast.reparam_kl_moments(h, dim=dim, **kw)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_same_bits_as_reparam_kl_on_the_chunks(device, backend, dtype, use_backend):
    use_backend(backend)
    for kind in ("channels", "batch", "last", "transposed"):
        for kw in ({"seed": SEED}, {"seed": SEED, "reduction": "none"}, {"seed": SEED, "free_bits": 0.5},
                   {"seed": SEED, "reduction": "mean", "logvar_clamp": (-0.5, 0.5)}):
            h, dim = _moments(kind, device, dtype, torch.Generator().manual_seed(1))
            want = _run(_chunks, h, dim, torch.Generator().manual_seed(2), **kw)
            got = _run(_moments_op, h, dim, torch.Generator().manual_seed(2), **kw)
            for name, a, b in zip(("z", "kl", "dh"), got[:3], want[:3]):
                assert a.dtype == b.dtype and a.shape == b.shape, (kind, kw, name)
                assert torch.equal(a, b), (kind, kw, name, (a.float() - b.float()).abs().max())
            fast = kind in ("channels", "batch")  # contiguous, row-strided halves
            node = type(got[4]).__name__
            assert ("ReparamKLMoments" in node) == fast, (kind, node)


def test_explicit_noise_and_empty_batch():
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(2, 8, 3, generator=gen)
    noise = torch.randn(2, 4, 3, generator=gen)
    want = _run(_chunks, h, 1, torch.Generator().manual_seed(5), noise=noise)
    got = _run(_moments_op, h, 1, torch.Generator().manual_seed(5), noise=noise)
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    z, kl, dh, _, _ = _run(_moments_op, torch.randn(0, 4, 3), 1, gen)
    assert z.shape == (0, 2, 3) and kl.shape == (0,) and dh.shape == (0, 4, 3)


def test_backward_writes_one_buffer_without_a_concatenation():
    """The point of the op: no split backward (aten::cat / stack) and one gradient buffer."""
    h = torch.randn(4, 8, 6, 6)
    for fn, cats in ((_moments_op, 0), (_chunks, 1)):
        w = h.clone().requires_grad_(True)
        z, kl = fn(w * 1, 1, seed=SEED)
        loss = z.sum() + kl.sum()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.backward()
        names = [e.name for e in prof.events()]
        assert sum(n in ("aten::cat", "aten::stack") for n in names) == cats, names


def test_gaussian_posterior_gradient_matches_the_chunks():
    """GaussianPosterior (and DiagonalGaussian) go through reparam_kl_moments: same z, KL and gradient."""
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(2, 6, 4, 4, generator=gen)
    noise = torch.randn(2, 3, 4, 4, generator=gen)
    w1, w2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    z1, kl1 = GaussianPosterior()(w1 * 1, noise=noise)
    z2, kl2 = genfast.reparam_kl(*(w2 * 1).chunk(2, 1), noise=noise)
    assert "ReparamKLMoments" in type(z1.grad_fn).__name__
    (z1.square().sum() + kl1.sum()).backward()
    (z2.square().sum() + kl2.sum()).backward()
    assert torch.equal(z1, z2) and torch.equal(kl1, kl2) and torch.equal(w1.grad, w2.grad)


def test_compiled_equals_eager():
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(2, 6, 3, generator=gen)
    noise = torch.randn(2, 3, 3, generator=gen)

    def f(w):
        z, kl = genfast.reparam_kl_moments(w * 2, noise=noise)
        return z.sum() + kl.sum()

    compiled = torch.compile(f, fullgraph=True)
    grads = []
    for fn in (f, compiled):
        w = h.clone().requires_grad_(True)
        out = fn(w)
        out.backward()
        grads.append((out.detach(), w.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("args,kwargs,error,match", [
    (([1.0, 2.0],), {}, TypeError, "moments must be a torch.Tensor"),
    ((torch.randn(2, 5),), {}, ValueError, "moments must have an even size along dim 1"),
    ((torch.randn(2, 4),), {"dim": 2}, ValueError, "dim must index a dim of moments"),
    ((torch.randn(2, 4),), {"dim": 1.0}, TypeError, "dim must be an int"),
    ((torch.randn(2, 4),), {"dim": True}, TypeError, "dim must be an int"),
    ((torch.randn(2, 4),), {"noise": torch.randn(2, 4)}, ValueError, "noise"),
    ((torch.ones(2, 4, dtype=torch.int64),), {}, TypeError, "mu"),
])
def test_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        genfast.reparam_kl_moments(*args, **kwargs)


def test_gradcheck_float64():
    """fp64 (the reference backend) through the one-buffer backward, against finite differences."""
    gen = torch.Generator().manual_seed(8)
    h = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    noise = torch.randn(2, 3, 3, dtype=torch.float64, generator=gen)
    for kw in ({}, {"reduction": "none"}, {"logvar_clamp": (-0.5, 0.5)}):
        fn = lambda t: genfast.reparam_kl_moments(t * 1, noise=noise, **kw)  # noqa: E731 - non-leaf moments
        assert "ReparamKLMoments" in type(fn(h)[0].grad_fn).__name__
        assert torch.autograd.gradcheck(fn, (h,))
