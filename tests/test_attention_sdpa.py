"""The "sdpa" way of genfast.attention: torch's scaled_dot_product_attention for unmasked calls where
it is preferred (fp16/bf16 on GPUs) or forced (GENFAST_BACKEND=sdpa), genfast's kernels for the rest
(key masks, no keys, fp32), and the same answers as the reference either way (DESIGN.md §5)."""
import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast import backends, reference
from genfast.ops import attention as attn_ops
from genfast.testing import FLOAT_DTYPES, assert_within_reference_error, attention_samples

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts calls of torch's scaled_dot_product_attention made through genfast.attention."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


@pytest.fixture
def sdpa_first_on_cpu(monkeypatch):
    """The GPU preference (sdpa, then genfast's kernels) on CPU tensors, so CI runs the routing."""
    monkeypatch.delenv("GENFAST_BACKEND", raising=False)
    monkeypatch.setitem(backends.PREFERENCE, "attention", {**backends.PREFERENCE["attention"],
                                                           "cpu": ("sdpa", "cpu", "reference")})
    monkeypatch.setattr(attn_ops, "_sdpa_reasons", lambda device_type, dtype: [])
    monkeypatch.setattr(backends, "_CHOICES", {})  # the choice cache predates the patch


def _check_fwd_bwd(case, device):
    kw = case.kwargs
    g = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1)).to(device)
    got = genfast.attention(*case.leaves(), **kw)
    assert got.dtype == case.q.dtype and got.shape == case.q.shape, case.name
    assert_within_reference_error(case.name, got, reference.attention(*case.args(), upcast=False, **kw),
                                  reference.attention(*case.args(), **kw), floor=1e-5)
    grads = lambda fn, leaves: torch.autograd.grad(fn(*leaves, **kw), leaves, g.to(leaves[0].dtype))  # noqa: E731
    got = grads(genfast.attention, case.leaves())
    low = grads(lambda *a, **k: reference.attention(*a, upcast=False, **k), case.leaves())
    high = grads(reference.attention, case.leaves(torch.float64))
    for name, a, lo, hi in zip("qkv", got, low, high):
        assert torch.isfinite(a).all(), f"{case.name}: d{name} not finite"
        assert_within_reference_error(f"{case.name}: d{name}", a, lo, hi, floor=1e-5)


def test_preference_rule():
    """SDPA first for unmasked fp16/bf16 on GPUs only; genfast's kernels for the op itself, fp32, CPU."""
    for dtype in (torch.float16, torch.bfloat16):
        for d in (32, 64, 72, 128):
            assert attn_ops.backend_name("cuda", dtype, d) == "sdpa"
            assert attn_ops.backend_name("cuda", dtype, d, kernels=True) != "sdpa"
    assert attn_ops.backend_name("cuda", torch.float32, 64) != "sdpa"
    assert attn_ops.backend_name("cpu", torch.bfloat16, 64) == "cpu"
    assert dict(backends.explain("attention", "cuda", attn_ops._reasons("cuda", torch.float32)))["sdpa"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forced_sdpa_matches_reference(device, dtype, use_backend, sdpa_calls):
    use_backend("sdpa")
    for case in attention_samples(device, dtype, long=device == "cuda"):
        if "key_padding_mask" in case.kwargs or case.k.shape[2] == 0:
            continue
        n = len(sdpa_calls)
        _check_fwd_bwd(case, device)
        # an empty batch is the plain matmul path (torch 2.11's CUDA SDPA returned None for it)
        assert (len(sdpa_calls) > n) == (case.q.numel() > 0), case.name


def test_forced_sdpa_refuses_masks_and_keyless_calls(use_backend):
    use_backend("sdpa")
    q = torch.randn(2, 2, 5, 32)
    with pytest.raises(ValueError, match="key_padding_mask"):
        genfast.attention(q, q, q, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one key"):
        genfast.attention(q, q[:, :, :0], q[:, :, :0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sdpa_first_routes_unmasked_calls_and_keeps_masks_on_the_kernels(dtype, sdpa_first_on_cpu, sdpa_calls):
    """Unmasked calls go to SDPA; masked ones (incl. a fully padded sample: zeros) and keyless ones
    run genfast's kernels without touching SDPA, right either way."""
    for case in attention_samples("cpu", dtype):
        masked = "key_padding_mask" in case.kwargs or case.k.shape[2] == 0
        n = len(sdpa_calls)
        _check_fwd_bwd(case, "cpu")
        assert (len(sdpa_calls) == n) == (masked or case.q.numel() == 0), case.name


def test_sdpa_way_compiles_without_graph_breaks(sdpa_first_on_cpu):
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 3, 17, 32, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return genfast.attention(q, k, v, causal=True).square().sum()
    eager = torch.autograd.grad(f(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_default_dispatch_takes_sdpa_and_matches_reference(dtype, sdpa_calls, monkeypatch):
    monkeypatch.delenv("GENFAST_BACKEND", raising=False)
    for case in attention_samples("cuda", dtype, long=True):
        masked = "key_padding_mask" in case.kwargs or case.k.shape[2] == 0
        n = len(sdpa_calls)
        _check_fwd_bwd(case, "cuda")
        assert (len(sdpa_calls) == n) == (masked or case.q.numel() == 0), case.name
