"""genfast.nn.DiTBlock's fused path, its gradient fusions and buffers: the bias gradients from the
gated-residual and GELU backwards, the CPU's reused temporaries across blocks and steps, and every
fusion the GPUs take, run on the CPU kernels and the emulation. The fused path's answers in general:
test_dit_block_fused.py."""
import pytest
import torch
from torch import nn

import genfast.nn
from genfast import reference
from genfast.ops import dit_block
from genfast.testing import assert_within_reference_error, backends_to_test

import dit_tiny  # (tests/ on sys.path: conftest.py)
from dit_tiny import _bias_in_gated, _names, _run, block_pair

# the fused-block fixtures: fp32 CPU GEMMs on oneDNN in every test here (autouse), path(fused)
_onednn_gemms, path = dit_tiny.onednn_gemms, dit_tiny.path

_pair = block_pair  # (reference block, genfast block) with the same random weights
CPU_BACKENDS = [b for d, b in backends_to_test() if d == "cpu"]


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
def test_backward_temporaries_reused_across_blocks_and_steps(onednn, use_backend, path, monkeypatch,
                                                             reuse_small_buffers):
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
def test_inference_temporaries_reused_across_blocks_and_calls(onednn, use_backend, path, monkeypatch,
                                                              reuse_small_buffers):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("way", ["small", "onednn", "sdpa", "heads"])
def test_attention_in_node_on_every_cpu_way(way, dtype, cpu_way, path, monkeypatch):
    """CPU training takes the attention inside the first node (_AttnHalf) on every CPU attention way:
    the ways that write given buffers ("small", "onednn") hand dq, dk, dv over in one [B*N, 3C]
    buffer (the qkv projection's gradients from one GEMM-gradient call), the others their own
    tensors (three row blocks: _qkv_grads); forward and every gradient as eager within its error."""
    from genfast.ops import attention_cpu_fp32

    if way == "onednn" and dtype != torch.float32:
        pytest.skip("the onednn way is fp32 only")
    if way == "small" and not attention_cpu_fp32.small_supports(dtype, 16):
        pytest.skip("the small way needs AVX-512 with BF16")
    monkeypatch.setattr(genfast.ops.linear, "USE_ONEDNN", False)  # torch's GEMMs: _qkv_grads's three blocks
    monkeypatch.setattr(genfast.ops.linear, "WIDENED", frozenset())
    cpu_way(dtype, way)
    path(True)
    calls = []
    for name in ("_lin_grads", "_qkv_grads"):
        fn = getattr(dit_block, name)
        monkeypatch.setattr(dit_block, name, lambda dy, *a, fn=fn, name=name: calls.append(
            (name, tuple(dy.shape) if name == "_lin_grads" else len(dy))) or fn(dy, *a))
    ref, ours = _pair(dtype=dtype, std=0.05)
    x, c = torch.randn(2, 37, 64, dtype=dtype), torch.randn(2, 64, dtype=dtype)
    g = torch.randn(2, 37, 64, dtype=dtype)
    got = _run(ours, x.requires_grad_(), c.requires_grad_(), g)
    assert "_AttnHalfBackward" in dit_tiny._nodes(got[0])
    one = way in ("small", "onednn")
    assert (("_lin_grads", (74, 192)) in calls) == one and (("_qkv_grads", 3) in calls) != one, calls
    want = _run(ref, x, c, g)
    high = _run(_pair(dtype=torch.float64, std=0.05)[0], x.double(), c.double(), g.double())
    for name, a, lo, hi in zip(_names(ours), got, want, high):
        assert_within_reference_error(name, a, lo, hi, floor=1e-5 if dtype == torch.float32 else 1e-3)


def _run_params(chain, blocks, x, c, g):
    """[g, out, dx, dc, *dparams of both blocks]."""
    xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
    out = chain(xi, ci)
    return [g, out.detach(), *torch.autograd.grad(out, [xi, ci, *blocks.parameters()], g)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)  # Triton on CPU tensors only under the interpreter (no GPU)
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
