"""The zoo DiT's fast paths give the plain model's numbers: GELU(tanh) on genfast's op, the patch
embedding as one Linear, and the sampling conditioning precomputed for every step (with the CFG
image tokens embedded once). Small shapes: a few seconds on 2 CPU cores (the compile test ~30 s)."""
import pytest
import torch
import torch.nn.functional as F

from genfast.testing import assert_within_reference_error
from genfast.zoo import _ops, dit, dit_variants
from genfast.zoo import rectified_flow as rf
from zoo_tiny import tiny_dit


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "empty"])
def test_gelu_tanh_forward_backward_within_reference_error(layout):
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(37, 70, generator=g, dtype=torch.float64) * 4  # both tails of the tanh
    if layout == "transposed":
        x64 = x64.t()
    elif layout == "empty":
        x64 = x64[:0]
    grad = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    x = x64.float().requires_grad_(True)
    ref_x = x64.float().requires_grad_(True)
    hi_x = x64.clone().requires_grad_(True)
    out, ref, hi = _ops.gelu_tanh(x), F.gelu(ref_x, approximate="tanh"), F.gelu(hi_x, approximate="tanh")
    assert_within_reference_error("gelu_tanh", out, ref, hi)
    for a, b in ((out, x), (ref, ref_x), (hi, hi_x)):
        a.backward(grad.to(a.dtype))
    assert_within_reference_error("gelu_tanh grad", x.grad, ref_x.grad, hi_x.grad)
    with torch.no_grad():  # the in-place inference path
        assert_within_reference_error("gelu_tanh no_grad", _ops.gelu_tanh(x.detach().clone()), ref.detach(), hi.detach())


def test_gelu_tanh_low_precision_and_seam_off(monkeypatch):
    x64 = torch.randn(5, 9, dtype=torch.float64) * 3
    x = x64.bfloat16()
    assert_within_reference_error("gelu_tanh bf16", _ops.gelu_tanh(x.clone()), F.gelu(x, approximate="tanh"),
                                  F.gelu(x.double(), approximate="tanh"))
    calls = []
    monkeypatch.setattr(_ops._gelu, "gelu_tanh_inference", lambda t: calls.append(t) or F.gelu(t, approximate="tanh"))
    _ops.gelu_tanh(torch.randn(3))
    assert len(calls) == 1  # through the seam: genfast's op
    with _ops.use_genfast(False):
        y = torch.randn(5, 9)
        assert torch.equal(_ops.gelu_tanh(y), F.gelu(y, approximate="tanh"))
    assert len(calls) == 1


def test_patch_embed_as_linear_equals_the_convolution():
    torch.manual_seed(0)
    pe = dit.PatchEmbed(4, 24, 2)
    x = torch.randn(3, 4, 6, 10).transpose(2, 3).detach().requires_grad_(True)  # non-contiguous [3, 4, 10, 6]
    out = pe(x)
    ref = pe.proj(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    gw, gx = torch.autograd.grad(out, [pe.proj.weight, x], g)
    rw, rx = torch.autograd.grad(ref, [pe.proj.weight, x], g)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-5)


def test_sampling_conditioning_gives_the_forward_of_the_doubled_batch():
    m = tiny_dit().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([1.0, 0.6, 0.25])
    y2 = torch.tensor([4, 0, 4, 10, 10, 10])  # repeated labels, the null class
    with torch.no_grad():
        cond = m.sampling_conditioning(t, y2)
        assert len(cond) == 3 and cond.mod.shape[1] == 3  # one row per distinct label
        for s in range(3):
            got = m(x, None, None, cond=cond[s])
            ref = m(torch.cat([x, x]), t[s].expand(6), y2)
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
        # same batch size: no doubling
        xx = torch.cat([x, x])
        torch.testing.assert_close(m(xx, None, None, cond=cond[1]), m(xx, t[1].expand(6), y2), atol=1e-6, rtol=1e-5)


def test_variants_decline_the_precomputed_conditioning():
    torch.manual_seed(0)
    m = dit_variants.ConditionedDiT(mode="cross", input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2)
    assert m.sampling_conditioning(torch.rand(2), torch.arange(2)) is None
    labels = torch.arange(2)
    kw = dict(steps=2, guidance=1.0, labels=labels, null_label=10)
    a = rf.sample(m.eval(), (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), **kw)
    with _ops.use_genfast(False), torch.no_grad():
        b = rf.sample(m, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0), eager=True, **kw)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cfg_sampler_per_sample_guidance_and_errors():
    m = tiny_dit().eval()
    labels = torch.tensor([1, 2, 3])
    w = torch.tensor([0.0, 1.0, 3.0])
    a = rf.sample(m, (3, 1, 8, 8), steps=3, guidance=w, labels=labels, null_label=10,
                  generator=torch.Generator().manual_seed(2))
    with _ops.use_genfast(False), torch.no_grad():
        b = rf.sample(m, (3, 1, 8, 8), steps=3, guidance=w, labels=labels, null_label=10,
                      generator=torch.Generator().manual_seed(2), eager=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not a.is_inference() and not a.requires_grad  # usable outside the sampler
    c = rf.sample(m, (3, 1, 8, 8), steps=3, labels=labels, generator=torch.Generator().manual_seed(2))  # no CFG
    with _ops.use_genfast(False), torch.no_grad():
        d = rf.sample(m, (3, 1, 8, 8), steps=3, labels=labels, generator=torch.Generator().manual_seed(2), eager=True)
    torch.testing.assert_close(c, d, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="null_label"):
        rf.sample(m, (3, 1, 8, 8), steps=3, guidance=1.0, labels=labels)


def test_zoo_dit_compiles_fullgraph_and_matches_eager():
    m = tiny_dit(depth=1)
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([3, 10])
    xc = x.clone().requires_grad_(True)
    x.requires_grad_(True)
    ref = m(x, t, y)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    out = torch.compile(m, fullgraph=True, dynamic=False)(xc, t, y)
    (gout,) = torch.autograd.grad(out.square().sum(), xc)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gout, gref, atol=1e-5, rtol=1e-4)
