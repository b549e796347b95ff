"""genfast.patch(model) on tiny random diffusers transformers (DiT, PixArt, SD3, Flux) and the zoo
DiT: patched vs unpatched outputs and parameter gradients within the tolerance rule (fp32 patched
and fp32 unpatched, each against the unpatched model in fp64), unpatch / patch twice / report,
partial patches, torch.compile. Head dim 72, non-square latents, text lengths 7 with padded masks.
"""
import copy
import subprocess
import sys

import pytest
import torch

import genfast
from genfast.testing import assert_within_reference_error

diffusers = pytest.importorskip("diffusers", reason="needs the diffusers extra: pip install .[diffusers]")

HEADS, HEAD_DIM, TEXT, B = 2, 72, 7, 2


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised gates: every path must matter
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _text_mask():
    m = torch.ones(B + 1, TEXT)
    m[1, 4:] = 0   # padded text
    m[2] = 0       # all padding: every key is equally masked
    return m


def build(name, hw=(8, 6), layers=2):
    """(model, inputs) for a tiny random model; inputs are fp32."""
    torch.manual_seed(0)
    h, w = hw
    if name == "dit":  # diffusers' DiT unpatchifies square latents only
        m = diffusers.DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                            num_layers=layers, sample_size=h, patch_size=2,
                                            num_embeds_ada_norm=10)
        inputs = dict(hidden_states=torch.randn(B, 4, h, h), timestep=torch.tensor([3, 700]),
                      class_labels=torch.tensor([1, 9]))
    elif name == "pixart":
        m = diffusers.PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                               out_channels=8, num_layers=layers, cross_attention_dim=HEADS * HEAD_DIM,
                                               sample_size=8, patch_size=2, caption_channels=32,
                                               use_additional_conditions=False)
        inputs = dict(hidden_states=torch.randn(B + 1, 4, h, w), encoder_hidden_states=torch.randn(B + 1, TEXT, 32),
                      timestep=torch.tensor([3, 500, 999]), encoder_attention_mask=_text_mask(),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    elif name == "sd3":
        m = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=layers,
                                            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                            joint_attention_dim=32, caption_projection_dim=HEADS * HEAD_DIM,
                                            pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                            qk_norm="rms_norm")
        inputs = dict(hidden_states=torch.randn(B, 4, h, w), encoder_hidden_states=torch.randn(B, TEXT, 32),
                      pooled_projections=torch.randn(B, 16), timestep=torch.tensor([3.0, 700.0]))
    elif name == "flux":
        m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                             attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                             joint_attention_dim=32, pooled_projection_dim=16,
                                             axes_dims_rope=(8, 32, 32))
        n = (h // 2) * (w // 2)
        ids = torch.stack(torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij"), -1).reshape(n, 2)
        inputs = dict(hidden_states=torch.randn(B, n, 8), encoder_hidden_states=torch.randn(B, TEXT, 32),
                      pooled_projections=torch.randn(B, 16), timestep=torch.tensor([0.1, 0.9]),
                      img_ids=torch.cat([torch.zeros(n, 1), ids.float()], 1), txt_ids=torch.zeros(TEXT, 3))
    else:
        raise KeyError(name)
    return _randomize(m), inputs


def _cast(inputs, dtype):
    def one(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        return {k: one(x) for k, x in v.items()} if isinstance(v, dict) else v
    return {k: one(v) for k, v in inputs.items()}


def _run(model, inputs, dtype=torch.float32):
    return model(**_cast(inputs, dtype), return_dict=False)[0]


def _out_and_grads(model, inputs, weight, dtype=torch.float32):
    model.zero_grad(set_to_none=True)
    out = _run(model, inputs, dtype)
    (out.double() * weight).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def check_against_unpatched(name, layers=2, **patch_kwargs):
    """Patches a tiny model; asserts outputs and all parameter gradients within the tolerance rule."""
    model, inputs = build(name, layers=layers)
    ref64, ref32 = copy.deepcopy(model).double(), copy.deepcopy(model)
    state = {k: v.data_ptr() for k, v in model.state_dict().items()}
    handle = genfast.patch(model, **patch_kwargs)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == state  # the same tensors
    out, grads = _out_and_grads(model, inputs, _weight(ref32, inputs))
    hi, g_hi = _out_and_grads(ref64, inputs, _weight(ref32, inputs), torch.float64)
    lo, g_lo = _out_and_grads(ref32, inputs, _weight(ref32, inputs))
    assert_within_reference_error(f"{name} output", out, lo, hi, floor=1e-5)
    with torch.no_grad():  # inference takes other paths (cached fused q/k/v weights, GELU in place)
        assert_within_reference_error(f"{name} no-grad output", _run(model, inputs), lo, hi, floor=1e-5)
    assert grads.keys() == g_hi.keys() and len(grads) > 10
    for k in grads:
        assert_within_reference_error(f"{name} grad {k}", grads[k], g_lo[k], g_hi[k], floor=1e-5)
    return handle


_WEIGHTS = {}


def _weight(model, inputs):
    """A fixed random cotangent for the output, per model class."""
    key = type(model).__name__
    if key not in _WEIGHTS:
        with torch.no_grad():
            shape = _run(model, inputs).shape
        _WEIGHTS[key] = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return _WEIGHTS[key]


@pytest.mark.parametrize("name,expect", [
    ("dit", {"attention": 2, "block": 2, "norm": 2}),
    ("pixart", {"attention": 4, "block": 2}),
    ("sd3", {"attention": 2, "block": 2, "norm": 4}),  # norm1 x 2, norm1_context (zero, continuous), norm_out
    ("flux", {"attention": 2, "block": 2, "norm": 4}),
])
def test_patched_model_matches_unpatched(name, expect):
    handle = check_against_unpatched(name)
    counts = handle.report.counts()
    for kind, n in expect.items():
        assert counts[kind]["swapped"] >= n, (kind, str(handle.report))


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_padded_head_rows_give_the_same_answers(name, monkeypatch):
    """The path GPUs take at head dim 72 (PixArt), forced here: each of q, k, v projected with
    per-head padded rows (genfast.ops.qkv) and read in place; outputs and gradients unchanged."""
    import genfast.ops.qkv as qkv

    calls = []
    real = qkv.projection_heads
    monkeypatch.setattr(qkv, "qkv_head_width", lambda d, dtype, device: d + 8)
    monkeypatch.setattr(qkv, "projection_heads", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    check_against_unpatched(name)
    assert calls  # the padded path ran (self attention; PixArt's cross attention too)


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_patched_model_under_triton_interpreter(name, use_backend):
    use_backend("triton")  # the interpreter is slow: one block
    check_against_unpatched(name, layers=1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "flux"])
def test_patched_model_low_precision_on_gpu(name, dtype):
    model, inputs = build(name)
    ref32 = copy.deepcopy(model).cuda()
    low = copy.deepcopy(model).to("cuda", dtype)
    model = model.to("cuda", dtype)
    handle = genfast.patch(model)
    assert handle.report.counts()["attention"]["swapped"] > 0, str(handle.report)
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        hi, lo, got = _run(ref32, inputs), _run(low, inputs, dtype), _run(model, inputs, dtype)
    assert_within_reference_error(f"{name} {dtype}", got.float(), lo.float(), hi, floor=1e-3)


def test_patched_model_with_emulated_cuda_kernels(use_backend):
    """cuda_emu: the CUDA attention kernels take fp16/bf16 only, so on an fp32 model the attention
    layers keep diffusers' processors (and say why) while the blocks run the emulated CUDA kernels."""
    use_backend("cuda_emu")
    report = check_against_unpatched("dit").report
    assert report.counts()["attention"] == {"swapped": 0, "skipped": 2}
    assert all("attention" in e.reason for e in report.skipped if e.kind == "attention")
    assert report.counts()["block"]["swapped"] == 2


def test_unpatch_restores_the_exact_originals_and_patch_twice_is_harmless():
    model, inputs = build("pixart")
    blocks = list(model.transformer_blocks)
    procs = [(b.attn1.processor, b.attn2.processor) for b in blocks]
    with torch.no_grad():
        ref = _run(model, inputs)
        first = genfast.patch(model)
        second = genfast.patch(model)
        assert second.report.swapped == [] and len(second.report.skipped) == len(first.report.entries)
        assert {e.path for e in second.report.skipped if "already patched" in e.reason} == \
            {e.path for e in first.report.swapped}
        # (numerics: test_patched_model_matches_unpatched; the padded sample's -1e4 bias costs fp32 digits)
        torch.testing.assert_close(_run(model, inputs), ref, rtol=1e-3, atol=1e-3)
        second.unpatch()  # does nothing: the first handle owns the swaps
        assert "forward" in blocks[0].__dict__
        first.unpatch()
        first.unpatch()
    assert all(blk.attn1.processor is p1 and blk.attn2.processor is p2 for blk, (p1, p2) in zip(blocks, procs))
    assert not any("forward" in m.__dict__ or hasattr(m, "_genfast_patch") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(_run(model, inputs), ref)


def test_fused_weights_follow_in_place_weight_updates():
    model, inputs = build("dit")
    ref = copy.deepcopy(model)
    genfast.patch(model)
    with torch.no_grad():
        _run(model, inputs)  # caches the concatenated q/k/v weights
        for m in (model, ref):  # an optimizer step / load_state_dict writes in place
            m.transformer_blocks[0].attn1.to_k.weight.mul_(-1.5)
        want = _run(ref, inputs)
        assert_within_reference_error("after update", _run(model, inputs), want, want, floor=1e-5)


def test_context_manager_and_report_as_data():
    model, inputs = build("dit")
    with genfast.patch(model) as handle:
        assert type(model.transformer_blocks[0].attn1.processor).__name__ == "GenfastAttnProcessor"
        data = handle.report.as_dict()
        assert data["model"] == "DiTTransformer2DModel" and data["counts"]["block"]["swapped"] == 2
        assert "attention: 2 swapped" in str(handle.report)
    assert type(model.transformer_blocks[0].attn1.processor).__name__ == "AttnProcessor2_0"
    assert not handle.active


def test_unusual_processor_is_left_alone_reported_and_answers_unchanged():
    from diffusers.models.attention_processor import AttnProcessor

    model, inputs = build("dit")
    model.transformer_blocks[1].attn1.set_processor(AttnProcessor())  # the pre-2.0 processor
    with torch.no_grad():
        ref = _run(model, inputs)
        handle = genfast.patch(model)
        out = _run(model, inputs)
    left = [e for e in handle.report.skipped if e.kind == "attention"]
    assert [e.path for e in left] == ["transformer_blocks.1.attn1"] and "AttnProcessor" in left[0].reason
    assert handle.report.counts()["attention"]["swapped"] == 1
    assert_within_reference_error("partial", out, ref, ref, floor=1e-5)


def test_unsupported_dtype_keeps_the_original_code():
    model, inputs = build("dit")
    model = model.double()
    with torch.no_grad():
        ref = _run(model, inputs, torch.float64)
        handle = genfast.patch(model)
        assert handle.report.swapped == []
        assert all("float64" in e.reason for e in handle.report.skipped if e.path)  # "": the model itself
        assert torch.equal(_run(model, inputs, torch.float64), ref)


def test_general_float_mask_runs_the_original_processor():
    from genfast.patch._diffusers_attn import key_padding_mask

    bias = torch.zeros(2, 1, 5)
    bias[1, 0, 3:] = -10000.0
    kpm, ok = key_padding_mask(bias, 2, 5)
    assert ok and kpm.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert key_padding_mask(bias - 3.0 * (bias == 0), 2, 5)[1] is False  # a real bias, not padding
    assert key_padding_mask(bias < 0, 2, 5)[1] is False                  # bool masks: original processor
    assert key_padding_mask(torch.zeros(2, 4, 5), 2, 5)[1] is False      # varies over queries
    # diffusers' bias in the model's dtype: bf16 rounds it to -9984, and compares it with -1e4 rounded alike
    for dtype in (torch.float16, torch.bfloat16):
        low, low_ok = key_padding_mask((1 - (bias > -1).to(dtype)) * -10000.0, 2, 5)
        assert low_ok and torch.equal(low, kpm), dtype
    assert key_padding_mask(bias * 0.9984, 2, 5)[1] is False  # -9984 in fp32 is a bias, not padding


def test_pixart_bf16_text_mask_runs_genfast_attention(monkeypatch):
    """PixArt's bf16 text mask (bias -9984) takes genfast's processor path, not the original one."""
    model, inputs = build("pixart")
    ref = copy.deepcopy(model).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    genfast.patch(model)
    calls = []
    real = genfast.attention
    monkeypatch.setattr(genfast, "attention", lambda *a, **k: calls.append(k.get("key_padding_mask")) or real(*a, **k))
    with torch.no_grad():
        out = _run(model, inputs, torch.bfloat16)
        want = _run(ref, inputs, torch.bfloat16)
    assert any(m is not None for m in calls), calls  # the cross attention got the text mask as a key mask
    hi = _run(copy.deepcopy(ref).double(), inputs, torch.float64)
    assert_within_reference_error("pixart bf16 masked", out, want, hi, floor=1e-2)


def _sized_inputs(name, i):
    sizes = [(8, 8), (12, 12), (16, 16)] if name == "dit" else [(8, 6), (12, 8), (16, 10)]
    _, inputs = build(name, sizes[i], layers=1)
    for key in ("encoder_hidden_states", "encoder_attention_mask", "txt_ids"):  # text lengths 7, 6, 5
        if key in inputs:
            inputs[key] = inputs[key][..., : TEXT - i, :] if key == "encoder_hidden_states" else \
                inputs[key][: TEXT - i] if key == "txt_ids" else inputs[key][:, : TEXT - i]
    return inputs


@pytest.fixture
def genfast_under_compile(monkeypatch):
    """On the CPU the patched parts hand compiled code back to the original (Inductor fuses the
    same work; genfast._support.DEFER_TO_INDUCTOR_ON_CPU): off here, so genfast's path is compiled,
    as it is on GPUs."""
    from genfast.patch import _support

    monkeypatch.setattr(_support, "DEFER_TO_INDUCTOR_ON_CPU", False)


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3", "flux", "dit-deferred"])
def test_compile_fullgraph_without_recompiles(name, monkeypatch):
    """Three resolutions (and, for PixArt, text lengths): the first compiles, the second turns the
    sizes dynamic (torch.compile's default), the third reuses that graph; no graph break
    (fullgraph). Dynamo only (backend="eager"), to keep the suite fast: Inductor is checked below.
    "-deferred": the CPU default, where compiled code takes the original forwards (no graph break there either)."""
    from genfast.patch import _support

    deferred = name.endswith("-deferred")
    name = name.removesuffix("-deferred")
    monkeypatch.setattr(_support, "DEFER_TO_INDUCTOR_ON_CPU", deferred)
    torch._dynamo.reset()
    model, _ = build(name, layers=1)
    genfast.patch(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    counts = []
    for i in range(3):
        inputs = _sized_inputs(name, i)
        with torch.no_grad():
            eager, got = _run(model, inputs), _run(compiled, inputs)
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert counts[2] == counts[1], f"recompiled at the third size: graphs after each size {counts}"


def test_compile_inductor_equals_eager(genfast_under_compile):
    torch._dynamo.reset()
    model, inputs = build("pixart", layers=1)
    genfast.patch(model)
    with torch.no_grad():
        eager, got = _run(model, inputs), _run(torch.compile(model, fullgraph=True), inputs)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)


def test_attention_backend_registry():
    from diffusers.models.attention_dispatch import attention_backend, dispatch_attention_fn

    genfast.patch.register_attention_backend()
    q, k, v = (torch.randn(2, 9, 2, 72) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    ref = dispatch_attention_fn(q, k, v)
    with attention_backend("genfast"):
        out = dispatch_attention_fn(q, k, v)
        masked = dispatch_attention_fn(q, k, v, attn_mask=mask[:, None, None, :])  # bool: the native path
    assert_within_reference_error("registry", out, ref, ref, floor=1e-5)
    assert_within_reference_error("registry bool mask", masked, ref, ref, floor=1e-5)
    model, inputs = build("flux")
    with torch.no_grad():
        ref = _run(model, inputs)
        model.set_attention_backend("genfast")
        assert_within_reference_error("set_attention_backend", _run(model, inputs), ref, ref, floor=1e-5)


def test_zoo_dit():
    from genfast.zoo import _ops
    from genfast.zoo.dit import DiT, DiTBlock

    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=1, hidden_size=96, depth=2, num_heads=2).eval()
    _randomize(model)
    report = genfast.patch(model).report
    assert report.swapped == [] and {e.reason for e in report.skipped} == {"already runs genfast's kernels"}
    for i, blk in enumerate(model.blocks):  # the plain-PyTorch fallback blocks, same state dict
        plain = DiTBlock(96, 2)
        plain.load_state_dict(blk.state_dict())
        model.blocks[i] = plain
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10])
    with torch.no_grad(), _ops.use_genfast(False):
        ref = model(x, t, y)
        handle = genfast.patch(model)
        assert handle.report.counts()["block"]["swapped"] == 2
        out = model(x, t, y)
    assert_within_reference_error("zoo", out, ref, ref, floor=1e-5)


def test_bad_arguments_name_the_argument():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        genfast.patch("DiT")
    with pytest.raises(TypeError, match="attention must be a bool"):
        genfast.patch(torch.nn.Linear(2, 2), attention=1)


def test_missing_diffusers_names_the_extra():
    code = ("import sys; sys.modules['diffusers'] = None; import genfast.patch\n"
            "try:\n    genfast.patch.register_attention_backend()\nexcept ImportError as e:\n"
            "    assert 'genfast[diffusers]' in str(e), e\nelse:\n    raise SystemExit('no error')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_import_genfast_never_imports_diffusers():
    code = ("import sys, genfast, genfast.patch, torch; genfast.patch(torch.nn.Linear(2, 2)); "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_feed_forward_with_hooks_calls_the_modules():
    """genfast's FeedForward path skips calling the GELU and Dropout modules: with a hook on one of them
    it calls the FeedForward as diffusers does, so the hook fires and changes the result alike."""
    from diffusers.models.attention import FeedForward

    from genfast.patch._diffusers_blocks import feed_forward

    torch.manual_seed(0)
    ff = FeedForward(16, activation_fn="gelu-approximate").eval()
    h = torch.randn(2, 5, 16)
    torch.testing.assert_close(feed_forward(ff, h), ff(h), rtol=1e-5, atol=1e-5)
    calls = []
    ff.net[0].register_forward_hook(lambda mod, inp, out: calls.append(1) or out * 2)
    torch.testing.assert_close(feed_forward(ff, h), ff(h), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # once in genfast's call, once in the plain one


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_feed_forward_folds_fc1_bias_into_the_gelu_on_torch_blas(monkeypatch):
    """fp32 CPU inference on torch's BLAS (Intel's MKL): the first Linear runs as a GEMM into a kept
    buffer and its bias is added in the GELU pass, with the answer of Linear + GELU; the buffer is
    reused by the next call. Not taken with autograd, non-contiguous tokens, a torch function mode,
    bf16 or oneDNN."""
    from diffusers.models.attention import FeedForward

    from genfast.ops import linear as linear_ops
    from genfast.patch import _diffusers_blocks as blocks

    torch.manual_seed(0)
    ff = FeedForward(48, activation_fn="gelu-approximate").eval()
    h = torch.randn(3, 37, 48)
    fc1 = ff.net[0].proj
    monkeypatch.setattr(linear_ops, "USE_ONEDNN", False)  # torch's BLAS, as on Intel CPUs
    with torch.no_grad():
        assert blocks._fc1_folds(fc1, h)
        got = blocks.feed_forward(ff, h)
        kept = blocks._temp("ff_fc1", (3 * 37, 4 * 48), h).data_ptr()
        again = blocks.feed_forward(ff, h)
        assert blocks._temp("ff_fc1", (3 * 37, 4 * 48), h).data_ptr() == kept  # the same buffer each call
        monkeypatch.setattr(blocks, "FOLD_FC1_BIAS", False)
        plain = blocks.feed_forward(ff, h)
        monkeypatch.setattr(blocks, "FOLD_FC1_BIAS", True)
        want = ff(h)
        assert not blocks._fc1_folds(fc1, h.transpose(0, 1))
        with _PassThroughMode():  # a torch function mode sees every op: no raw kernel call
            assert not blocks._fc1_folds(fc1, h)
        assert not blocks._fc1_folds(fc1.to(torch.bfloat16), h.bfloat16())
        fc1.float()
        if linear_ops.onednn_available():
            monkeypatch.setattr(linear_ops, "USE_ONEDNN", True)
            assert not blocks._fc1_folds(fc1, h)
            monkeypatch.setattr(linear_ops, "USE_ONEDNN", False)
    assert not blocks._fc1_folds(fc1, h)  # autograd on: the bias needs its gradient
    assert torch.equal(got, again)
    if torch.backends.mkl.is_available():
        assert torch.equal(got, plain)  # MKL's addmm adds the bias to the finished product
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_patched_adaln_norm_with_a_hooked_norm_calls_it():
    """A patched AdaLayerNormZero whose inner LayerNorm has a hook runs diffusers' own forward, so the
    hook fires and changes the result as in the unpatched model."""
    from diffusers.models.normalization import AdaLayerNormZero

    torch.manual_seed(0)
    plain = AdaLayerNormZero(16, num_embeddings=None).eval()
    ours = AdaLayerNormZero(16, num_embeddings=None).eval()
    ours.load_state_dict(plain.state_dict())
    genfast.patch(ours)
    x, emb = torch.randn(2, 5, 16), torch.randn(2, 16)
    for m in (plain, ours):
        m.norm.register_forward_hook(lambda mod, inp, out: out * 2)
    for a, b in zip(ours(x, emb=emb), plain(x, emb=emb)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,where", [("dit", "norm3"), ("dit", "ff"), ("dit", "attn1"),
                                        ("sd3", "norm2"), ("sd3", "attn"), ("flux", "norm1.norm")])
def test_patched_blocks_honour_hooks_on_the_modules_they_skip(name, where):
    """A hook on a block's norm or FeedForward (modules the patched forwards do not call), or on an
    attention layer (whose processor they call directly when it has none), fires and changes the result
    as in the unpatched model: such a call runs diffusers' own forward (or the layer's own call)."""
    model, inputs = build(name, layers=1)
    ours = copy.deepcopy(model)
    genfast.patch(ours)
    for m in (model, ours):
        target = m.transformer_blocks[0]
        for part in where.split("."):
            target = getattr(target, part)
        target.register_forward_hook(lambda mod, inp, out: tuple(o * 0.5 for o in out) if isinstance(out, tuple)
                                     else out * 0.5)
    with torch.no_grad():
        torch.testing.assert_close(_run(ours, inputs), _run(model, inputs), rtol=1e-4, atol=1e-5)
