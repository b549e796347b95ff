"""genfast.attention on every backend against the plain-PyTorch reference (DESIGN.md §5 tolerance)."""
import pytest
import torch

import genfast
from genfast import reference
from genfast.testing import FLOAT_DTYPES, assert_within_reference_error, attention_samples, backends_to_test

# The CUDA attention (fp16/bf16 only) and its emulation have their own suite
# (tests/test_attention_cuda.py, slow under emulation); one case runs through the op below.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: the GPU, else the interpreter
BACKENDS = [(d, b) for d, b in backends_to_test() if b not in ("cuda", "cuda_emu")]
IDS = [f"{d}-{b}" for d, b in BACKENDS]


def _samples(device, backend, dtype):
    # Long cases on the compiled CPU path and GPUs only: the interpreter is slow, and the
    # reference backend is the oracle itself.
    return attention_samples(device, dtype, long=backend == "cpu" or device == "cuda")


def _ref(case, dtype=None, upcast=True):
    args = [t.to(dtype) if dtype else t for t in case.args()]
    return reference.attention(*args, upcast=upcast, **case.kwargs)


def _grads(fn, leaves, g):
    out = fn(*leaves)
    return torch.autograd.grad(out, leaves, g.to(out.dtype))


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_reference(device, backend, dtype, use_backend):
    use_backend(backend)
    for case in _samples(device, backend, dtype):
        got = genfast.attention(*case.args(), **case.kwargs)
        assert got.dtype == dtype and got.shape == case.q.shape, case.name
        assert_within_reference_error(case.name, got, _ref(case, upcast=False), _ref(case, torch.float64),
                                      floor=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_matches_reference(device, backend, dtype, use_backend):
    use_backend(backend)
    for case in _samples(device, backend, dtype):
        g = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1)).to(device)
        kw = case.kwargs
        got = _grads(lambda *a: genfast.attention(*a, **kw), case.leaves(), g)
        low = _grads(lambda *a: reference.attention(*a, upcast=False, **kw), case.leaves(), g)
        high = _grads(lambda *a: reference.attention(*a, **kw), case.leaves(torch.float64), g)
        for name, a, lo, hi in zip("qkv", got, low, high):
            assert torch.isfinite(a).all(), f"{case.name}: d{name} not finite"
            assert_within_reference_error(f"{case.name}: d{name}", a, lo, hi, floor=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_fully_masked_rows_are_zero_with_finite_grads(device, backend, use_backend):
    use_backend(backend)
    q, k, v = (torch.randn(2, 2, 9, 32, device=device, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool, device=device)
    mask[0] = False
    mask[1, :3] = False
    out = genfast.attention(q, k, v, causal=True, key_padding_mask=mask)
    assert (out[0] == 0).all() and (out[1, :, :3] == 0).all() and (out[1, :, 3:] != 0).any()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[0] == 0).all() and (k.grad[0] == 0).all() and (v.grad[0] == 0).all()


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
def test_joint_attention_is_cross_attention_over_the_concatenation(device, backend, use_backend):
    """MMDiT: text and image tokens concatenated; each part's output is that part's queries
    attending to the joint keys."""
    use_backend(backend)
    g = torch.Generator().manual_seed(3)
    txt = [torch.randn(2, 2, 7, 32, generator=g).to(device) for _ in range(3)]
    img = [torch.randn(2, 2, 20, 32, generator=g).to(device) for _ in range(3)]
    joint = genfast.attention(*(torch.cat([t, i], 2) for t, i in zip(txt, img)))
    k, v = torch.cat([txt[1], img[1]], 2), torch.cat([txt[2], img[2]], 2)
    torch.testing.assert_close(joint[:, :, :7], genfast.attention(txt[0], k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(joint[:, :, 7:], genfast.attention(img[0], k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_logit_range_stays_finite(device, backend, dtype, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(4)
    q = (torch.randn(1, 2, 33, 32, generator=g) * 30).to(device, dtype)  # logits up to ~1e4
    k = (torch.randn(1, 2, 33, 32, generator=g) * 30).to(device, dtype)
    k[..., 0, :] = -k[..., 0, :] * 10  # very negative logits for key 0
    v = torch.randn(1, 2, 33, 32, generator=g).to(device, dtype)
    out = genfast.attention(q, k, v)
    assert torch.isfinite(out).all()
    assert_within_reference_error("wide", out, reference.attention(q, k, v, upcast=False),
                                  reference.attention(q.double(), k.double(), v.double()), floor=1e-5)


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, 1, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False, True, False]])
    assert torch.autograd.gradcheck(lambda *a: genfast.attention(*a, causal=True, key_padding_mask=mask), (q, k, v))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_opcheck(backend, use_backend):
    use_backend(backend)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    # bf16 on the CPU path: the forward that keeps p for the backward (keep_p=True)
    for dtype in (torch.float32, torch.bfloat16) if backend == "cpu" else (torch.float32,):
        for case in attention_samples(device, dtype)[:: (5 if backend == "triton" else 2)]:
            q, k, v = case.args()
            kw = case.kwargs
            scale = kw.get("scale", q.shape[-1] ** -0.5)
            keeps = [False, True] if genfast.ops.attention._can_keep_p(q, k) else [False]
            assert keeps == [False] or dtype == torch.bfloat16
            for keep_p in keeps:
                args = (q, k, v, kw.get("key_padding_mask"), kw.get("causal", False), scale, keep_p)
                torch.library.opcheck(torch.ops.genfast.attention_fwd.default, args)
                out, lse, p = torch.ops.genfast.attention_fwd(*args)
                assert p.shape == ((*q.shape[:3], k.shape[2]) if keep_p else (0,))
                torch.library.opcheck(torch.ops.genfast.attention_bwd.default,
                                      (torch.randn_like(out), q, k, v, out, lse, p, *args[3:6]),
                                      test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_keep_p_only_where_the_cpu_path_can():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="keep_p"):
        torch.ops.genfast.attention_fwd(q, q, q, None, False, 0.25, True)  # fp32: torch's flash kernel


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16), ("triton", torch.float32)])
def test_compile_fullgraph_matches_eager(backend, dtype, use_backend):
    """Also checks the fake's output layout against the kernels' (q's layout on the fused fp32 CPU kernel)."""
    use_backend(backend)
    torch._dynamo.reset()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    lin = torch.nn.Linear(64, 3 * 64).to(device, dtype)

    def block(x, mask):
        b, n, _ = x.shape
        q, k, v = lin(x).view(b, n, 3, 2, 32).permute(2, 0, 3, 1, 4)
        return genfast.attention(q, k, v, key_padding_mask=mask).transpose(1, 2).reshape(b, n, 64).float().square().sum()

    x = torch.randn(2, 19, 64).to(device, dtype).requires_grad_(True)
    mask = (torch.rand(2, 19) > 0.2).to(device)
    eager = block(x, mask)
    (gx_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(block, fullgraph=True)(x, mask)
    (gx_comp,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gx_comp, gx_eager)


def test_backend_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("GENFAST_BACKEND", raising=False)
    assert genfast.ops.attention.backend_for(torch.empty(1, 1, 1, 8)) == "cpu"
    assert genfast.ops.attention.backend_for(torch.empty(1, 1, 1, 8, dtype=torch.float64)) == "reference"
    monkeypatch.setenv("GENFAST_BACKEND", "cuda_emu")
    with pytest.raises(ValueError, match="fp16, bf16 only"):  # a forced backend that cannot run: one error
        genfast.attention(*(torch.randn(1, 1, 4, 8) for _ in range(3)))


def test_cuda_emu_through_the_op(use_backend):
    """The CUDA kernels (emulated) behind genfast.attention: one bf16 case, forward and backward
    (their own suite, tests/test_attention_cuda.py, covers them in depth)."""
    use_backend("cuda_emu")
    case = next(c for c in attention_samples("cpu", torch.bfloat16) if c.name == "mask_33x77_d72")
    got = genfast.attention(*case.args(), **case.kwargs)
    assert_within_reference_error(case.name, got, _ref(case, upcast=False), _ref(case, torch.float64), floor=1e-5)
    g = torch.randn(case.q.shape).to(torch.bfloat16)
    grads = _grads(lambda *a: genfast.attention(*a, **case.kwargs), case.leaves(), g)
    low = _grads(lambda *a: reference.attention(*a, upcast=False, **case.kwargs), case.leaves(), g)
    high = _grads(lambda *a: reference.attention(*a, **case.kwargs), case.leaves(torch.float64), g)
    for name, a, lo, hi in zip("qkv", grads, low, high):
        assert_within_reference_error(f"d{name}", a, lo, hi, floor=1e-5)


def _qkv(*shapes, dtype=torch.float32):
    return [torch.randn(*s).to(dtype) for s in shapes]


@pytest.mark.parametrize("call,exc,match", [
    (lambda: genfast.attention(*_qkv((1, 2, 4, 8), (1, 2, 4, 8)), "v"), TypeError, "v must be a torch.Tensor"),
    (lambda: genfast.attention(*_qkv((2, 4, 8), (2, 4, 8), (2, 4, 8))), ValueError, "q must be 4-D"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 512), (1, 1, 4, 512), (1, 1, 4, 512))), ValueError, "head dim"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 8), (1, 1, 4, 16), (1, 1, 4, 16))), ValueError, "head dim 8"),
    (lambda: genfast.attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8).half(), torch.randn(1, 1, 4, 8)),
     TypeError, "k has dtype"),
    (lambda: genfast.attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8, device="meta"), torch.randn(1, 1, 4, 8)),
     ValueError, "k is on meta"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 8), (1, 1, 5, 8), (1, 1, 6, 8))), ValueError, "same number of keys"),
    (lambda: genfast.attention(*_qkv((2, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8))), ValueError, "batch and heads"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8), dtype=torch.int32)), TypeError, "floating"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8)), key_padding_mask=torch.ones(1, 4)),
     TypeError, "key_padding_mask must have dtype bool"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8)),
                               key_padding_mask=torch.ones(1, 5, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8)), causal=1), TypeError, "causal"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8)), scale="x"), TypeError, "scale"),
    (lambda: genfast.attention(*_qkv((1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8)), scale=float("nan")), ValueError, "scale"),
])
def test_bad_input_names_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("budget", ["one_head", "one_head_keep_p", "too_small"])
def test_cpu_ways_match_reference(budget, dtype, use_backend, monkeypatch):
    """The CPU path's other ways, forced by its budgets: chunks of one head (backward; two in the
    forward) with p recomputed or kept, and heads that do not fit at all (fp32: torch's flash
    kernel; bf16: blocks of 16 query rows, dk/dv summed over the blocks)."""
    from genfast.ops import attention_cpu

    use_backend("cpu")
    monkeypatch.setattr(attention_cpu, "FITS", {**attention_cpu.FITS, torch.float32: "heads", torch.bfloat16: "heads"})
    monkeypatch.setattr(attention_cpu, "FUSED_FROM_KEYS", {})
    monkeypatch.setattr(attention_cpu, "FUSED_BELOW_KEYS", {})
    monkeypatch.setattr(attention_cpu, "LONG", {**attention_cpu.LONG, torch.float32: "sdpa", torch.bfloat16: "rows"})
    for case in attention_samples("cpu", dtype):
        nq, nk = case.q.shape[2], case.k.shape[2]
        budget_bytes = 2 * nq * nk * case.q.element_size() if budget.startswith("one_head") else 1
        monkeypatch.setattr(attention_cpu, "SCORE_BYTES", budget_bytes)
        monkeypatch.setattr(attention_cpu, "KEEP_P_BYTES", 1 << 30 if budget == "one_head_keep_p" else 0)
        if case.q.numel() and nk:
            want = "heads" if budget.startswith("one_head") else ("sdpa" if dtype == torch.float32 else "rows")
            assert attention_cpu.variant(case.q, nk, buffers=2) == want
            assert genfast.ops.attention._can_keep_p(case.q, case.k) == (budget == "one_head_keep_p")
        g = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(1))
        kw = case.kwargs
        got = _grads(lambda *a: genfast.attention(*a, **kw), case.leaves(), g)
        low = _grads(lambda *a: reference.attention(*a, upcast=False, **kw), case.leaves(), g)
        high = _grads(lambda *a: reference.attention(*a, **kw), case.leaves(torch.float64), g)
        out = genfast.attention(*case.args(), **kw)
        assert_within_reference_error(case.name, out, _ref(case, upcast=False), _ref(case, torch.float64), floor=1e-5)
        for name, a, lo, hi in zip("qkv", got, low, high):
            assert_within_reference_error(f"{case.name}: d{name}", a, lo, hi, floor=1e-5)
