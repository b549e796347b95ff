"""genfast.nn.DiTBlock / DiTAttention against a plain-PyTorch DiT block with the same weights."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast.nn
from genfast import reference
from genfast.testing import assert_within_reference_error

from dit_tiny import block_pair  # noqa: E402 (tests/ on sys.path: conftest.py)


EagerDiTBlock = reference.DiTBlock


_pair = block_pair  # (reference block, genfast block) with the same random weights


def test_state_dict_names_and_shapes_match():
    ref, ours = _pair()
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_block_matches_eager_forward_and_grads(backend, use_backend):
    use_backend(backend)
    ref, ours = _pair()
    x, c = torch.randn(2, 37, 64), torch.randn(2, 64)
    xr, cr = x.clone().requires_grad_(), c.clone().requires_grad_()
    xo, co = x.clone().requires_grad_(), c.clone().requires_grad_()
    want, got = ref(xr, cr), ours(xo, co)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(want)
    want.backward(g)
    got.backward(g)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(co.grad, cr.grad, rtol=1e-4, atol=1e-4)
    for (name, pr), (_, po) in zip(ref.named_parameters(), ours.named_parameters()):
        # fp32 sums of hundreds of terms with |grad| up to ~500: an absolute floor scaled to the grad
        torch.testing.assert_close(po.grad, pr.grad, rtol=1e-4, atol=1e-5 * pr.grad.abs().max().item(), msg=name)


def test_block_bf16_within_reference_error(use_backend):
    use_backend("cpu")
    ref, ours = _pair()
    ref64 = EagerDiTBlock(64, 4).double()
    ref64.load_state_dict(ref.state_dict())
    x, c = torch.randn(2, 37, 64), torch.randn(2, 64)
    ref16, ours16 = ref.bfloat16(), ours.bfloat16()
    assert_within_reference_error("dit bf16", ours16(x.bfloat16(), c.bfloat16()), ref16(x.bfloat16(), c.bfloat16()),
                                  ref64(x.bfloat16().double(), c.bfloat16().double()), floor=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("hidden,heads", [(64, 4), (144, 2)], ids=["d16", "d72"])
def test_gpu_block_bf16_default_dispatch_within_reference_error(hidden, heads, monkeypatch):
    """The block as users run it on a GPU (no forced backend: SDPA attention, CUDA modulate and
    gated residual, padded qkv where Triton serves), forward and input/conditioning gradients."""
    monkeypatch.delenv("GENFAST_BACKEND", raising=False)
    # std 0.05: at 0.2 and hidden 144 the bf16 block is chaotic (activations ~3000) and any other
    # rounding order, the fp32 reference kernels' included, lands 2.5x eager's error in dx.
    ref, ours = _pair(hidden, heads, std=0.05)
    ref64 = EagerDiTBlock(hidden, heads).double()
    ref64.load_state_dict(ref.state_dict())
    ref16, ours16 = ref.bfloat16().cuda(), ours.bfloat16().cuda()
    ref64 = ref64.cuda()
    x, c = torch.randn(3, 37, hidden, device="cuda").bfloat16(), torch.randn(3, hidden, device="cuda").bfloat16()
    g = torch.randn(3, 37, hidden, device="cuda").bfloat16()

    def run(block, dtype):
        xi, ci = x.to(dtype).requires_grad_(), c.to(dtype).requires_grad_()
        out = block(xi, ci)
        return (out, *torch.autograd.grad(out, (xi, ci), g.to(dtype)))
    for name, a, lo, hi in zip(("out", "dx", "dc"), run(ours16, torch.bfloat16), run(ref16, torch.bfloat16),
                               run(ref64, torch.float64)):
        assert_within_reference_error(f"dit gpu bf16 {name}", a, lo, hi, floor=1e-3)


def test_compile_fullgraph_equals_eager(use_backend):
    use_backend("cpu")
    torch._dynamo.reset()
    _, ours = _pair()
    x, c = torch.randn(2, 19, 64, requires_grad=True), torch.randn(2, 64)
    eager = ours(x, c)
    (gx,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(ours, fullgraph=True)(x, c)
    (gxc,) = torch.autograd.grad(compiled.square().sum(), x)
    # Inductor fuses the eager LayerNorm/GELU/adds differently: fp32 rounding, not a different answer
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gxc, gx, rtol=1e-4, atol=1e-4 * gx.abs().max().item())


def test_attention_module_reads_qkv_views_and_masks(use_backend):
    use_backend("cpu")
    torch.manual_seed(0)
    attn = genfast.nn.DiTAttention(64, 4)
    x = torch.randn(2, 11, 64)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    b, n, c = x.shape
    q, k, v = attn.qkv(x).reshape(b, n, 3, 4, 16).permute(2, 0, 3, 1, 4)
    want = attn.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]).transpose(1, 2).reshape(b, n, c))
    torch.testing.assert_close(attn(x, key_padding_mask=mask), want, rtol=1e-5, atol=1e-5)


def test_qkv_head_width_rule(monkeypatch):
    """Rows padded only where the GPU Triton kernels would copy them: CUDA, fp16/bf16, Triton chosen
    for unmasked attention, a split head dim that is not a multiple of 16 (genfast.ops.qkv)."""
    from genfast.ops.qkv import qkv_head_width

    cuda = torch.device("cuda")  # only the device type is read: no GPU needed
    # By default torch's SDPA serves unmasked fp16/bf16 attention on GPUs: it reads the rows in place.
    assert qkv_head_width(72, torch.bfloat16, cuda) == 72 and qkv_head_width(72, torch.float16, cuda) == 72
    monkeypatch.setattr(genfast.ops.attention, "backend_name", lambda *a, **k: "triton")  # Triton chosen
    assert qkv_head_width(72, torch.bfloat16, cuda) == 80 and qkv_head_width(72, torch.float16, cuda) == 80
    assert qkv_head_width(88, torch.bfloat16, cuda) == 96
    for d, dtype, dev in [(72, torch.float32, cuda), (72, torch.bfloat16, "cpu"), (64, torch.bfloat16, cuda),
                          (80, torch.bfloat16, cuda), (96, torch.bfloat16, cuda), (40, torch.bfloat16, cuda),
                          (128, torch.bfloat16, cuda)]:
        assert qkv_head_width(d, dtype, dev) == d, (d, dtype, dev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_qkv_projection_gives_the_same_block(dtype, monkeypatch, use_backend):
    """The padded projection (taken on GPUs at head dim 72) forced on the CPU: q/k/v views with
    16-element-aligned rows, and the block's output and every gradient as with the plain views."""
    import genfast.ops.qkv as qkv

    use_backend("cpu")
    torch.manual_seed(0)
    block = genfast.nn.DiTBlock(144, 2).to(dtype)  # head dim 72
    for p in block.parameters():
        nn.init.normal_(p, std=0.1)
    x, c = torch.randn(2, 9, 144, dtype=dtype), torch.randn(2, 144, dtype=dtype)
    g = torch.randn(2, 9, 144, dtype=dtype)

    def run():
        xi = x.clone().requires_grad_()
        out = block(xi, c)
        return [out, *torch.autograd.grad(out, [xi, *block.parameters()], g)]

    plain = run()
    monkeypatch.setattr(qkv, "qkv_head_width", lambda d, dt, dev: -(-d // 16) * 16)
    views = qkv.qkv_projection(x, block.attn.qkv, 2)
    assert views.shape == (3, 2, 2, 9, 72) and all(s % 16 == 0 for s in views.stride()[:4])
    padded = run()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(["out", "x", *dict(block.named_parameters())], padded, plain):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)
