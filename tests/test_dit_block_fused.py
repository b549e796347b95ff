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

import dit_tiny  # (tests/ on sys.path: conftest.py)
from dit_tiny import _bias_in_gated, _names, _nodes, _run, block_pair

# the fused-block fixtures: fp32 CPU GEMMs on oneDNN in every test here (autouse), path(fused)
_onednn_gemms, path = dit_tiny.onednn_gemms, dit_tiny.path


_pair = block_pair  # (reference block, genfast block) with the same random weights


@pytest.mark.parametrize("in_node", [True, False], ids=["attention-in-node", "attention-apart"])
@pytest.mark.parametrize("bias_in_gated", [False, True], ids=["bias-sums", "bias-in-gated"])
@pytest.mark.parametrize("backend,onednn", [("cpu", True), ("cpu", False), ("reference", True)])
def test_fused_equals_eager_fp32(backend, onednn, bias_in_gated, in_node, use_backend, path, monkeypatch):
    """onednn=False with the attention apart: the GEMM way GPUs take (torch's GEMMs, q/k/v grads read
    as three row blocks). in_node: the CPU kernels' attention inside the first node (_AttnHalf, q/k/v
    grads in one [B*N, 3C] buffer); the reference backend keeps the attention op apart."""
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", onednn)
    monkeypatch.setattr(dit_block, "ATTENTION_IN_NODE", in_node)
    _bias_in_gated(monkeypatch, bias_in_gated)
    use_backend(backend)
    path(True)
    ref, ours = _pair()
    x, c = torch.randn(2, 37, 64, requires_grad=True), torch.randn(2, 64, requires_grad=True)
    g = torch.randn(2, 37, 64)
    got, want = _run(ours, x, c, g), _run(ref, x, c, g)
    first = "_AttnHalfBackward" if in_node and backend == "cpu" else "_AttnInBackward"
    assert {first, "_BlockOutBackward"} <= _nodes(got[0])
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
    the same sum), and the saved p, h, f still hold them (the backward reads them). Where the fold is
    off by default (not MKL's AVX-512 code: addmm adds the bias in another order) the bits differ."""
    if not dit_block.FOLD_BIAS:
        pytest.skip("bias folding is off on this CPU (MKL's addmm is not mm + bias bit for bit here)")
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
@pytest.mark.parametrize("fused,widened", [(True, False), (True, True), (False, True)],
                         ids=["fused", "fused-widened", "per-op-widened"])
def test_fused_low_precision_within_reference_error(dtype, backend, bias_in_gated, fused, widened, use_backend, path,
                                                    monkeypatch):
    """bf16/fp16 (the CUDA kernels through their CPU emulation too) within 2x eager's own error;
    widened: the CPU GEMMs in fp32 (genfast.ops.linear.WIDENED, the default on CPUs without 16-bit
    GEMM instructions), else torch's 16-bit GEMMs."""
    use_backend(backend)
    _bias_in_gated(monkeypatch, bias_in_gated)
    monkeypatch.setattr(genfast.ops.linear, "WIDENED", frozenset({dtype}) if widened else frozenset())
    path(fused)
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


@pytest.mark.parametrize("widened", [False, True], ids=["bf16-gemms", "widened"])
@pytest.mark.parametrize("fused", [True, False])
def test_block_under_autocast_matches_eager_autocast(fused, widened, use_backend, path, monkeypatch):
    """bf16 autocast (mixed-precision training) with fp32 x and weights: the per-op path (autocast
    always takes it) gives eager-autocast's output dtype and numbers within bf16 rounding; widened:
    its Linears cast as autocast does, then run genfast.ops.linear's widened GEMMs."""
    use_backend("cpu")
    path(fused)
    monkeypatch.setattr(genfast.ops.linear, "WIDENED", frozenset({torch.bfloat16}) if widened else frozenset())
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


def test_compiled_block_under_autocast_widens_and_matches_eager(use_backend, monkeypatch):
    """torch.compile(fullgraph) of the block under bf16 autocast where WIDENED holds bf16: its Linears are
    genfast::linear in the graph (not torch's bf16 GEMMs), numbers within bf16 rounding of eager autocast."""
    use_backend("cpu")
    monkeypatch.setattr(genfast.ops.linear, "WIDENED", frozenset({torch.bfloat16}))
    _, ours = _pair(std=0.05)
    x, c, g = torch.randn(2, 9, 64, requires_grad=True), torch.randn(2, 64), torch.randn(2, 9, 64)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(str(gm.graph))
        return torch._inductor.compile(gm, inputs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _run(ours, x, c, g)
        got = _run(torch.compile(ours, fullgraph=True, backend=backend), x, c, g)
    assert sum(s.count("genfast.linear") for s in graphs) >= 5, graphs  # adaLN, qkv, proj, fc1, fc2
    for name, a, b in zip(_names(ours), got, want):
        if b is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * max(1.0, b.abs().max().item()),
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
