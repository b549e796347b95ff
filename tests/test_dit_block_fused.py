"""genfast.nn.DiTBlock's fused path (genfast.ops.dit_block: three autograd nodes) against the per-op
path and the plain-PyTorch block: forward and every gradient, fp32 and bf16, frozen parameters,
odd and empty shapes, non-contiguous inputs, and the cases that must take the per-op path."""
import pytest
import torch
from torch import nn

import genfast.nn
from genfast import reference
from genfast.ops import dit_block
from genfast.testing import assert_within_reference_error

from dit_tiny import block_pair  # noqa: E402 (tests/ on sys.path: conftest.py)


_pair = block_pair  # (reference block, genfast block) with the same random weights


@pytest.fixture(autouse=True)
def _onednn_gemms(monkeypatch):
    """fp32 CPU GEMMs on oneDNN, the default but on Intel CPUs (MKL there), which these tests' bit
    and call-sequence claims describe; test_fused_equals_eager_fp32 also runs torch's GEMMs."""
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", True)


@pytest.fixture
def path(monkeypatch):
    """path(True | False): DiTBlock takes (or not) the fused path on every device for the test."""
    def set_path(fused):
        monkeypatch.setattr(dit_block, "USE_FUSED", {"cpu": fused, "cuda": fused})
    return set_path


def _run(block, x, c, g, leaves=True):
    """[out, dx, dc, *dparams] (None for an input or parameter that does not require grad)."""
    xi, ci = x.clone().requires_grad_(x.requires_grad), c.clone().requires_grad_(c.requires_grad)
    out = block(xi, ci)
    wrt = [t for t in (xi, ci, *block.parameters()) if t.requires_grad]
    grads = iter(torch.autograd.grad(out, wrt, g)) if wrt else iter(())
    return [out] + [next(grads) if t.requires_grad else None for t in (xi, ci, *block.parameters())]


def _names(block):
    return ["out", "x", "c", *dict(block.named_parameters())]


def _nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo.extend(n for n, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


def _bias_in_gated(monkeypatch, on):
    """proj / fc2 bias gradients from the gated-residual backward (on) or torch's column sums."""
    monkeypatch.setattr(dit_block, "BIAS_IN_GATED", {"cpu": on, "cuda": on})


@pytest.mark.parametrize("bias_in_gated", [False, True], ids=["bias-sums", "bias-in-gated"])
@pytest.mark.parametrize("backend,onednn", [("cpu", True), ("cpu", False), ("reference", True)])
def test_fused_equals_eager_fp32(backend, onednn, bias_in_gated, use_backend, path, monkeypatch):
    """onednn=False: the GEMM way GPUs take (torch's GEMMs, q/k/v grads read as three row blocks)."""
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", onednn)
    _bias_in_gated(monkeypatch, bias_in_gated)
    use_backend(backend)
    path(True)
    ref, ours = _pair()
    x, c = torch.randn(2, 37, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    g = torch.randn(2, 37, 64)
    got, want = _run(ours, x, c, g), _run(ref, x, c, g)
    assert {"_AttnInBackward", "_BlockOutBackward"} <= _nodes(got[0])
    for name, a, b in zip(_names(ours), got, want):
        # fp32 sums of hundreds of terms with |grad| up to ~500: an absolute floor scaled to the value
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)


@pytest.mark.parametrize("add_in_modulate", [True, False])
def test_fused_equals_per_op_bits_fp32(add_in_modulate, use_backend, path, monkeypatch):
    """Same kernels in the same order: the fused path gives the per-op path's bits (CPU kernels), with
    dx1's residual added inside the modulate backward or apart, and the bias gradients from torch's
    sums as the per-op path makes them (the bias passes sum in other chunks: test_bias_passes_on_cpu)."""
    monkeypatch.setattr(dit_block, "ADD_IN_MODULATE", add_in_modulate)
    _bias_in_gated(monkeypatch, False)
    monkeypatch.setattr(dit_block, "GELU_BIAS_IN_BWD", {"cpu": False, "cuda": True})
    use_backend("cpu")
    _, ours = _pair()
    x, c = torch.randn(3, 19, 64, requires_grad=True), torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 19, 64)
    path(True)
    fused = _run(ours, x, c, g)
    path(False)
    per_op = _run(ours, x, c, g)
    assert "_BlockOutBackward" not in _nodes(per_op[0])
    for name, a, b in zip(_names(ours), fused, per_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bias_folding_keeps_the_bits_fp32(use_backend, path, monkeypatch):
    """On torch's BLAS GEMMs (fp32 CPU, USE_ONEDNN off as on Intel CPUs) the proj / fc1 / fc2 biases go
    into the gated-residual and GELU passes (dit_block._folds_bias): the outputs, every gradient and
    the inference output keep the bits of the GEMMs with their biases (torch's addmm adds the bias to
    the same sum), and the saved p, h, f still hold them (the backward reads them)."""
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", False)
    calls = []
    for mod, name in ((dit_block, "gated_bias_fp32"), (dit_block._gelu, "fwd_bias_fp32")):
        fn = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    use_backend("cpu")
    path(True)
    _, ours = _pair()
    x, c = torch.randn(3, 19, 64, requires_grad=True), torch.randn(3, 64, requires_grad=True)
    g = torch.randn(3, 19, 64)
    results = {}
    for fold in (True, False):
        monkeypatch.setattr(dit_block, "FOLD_BIAS", fold)
        calls.clear()
        results[fold] = _run(ours, x, c, g)
        with torch.no_grad():
            results[fold].append(ours(x, c))
        assert sorted(set(calls)) == (["fwd_bias_fp32", "gated_bias_fp32"] if fold else [])
    for name, a, b in zip(_names(ours) + ["inference"], results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("bias_in_gated", [False, True], ids=["bias-sums", "bias-in-gated"])
@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "cpu"), (torch.float16, "cpu"),
                                           (torch.bfloat16, "cuda_emu")])
def test_fused_low_precision_within_reference_error(dtype, backend, bias_in_gated, use_backend, path, monkeypatch):
    """bf16/fp16 (the CUDA kernels through their CPU emulation too) within 2x eager's own error."""
    use_backend(backend)
    _bias_in_gated(monkeypatch, bias_in_gated)
    path(True)
    ref, ours = _pair(std=0.05)
    ref64 = reference.DiTBlock(64, 4).double()
    ref64.load_state_dict(ref.state_dict())
    x, c, g = torch.randn(2, 33, 64), torch.randn(2, 64), torch.randn(2, 33, 64)
    x.requires_grad_(), c.requires_grad_()
    got = _run(ours.to(dtype), x.to(dtype), c.to(dtype), g.to(dtype))
    low = _run(ref.to(dtype), x.to(dtype), c.to(dtype), g.to(dtype))
    high = _run(ref64, x.double(), c.double(), g.double())
    for name, a, lo, hi in zip(_names(ours), got, low, high):
        assert a.dtype == dtype, name
        assert_within_reference_error(f"fused {dtype} {name}", a, lo, hi, floor=1e-3)


@pytest.mark.parametrize("bias_in_gated", [False, True], ids=["bias-sums", "bias-in-gated"])
@pytest.mark.parametrize("frozen", ["x", "c", "attn", "mlp", "adaLN", "all-but-x", "attn.proj.bias", "mlp.fc2.bias",
                                    "attn.proj.weight"])
def test_fused_frozen_inputs_and_parameters(frozen, bias_in_gated, use_backend, path, monkeypatch):
    """Gradients only for what requires them, equal to eager's (fine-tuning freezes parts)."""
    use_backend("cpu")
    _bias_in_gated(monkeypatch, bias_in_gated)
    path(True)
    ref, ours = _pair()
    x, c = torch.randn(2, 13, 64, requires_grad=frozen != "x"), torch.randn(2, 64, requires_grad=frozen != "c")
    for block in (ref, ours):
        for name, p in block.named_parameters():
            p.requires_grad_(not (name.startswith(frozen) or frozen == "all-but-x"))
    if frozen == "all-but-x":
        c.requires_grad_(False)
    g = torch.randn(2, 13, 64)
    got, want = _run(ours, x, c, g), _run(ref, x, c, g)
    for name, a, b in zip(_names(ours), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)


def test_fused_odd_shapes_non_contiguous_and_inference(use_backend, path):
    use_backend("cpu")
    path(True)
    ref, ours = _pair(hidden=48, heads=3)
    base = torch.randn(1, 48, 5)  # x as a transposed view: [1, 5, 48] with channel stride 5
    x, c = base.transpose(1, 2), torch.randn(1, 48)
    assert not x.is_contiguous()
    x.requires_grad_(), c.requires_grad_()
    g = torch.randn(1, 5, 48)
    for name, a, b in zip(_names(ours), _run(ours, x, c, g), _run(ref, x, c, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)
    with torch.no_grad():  # inference: no autograd nodes, same numbers
        torch.testing.assert_close(ours(x, c), ref(x, c), rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x, c), ref(x, c), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bias_in_gated", [False, True], ids=["bias-sums", "bias-in-gated"])
def test_fused_empty_batch_and_one_token(bias_in_gated, use_backend, path, monkeypatch):
    use_backend("cpu")
    _bias_in_gated(monkeypatch, bias_in_gated)
    path(True)
    ref, ours = _pair()
    for b, n in ((0, 7), (2, 1)):
        x, c = torch.randn(b, n, 64, requires_grad=True), torch.randn(b, 64, requires_grad=True)
        g = torch.randn(b, n, 64)
        for name, a, bb in zip(_names(ours), _run(ours, x, c, g), _run(ref, x, c, g)):
            assert a.shape == bb.shape, name
            torch.testing.assert_close(a, bb, rtol=1e-4, atol=1e-5 * max(1.0, bb.abs().max().item() if bb.numel() else 1),
                                       msg=f"{b}x{n} {name}")


def test_cases_that_take_the_per_op_path(path):
    """fp64, autocast, a wrapped Linear (LoRA-style), the fused path switched off: no fused nodes,
    and the wrapped Linear's own forward runs."""
    path(True)
    _, ours = _pair()
    x, c = torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 64)
    assert dit_block.fused_block_ok(ours, x, c)
    assert not dit_block.fused_block_ok(ours.double(), x.double(), c.double())
    ours.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not dit_block.fused_block_ok(ours, x, c)
        assert "_BlockOutBackward" not in _nodes(ours(x, c))
    path(False)
    assert not dit_block.fused_block_ok(ours, x, c)
    path(True)

    class Wrapped(nn.Module):  # a LoRA-style wrapper: must not be bypassed by reading .weight
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, t):
            self.calls += 1
            return self.inner(t) + 1.0
    ours.mlp.fc1 = Wrapped(ours.mlp.fc1)
    assert not dit_block.fused_block_ok(ours, x, c)
    out = ours(x, c)
    assert ours.mlp.fc1.calls == 1 and "_BlockOutBackward" not in _nodes(out)


def test_replaced_submodules_keep_their_forward(path):
    """A user's own attention (or MLP) module in the block, e.g. a subclass with hooks or another
    attention: its forward runs (per-op path), the fused path never reads around it."""
    path(True)
    _, ours = _pair()
    x, c = torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 64)

    class MyAttention(genfast.nn.DiTAttention):
        calls = 0

        def forward(self, t, **kw):
            MyAttention.calls += 1
            return super().forward(t, **kw) * 0.5
    mine = MyAttention(64, 4)
    mine.load_state_dict(ours.attn.state_dict())
    plain_out = ours(x, c)
    ours.attn = mine
    out = ours(x, c)
    assert MyAttention.calls == 1 and "_BlockOutBackward" not in _nodes(out)
    assert not torch.allclose(out, plain_out)


@pytest.mark.parametrize("fused", [True, False])
def test_block_under_autocast_matches_eager_autocast(fused, use_backend, path):
    """bf16 autocast (mixed-precision training) with fp32 x and weights: the per-op path (autocast
    always takes it) gives eager-autocast's output dtype and numbers within bf16 rounding."""
    use_backend("cpu")
    path(fused)
    ref, ours = _pair(std=0.05)
    x, c, g = torch.randn(2, 9, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True), torch.randn(2, 9, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _run(ours, x, c, g), _run(ref, x, c, g)
    with torch.no_grad():
        exact = ref(x, c)  # fp32 without autocast: how far bf16 autocast itself lands
    assert got[0].dtype == want[0].dtype == torch.float32
    bound = 2 * (want[0] - exact).abs().max().item() + 1e-3
    assert (got[0] - exact).abs().max().item() <= bound
    for name, a, b in zip(_names(ours), got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2 * max(1.0, b.abs().max().item()),
                                   msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("hidden,heads", [(64, 4), (144, 2)], ids=["d16", "d72"])
def test_gpu_fused_block_bf16_every_grad_within_reference_error(hidden, heads, monkeypatch, path):
    """The block as users train it on a GPU (no forced backend: SDPA attention, CUDA modulate and
    gated residual) on the fused path: output and every gradient within 2x eager bf16's own error."""
    monkeypatch.delenv("GENFAST_BACKEND", raising=False)
    path(True)
    ref, ours = _pair(hidden, heads, std=0.05)
    ref64 = reference.DiTBlock(hidden, heads).double()
    ref64.load_state_dict(ref.state_dict())
    ref16, ours16, ref64 = ref.bfloat16().cuda(), ours.bfloat16().cuda(), ref64.cuda()
    x, c, g = (torch.randn(*s, device="cuda") for s in ((3, 37, hidden), (3, hidden), (3, 37, hidden)))
    x.requires_grad_(), c.requires_grad_()
    got = _run(ours16, x.bfloat16(), c.bfloat16(), g.bfloat16())
    assert "_BlockOutBackward" in _nodes(got[0])
    low = _run(ref16, x.bfloat16(), c.bfloat16(), g.bfloat16())
    high = _run(ref64, x.double(), c.double(), g.double())
    for name, a, lo, hi in zip(_names(ours), got, low, high):
        assert_within_reference_error(f"gpu fused bf16 {name}", a, lo, hi, floor=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_inference_with_gelu_epilogue(dtype, monkeypatch, path):
    """GPU inference runs fc1 + GELU(tanh) as one cuBLASLt GEMM (dit_block.EPILOGUE_GELU): fp32 equal to
    the per-op block (which applies torch's tanh GELU after the GEMM) within fp32 rounding, bf16 within
    eager's own error."""
    monkeypatch.delenv("GENFAST_BACKEND", raising=False)
    ref, ours = _pair(144, 2, std=0.05)
    ref64 = reference.DiTBlock(144, 2).double().cuda()
    ref64.load_state_dict(ref.state_dict())
    ref, ours = ref.to("cuda", dtype), ours.to("cuda", dtype)
    x, c = torch.randn(3, 37, 144, device="cuda", dtype=dtype), torch.randn(3, 144, device="cuda", dtype=dtype)
    with torch.no_grad():
        path(True)
        fused = ours(x, c)
        path(False)
        per_op = ours(x, c)
        if dtype == torch.float32:
            torch.testing.assert_close(fused, per_op, rtol=1e-4, atol=1e-4)
        else:
            assert_within_reference_error("gpu fused inference bf16", fused, ref(x, c), ref64(x.double(), c.double()),
                                          floor=1e-3)


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_block_under_activation_checkpointing(reentrant, use_backend, path):
    """torch.utils.checkpoint around the block (DiT training with gradient checkpointing): the forward
    is rerun in the backward and the gradients are the same bits as without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    use_backend("cpu")
    path(True)
    _, ours = _pair()
    x, c, g = torch.randn(2, 9, 64), torch.randn(2, 64), torch.randn(2, 9, 64)

    def run(wrap):
        ours.zero_grad(set_to_none=True)
        xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
        out = wrap(xi, ci)
        out.backward(g)  # reentrant checkpointing supports .backward() only
        return [out.detach(), xi.grad, ci.grad, *(p.grad for p in ours.parameters())]

    plain = run(ours)
    ckpt = run(lambda xi, ci: checkpoint(ours, xi, ci, use_reentrant=reentrant))
    for name, a, b in zip(_names(ours), ckpt, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def _cpu_bias_fusions(monkeypatch, use_backend, path, gated, gelu):
    """The fused path on the CPU kernels with BIAS_IN_GATED / GELU_BIAS_IN_BWD set; returns _bias_asks."""
    use_backend("cpu")
    path(True)
    _bias_in_gated(monkeypatch, gated)
    monkeypatch.setattr(dit_block, "GELU_BIAS_IN_BWD", {"cpu": gelu, "cuda": True})
    return _bias_asks(monkeypatch)


def _bias_asks(monkeypatch):
    """[(weight shape, bias gradient asked for)] of every dit_block._lin_grads call from here on."""
    asked, real = [], dit_block._lin_grads

    def spy(dy2, x2, w, need_x, need_w, need_b, *name):
        asked.append((tuple(w.shape), need_b))
        return real(dy2, x2, w, need_x, need_w, need_b, *name)

    monkeypatch.setattr(dit_block, "_lin_grads", spy)
    return asked


@pytest.mark.parametrize("bias_in_gated", [False, True], ids=["bias-sums", "bias-in-gated"])
def test_bias_in_gated_takes_proj_and_fc2_bias_grads_from_the_gated_backward(bias_in_gated, use_backend, path,
                                                                           monkeypatch):
    """With BIAS_IN_GATED the proj and fc2 GEMM-gradient calls are not asked for a bias gradient
    (the gated backward made it); fc1's still is."""
    asked = _cpu_bias_fusions(monkeypatch, use_backend, path, bias_in_gated, gelu=False)
    _, ours = _pair()
    x, c = torch.randn(2, 9, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    _run(ours, x, c, torch.randn(2, 9, 64))
    # fc2 [64, 256], fc1 [256, 64], proj [64, 64]; then qkv [192, 64] (fp32 on the CPU: one oneDNN call)
    assert asked == [((64, 256), not bias_in_gated), ((256, 64), True), ((64, 64), not bias_in_gated),
                     ((192, 64), True)]


def test_bias_passes_on_cpu(use_backend, path, monkeypatch):
    """The Intel CPU defaults (torch's BLAS GEMMs, biases folded into the forward passes): proj's and
    fc2's bias gradients from the gated-residual backward, fc1's from the C++ GELU backward's pass;
    none of their GEMM-gradient calls is asked for one (qkv's three row-block GEMMs do not take that
    call); fp32 equals eager within fp32 rounding, a frozen fc1 bias still gets none."""
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", False)
    asked = _cpu_bias_fusions(monkeypatch, use_backend, path, True, gelu=True)
    ref, ours = _pair()
    x, c, g = torch.randn(3, 37, 64, requires_grad=True), torch.randn(3, 64, requires_grad=True), torch.randn(3, 37, 64)
    got, want = _run(ours, x, c, g), _run(ref, x, c, g)
    assert asked == [((64, 256), False), ((256, 64), False), ((64, 64), False)]
    for name, a, b in zip(_names(ours), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)
    ours.mlp.fc1.bias.requires_grad_(False)
    ref.mlp.fc1.bias.requires_grad_(False)
    got, want = _run(ours, x, c, g), _run(ref, x, c, g)
    assert len(got) == len(want) and sum(t is None for t in got) == sum(t is None for t in want) == 1


@pytest.mark.parametrize("onednn", [True, False])
def test_backward_temporaries_reused_across_blocks_and_steps(onednn, use_backend, path, monkeypatch):
    """The backward's temporaries (dit_block._temp) and the forward's saved activations (a pool per
    name, dit_block._saved_buf) are reused by the next block and the next step only once free: two
    chained blocks, two steps, every gradient the same bits as with fresh buffers; the pools hold one
    buffer per block."""
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", onednn)
    use_backend("cpu")
    path(True)
    blocks = nn.Sequential(*(genfast.nn.DiTBlock(64, 4) for _ in range(2)))

    class Chain(nn.Module):
        def forward(self, x, c):
            return blocks[1](blocks[0](x, c), c)

    chain = Chain()
    x, c = torch.randn(2, 33, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    dit_block.free_workspace()
    steps = [_run_params(chain, blocks, x, c, torch.randn(2, 33, 64)) for _ in range(2)]
    assert dit_block._temps, "the temporaries were not kept"
    assert len(dit_block._saved[("x1", torch.float32)]) == 2, "one saved x1 buffer per block"
    monkeypatch.setattr(dit_block, "_temp", lambda name, shape, like: torch.empty(shape, dtype=like.dtype))
    monkeypatch.setattr(dit_block, "_saved_buf", lambda name, shape, like: None)
    for got in steps:
        want = _run_params(chain, blocks, x, c, got[0])
        for i, (a, b) in enumerate(zip(got[1:], want[1:])):
            assert torch.equal(a, b), i


@pytest.mark.parametrize("onednn", [True, False])
def test_inference_temporaries_reused_across_blocks_and_calls(onednn, use_backend, path, monkeypatch):
    """Without autograd every intermediate of the fused forward is a reused buffer (dit_block._temp):
    two chained blocks, three calls, the outputs the same bits as with fresh buffers, and an output
    the caller holds is not written over by the next call."""
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", onednn)
    use_backend("cpu")
    path(True)
    blocks = [genfast.nn.DiTBlock(64, 4) for _ in range(2)]
    xs, c = [torch.randn(2, 33, 64) for _ in range(3)], torch.randn(2, 64)
    dit_block.free_workspace()
    with torch.no_grad():
        got = [blocks[1](blocks[0](x, c), c) for x in xs]
        assert dit_block._temps, "the temporaries were not kept"
        monkeypatch.setattr(dit_block, "_temp", lambda name, shape, like: torch.empty(shape, dtype=like.dtype))
        want = [blocks[1](blocks[0](x, c), c) for x in xs]
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


def _run_params(chain, blocks, x, c, g):
    """[g, out, dx, dc, *dparams of both blocks]."""
    xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
    out = chain(xi, ci)
    return [g, out.detach(), *torch.autograd.grad(out, [xi, ci, *blocks.parameters()], g)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda_emu", "triton"])
def test_fused_with_every_gradient_fusion_as_on_gpus(backend, dtype, use_backend, path, monkeypatch):
    """The GPU defaults on CPU tensors through the GPU kernels (CUDA emulation, Triton interpreter):
    proj / fc2 bias gradients from the gated backward, fc1's from the GELU backward
    (gelu_tanh_backward_bias), qkv's as one column-sum pass, dx1's residual added in the modulate
    backward. fp32 equals eager
    within fp32 rounding; bf16 within 2x eager bf16's own error; fc1's GEMM-gradient call is not
    asked for a bias gradient; a frozen fc1 bias still gets none."""
    if backend == "cuda_emu" and dtype == torch.float32:
        pytest.skip("the CUDA attention is fp16/bf16 only (fp32 attention: triton / cpu)")
    use_backend(backend)
    path(True)
    _bias_in_gated(monkeypatch, True)
    monkeypatch.setattr(dit_block, "GELU_BIAS_IN_BWD", {"cpu": True, "cuda": True})
    monkeypatch.setattr(dit_block, "QKV_BIAS_ONE_PASS", {"cpu": True, "cuda": True})
    asked = _bias_asks(monkeypatch)
    ref, ours = _pair(std=0.05)
    x, c, g = torch.randn(2, 35, 64), torch.randn(2, 64), torch.randn(2, 35, 64)
    x.requires_grad_(), c.requires_grad_()
    got = _run(ours.to(dtype), x.to(dtype), c.to(dtype), g.to(dtype))
    assert ((256, 64), False) in asked and ((256, 64), True) not in asked
    if dtype == torch.float32:
        want = _run(ref, x, c, g)
        for name, a, b in zip(_names(ours), got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)
    else:
        ref64 = reference.DiTBlock(64, 4).double()
        ref64.load_state_dict(ref.state_dict())
        low = _run(ref.to(dtype), x.to(dtype), c.to(dtype), g.to(dtype))
        high = _run(ref64, x.double(), c.double(), g.double())
        for name, a, lo, hi in zip(_names(ours), got, low, high):
            assert_within_reference_error(f"{backend} {name}", a, lo, hi, floor=1e-3)
    ours.mlp.fc1.bias.requires_grad_(False)
    frozen = _run(ours, x.to(dtype), c.to(dtype), g.to(dtype))
    assert frozen[_names(ours).index("mlp.fc1.bias")] is None


@pytest.mark.parametrize("fused", [True, False])
def test_hooks_and_old_style_weight_norm_are_honoured(fused, use_backend, path):
    """torch.nn.utils.weight_norm (the old API) computes a Linear's weight in a forward pre-hook; a
    forward hook on a submodule must fire. Both paths call such modules (plain_linear / has_hooks)
    instead of reading a stale weight or skipping the hook: equal to the eager block after a change of
    weight_g (as an optimizer step makes), forward and gradients."""
    import warnings

    use_backend("cpu")
    path(fused)
    ref, ours = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the old API is deprecated, still in use
        for block in (ref, ours):
            torch.nn.utils.weight_norm(block.attn.qkv)
            torch.nn.utils.weight_norm(block.mlp.fc2)
    with torch.no_grad():
        for block in (ref, ours):
            block.attn.qkv.weight_g.mul_(1.5)
            block.mlp.fc2.weight_g.mul_(0.5)
    calls = []
    ours.attn.register_forward_hook(lambda mod, inp, out: calls.append(out.shape))
    x, c = torch.randn(2, 9, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    g = torch.randn(2, 9, 64)
    got, want = _run(ours, x, c, g), _run(ref, x, c, g)
    assert calls == [torch.Size([2, 9, 64])]
    for name, a, b in zip(_names(ours), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, b.abs().max().item()), msg=name)


def test_fused_path_only_without_hooks(path):
    """A hook anywhere the fused path would skip (a submodule, a Linear, a global module hook) sends
    the block to the per-op path; without hooks it takes the fused one."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    path(True)
    _, ours = _pair()
    x, c = torch.randn(1, 5, 64), torch.randn(1, 64)
    assert dit_block.fused_block_ok(ours, x, c)
    for target in (ours.attn, ours.mlp, ours.adaLN_modulation, ours.adaLN_modulation[0], ours.attn.qkv, ours.mlp.fc1):
        handle = target.register_forward_pre_hook(lambda mod, inp: None)
        assert not dit_block.fused_block_ok(ours, x, c), type(target).__name__
        handle.remove()
    handle = register_module_forward_pre_hook(lambda mod, inp: None)
    try:
        assert not dit_block.fused_block_ok(ours, x, c)
    finally:
        handle.remove()
    assert dit_block.fused_block_ok(ours, x, c)


@pytest.mark.parametrize("b,n", [(2, 1), (0, 7), (3, 33)], ids=["one-token", "empty-batch", "odd"])
def test_gpu_fusions_at_edge_shapes_through_emulation(b, n, use_backend, path, monkeypatch):
    """The GPU configuration (every gradient fusion on) through the emulated CUDA kernels at one token
    (per-token gates: the bias sums fall back to torch's), an empty batch and an odd length: bf16
    within 2x eager bf16's own error, shapes and dtypes of every gradient."""
    use_backend("cuda_emu")
    path(True)
    _bias_in_gated(monkeypatch, True)
    monkeypatch.setattr(dit_block, "GELU_BIAS_IN_BWD", {"cpu": True, "cuda": True})
    monkeypatch.setattr(dit_block, "QKV_BIAS_ONE_PASS", {"cpu": True, "cuda": True})
    ref, ours = _pair(std=0.05)
    ref64 = reference.DiTBlock(64, 4).double()
    ref64.load_state_dict(ref.state_dict())
    x, c, g = torch.randn(b, n, 64), torch.randn(b, 64), torch.randn(b, n, 64)
    x.requires_grad_(), c.requires_grad_()
    dt = torch.bfloat16
    got = _run(ours.to(dt), x.to(dt), c.to(dt), g.to(dt))
    low = _run(ref.to(dt), x.to(dt), c.to(dt), g.to(dt))
    high = _run(ref64, x.double(), c.double(), g.double())
    for name, a, lo, hi in zip(_names(ours), got, low, high):
        assert a.shape == hi.shape and a.dtype == dt, name
        assert_within_reference_error(f"{b}x{n} {name}", a, lo, hi, floor=1e-3)
