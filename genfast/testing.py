"""Sample inputs and the tolerance rule shared by genfast's tests (and usable by yours).

One generator per op feeds its numerics, gradient, opcheck and compile tests (the pattern of
pytorch/extension-cpp). The tolerance rule is FlashAttention's (DESIGN.md §5): genfast's error
against a high-precision reference must be at most twice the error of the plain-PyTorch reference
run in the same low precision, plus a small floor.
"""
import os
from dataclasses import dataclass, field

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def with_backend(name, fn):
    """fn run with GENFAST_BACKEND=name: a benchmark row timing one backend through the dispatcher
    (a backend that cannot run the case raises, and the row is reported as skipped)."""
    def run():
        old = os.environ.get("GENFAST_BACKEND")
        os.environ["GENFAST_BACKEND"] = name
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["GENFAST_BACKEND"]
            else:
                os.environ["GENFAST_BACKEND"] = old
    return run


def backends_to_test():
    """(device, backend) pairs a test suite can run on this machine: CPU tensors through the C++
    kernels, the emulated CUDA kernels and (without a GPU) the Triton interpreter; CUDA tensors
    through the CUDA and Triton kernels when a GPU is visible. A missing compiled module makes its
    tests fail, not skip: CI must notice when a build is gone."""
    gpu = torch.cuda.is_available()
    cpu = ["reference", "cpu", "cuda_emu"] + ([] if gpu else ["triton"])
    return [("cpu", b) for b in cpu] + [("cuda", b) for b in (["cuda", "triton"] if gpu else [])]


def assert_within_reference_error(name, got, ref_low, ref_high, *, floor=1e-6):
    """|got - ref_high| <= 2 |ref_low - ref_high| + floor * max(1, |ref_high|), elementwise max."""
    got, ref_low, ref_high = got.double(), ref_low.double(), ref_high.double()
    if got.shape != ref_high.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference {tuple(ref_high.shape)}")
    if got.numel() == 0:
        return
    nan_got, nan_ref = got.isnan(), ref_high.isnan()
    if not torch.equal(nan_got, nan_ref):
        raise AssertionError(f"{name}: NaN pattern differs from the reference")
    keep = ~nan_ref
    err = (got - ref_high)[keep].abs().max().item()
    ref_err = (ref_low - ref_high)[keep].abs().max().item()
    scale = max(1.0, ref_high[keep].abs().max().item())
    bound = 2 * ref_err + floor * scale
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3g} exceeds {bound:.3g} (2 x reference error {ref_err:.3g} + floor)")


@dataclass
class FlowStepCase:
    """One call of flow_euler_step: tensors, keyword arguments and a name for the test id."""
    name: str
    x: torch.Tensor
    v_cond: torch.Tensor
    v_uncond: torch.Tensor = None
    kwargs: dict = field(default_factory=dict)

    def args(self):
        return (self.x, self.v_cond) if self.v_uncond is None else (self.x, self.v_cond, self.v_uncond)

    def leaves(self):
        """The same case with every floating tensor a fresh leaf that requires grad."""
        def leaf(t):
            return t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        return FlowStepCase(self.name, leaf(self.x), leaf(self.v_cond), leaf(self.v_uncond),
                            {k: leaf(v) for k, v in self.kwargs.items()})


def flow_step_samples(device="cpu", dtype=torch.float32, *, large=False, seed=0):
    """Cases covering what flow_euler_step promises: CFG and plain steps, per-sample and 0-d dt and
    guidance, the two halves of a doubled batch, non-contiguous views, odd and empty sizes."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    b = 3
    cases = [
        FlowStepCase("cfg_float", rnd(b, 4, 5, 7), rnd(b, 4, 5, 7), rnd(b, 4, 5, 7), dict(dt=0.02, guidance=4.0)),
        FlowStepCase("euler", rnd(b, 4, 5, 7), rnd(b, 4, 5, 7), None, dict(dt=0.1)),
        FlowStepCase("one_element", rnd(1), rnd(1), rnd(1), dict(dt=0.5, guidance=1.5)),
        FlowStepCase("seven", rnd(1, 7), rnd(1, 7), rnd(1, 7), dict(dt=0.25, guidance=2.0)),
        FlowStepCase("per_sample", rnd(b, 33), rnd(b, 33), rnd(b, 33),
                     dict(dt=torch.rand(b, generator=g).to(device) * 0.1, guidance=torch.rand(b, generator=g).to(device) * 8)),
        FlowStepCase("zero_dim_dt", rnd(b, 2, 9), rnd(b, 2, 9), rnd(b, 2, 9),
                     dict(dt=torch.tensor(0.03).to(device), guidance=torch.tensor(7.5).to(device))),
        FlowStepCase("guidance_zero", rnd(b, 17), rnd(b, 17), rnd(b, 17), dict(dt=0.1, guidance=0.0)),
        FlowStepCase("guidance_large", rnd(b, 17), rnd(b, 17), rnd(b, 17), dict(dt=0.01, guidance=100.0)),
        FlowStepCase("empty", rnd(0, 4, 8), rnd(0, 4, 8), rnd(0, 4, 8), dict(dt=0.1, guidance=1.0)),
        FlowStepCase("empty_cols", rnd(b, 0), rnd(b, 0), rnd(b, 0), dict(dt=0.1, guidance=1.0)),
    ]
    doubled = rnd(2 * b, 4, 6, 5)  # a CFG model's doubled-batch output: halves are strided views
    vc, vu = doubled.chunk(2)
    cases.append(FlowStepCase("doubled_batch_halves", rnd(b, 4, 6, 5), vc, vu, dict(dt=0.05, guidance=3.0)))
    nchw = rnd(b, 6, 5, 4)  # channels-last views: non-mergeable strides, the op must copy or cope
    cases.append(FlowStepCase("permuted", nchw.permute(0, 2, 3, 1), rnd(b, 6, 5, 4).permute(0, 2, 3, 1),
                              rnd(b, 6, 5, 4).permute(0, 2, 3, 1), dict(dt=0.2, guidance=1.0)))
    cases.append(FlowStepCase("column_stride_2", rnd(b, 40)[:, ::2], rnd(b, 40)[:, ::2], rnd(b, 41)[:, 1::2],
                              dict(dt=0.2, guidance=0.5)))
    if large:
        cases.append(FlowStepCase("1000003", rnd(1, 1000003), rnd(1, 1000003), rnd(1, 1000003), dict(dt=0.02, guidance=2.0)))
    return cases


@dataclass
class ModulateCase:
    """One call of adaln_modulate (x, shift, scale, kwargs) or gated_residual (x, gate=scale, y=y)."""
    name: str
    x: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    y: torch.Tensor = None
    kwargs: dict = field(default_factory=dict)

    def leaves(self):
        """The same case with every tensor a fresh leaf that requires grad (views become copies)."""
        def leaf(t):
            return t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t
        return ModulateCase(self.name, leaf(self.x), leaf(self.shift), leaf(self.scale), leaf(self.y), dict(self.kwargs))


def modulate_samples(device="cpu", dtype=torch.float32, *, seed=0):
    """Cases covering what adaln_modulate and gated_residual promise: per-sample [B, C], [B, 1, C]
    and per-token [B, N, C] modulation, no shift, layer and rms, channel counts that are not a
    multiple of the vector width, N spanning several reduction chunks, strided x (including a
    non-unit channel stride), shift/scale/gate as chunks of one adaLN projection, large-magnitude
    inputs, one token and empty tensors. `y` is set for the gated residual (gate = scale)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=device, dtype=dtype)

    def case(name, b, n, c, *, per_token=False, shift=True, **kw):
        mshape = (b, n, c) if per_token else (b, c)
        return ModulateCase(name, rnd(b, n, c), rnd(*mshape, s=0.5) if shift else None, rnd(*mshape, s=0.5),
                            rnd(b, n, c), kw)

    cases = [
        case("per_sample", 2, 17, 40),
        case("per_sample_rms", 2, 17, 40, norm="rms"),
        case("per_token", 2, 5, 33, per_token=True),
        case("no_shift_rms", 3, 7, 64, shift=False, norm="rms"),
        case("no_shift_layer", 2, 9, 19, shift=False),
        case("one_token", 1, 1, 8),
        case("one_channel", 2, 3, 1, norm="rms"),  # layer norm of one channel is identically 0
        case("chunks", 2, 67, 24, eps=1e-5),
        case("dit_width", 2, 3, 1152),
        case("wide_row", 1, 5, 1600),  # wider than the CUDA kernels keep in registers
    ]
    x = rnd(2, 6, 21)
    cases.append(ModulateCase("b1c", x, rnd(2, 1, 21), rnd(2, 1, 21), rnd(2, 6, 21)))
    cases.append(ModulateCase("mixed_forms", x, rnd(2, 6, 21), rnd(2, 21), rnd(2, 6, 21)))
    cases.append(ModulateCase("mixed_forms2", x, rnd(2, 21), rnd(2, 6, 21), rnd(2, 6, 21)))
    ada = rnd(3, 6 * 48)  # DiT's adaLN Linear output: six [B, C] chunks, each a strided view
    sh, sc, gt = ada.chunk(6, dim=1)[:3]
    cases.append(ModulateCase("adaln_chunks", rnd(3, 10, 48), sh, sc, rnd(3, 10, 48)))
    cases.append(ModulateCase("strided_x", rnd(2, 14, 30)[:, ::2, :], rnd(2, 30), rnd(2, 30), rnd(2, 7, 30)))
    cases.append(ModulateCase("channel_stride", rnd(2, 20, 6).transpose(1, 2), rnd(2, 20), rnd(2, 20),
                              rnd(2, 20, 6).transpose(1, 2)))
    cases.append(ModulateCase("token_major", rnd(5, 2, 16).transpose(0, 1), rnd(2, 16), rnd(2, 16), rnd(2, 5, 16)))
    # [B, C] modulations reach the kernels' wrappers as they are: one with a non-unit channel stride
    cases.append(ModulateCase("modulation_channel_stride", rnd(2, 9, 12), rnd(12, 2).t(), rnd(12, 2).t(),
                              rnd(2, 9, 12)))
    big = 1000 + torch.randn(2, 4, 64, generator=g)  # fp16: x^2 overflows, E[x^2] - mean^2 cancels
    cases.append(ModulateCase("magnitude_1000", big.to(device=device, dtype=dtype), rnd(2, 64), rnd(2, 64),
                              rnd(2, 4, 64)))
    cases.append(case("empty_batch", 0, 5, 8))
    cases.append(case("empty_tokens", 2, 0, 8))
    cases.append(case("empty_tokens_per_token", 2, 0, 8, per_token=True))
    return cases


# ------------------------------------------------------------------------------------------ VQ
@dataclass
class VqCase:
    """One call of vq_nearest / vector_quantize: z [..., D], codebook [K, D], a metric."""
    name: str
    z: torch.Tensor
    codebook: torch.Tensor
    metric: str = "l2"


def vq_samples(device="cpu", dtype=torch.float32, *, heavy=False, seed=0, codebook_dtype=None):
    """Cases covering what vq_nearest promises: odd D (3 to 512), K from 1 up, N not a multiple of
    any tile, channels-first latents permuted to channels-last (read in place), leading dims that
    do not fold (copied), a strided codebook, empty N, both metrics. heavy adds K = 65536."""
    g = torch.Generator().manual_seed(seed)
    cdt = codebook_dtype or dtype

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    cases = [
        VqCase("basic", rnd(37, 16), rnd(50, 16, dt=cdt)),
        VqCase("d3_k1", rnd(5, 3), rnd(1, 3, dt=cdt)),
        VqCase("one_row", rnd(1, 9), rnd(131, 9, dt=cdt)),
        VqCase("d5_batch", rnd(3, 7, 5), rnd(67, 5, dt=cdt)),
        VqCase("d33", rnd(67, 33), rnd(200, 33, dt=cdt)),
        VqCase("d512", rnd(13, 512), rnd(70, 512, dt=cdt)),
        VqCase("cosine", rnd(29, 24), rnd(90, 24, dt=cdt) * torch.rand(90, 1, generator=g).to(device, cdt) * 5, "cosine"),
        VqCase("empty", rnd(0, 16), rnd(10, 16, dt=cdt)),
        VqCase("empty_batch", rnd(2, 0, 8), rnd(10, 8, dt=cdt), "cosine"),
    ]
    fmap = rnd(2, 12, 5, 3)  # channels-first latents [B, C, H, W] seen as [B, H, W, C]: in place
    cases.append(VqCase("channels_last_view", fmap.permute(0, 2, 3, 1), rnd(40, 12, dt=cdt)))
    cases.append(VqCase("channels_last_cosine", fmap.permute(0, 2, 3, 1), rnd(40, 12, dt=cdt), "cosine"))
    odd = rnd(3, 4, 6, 10)[:, ::2, ::2, :]  # three non-foldable leading dims: the op copies
    cases.append(VqCase("unfoldable", odd, rnd(33, 10, dt=cdt)))
    cases.append(VqCase("strided_codebook", rnd(21, 6), rnd(6, 150, dt=cdt).T[::2]))
    if heavy:
        cases.append(VqCase("k65536_d3", rnd(70, 3), rnd(65536, 3, dt=cdt)))
        cases.append(VqCase("k4097_d129", rnd(300, 129), rnd(4097, 129, dt=cdt)))
    return cases


def vq_score_tolerance(z2, codebook, metric):
    """Per-row bound on how far an fp32 score (csrc/vq.h) can be from the exact one: the dot
    products' rounding, |sum fl - sum| <= (D + 2) u sum |z_i c_i| (u = 2^-24), applied to the
    largest code, plus the rounding of |c|^2. Inputs are fp64 copies of the (rounded) inputs."""
    d = codebook.shape[1]
    u = 2.0 ** -24
    zn = z2.norm(dim=1)
    cn = codebook.norm(dim=1).max()
    gamma = 2 * (d + 4) * u  # twice the textbook bound: the -2 and 1/|c| scalings round too
    if metric == "cosine":
        return gamma * zn
    return gamma * (2 * zn * cn + cn * cn)


def assert_vq_indices(name, idx, z, codebook, metric="l2", slack=1.0):
    """Indices equal the fp64 argmin wherever the best and second-best scores differ by more than
    the fp32 rounding bound (times slack); elsewhere the chosen code scores within that bound of the
    minimum. A row of z containing NaN must get index 0."""
    d = codebook.shape[1]
    from genfast import reference

    assert idx.dtype == torch.int64, f"{name}: indices dtype {idx.dtype}"
    assert idx.shape == z.shape[:-1], f"{name}: indices shape {tuple(idx.shape)} != {tuple(z.shape[:-1])}"
    if idx.numel() == 0:
        return
    z2 = z.reshape(-1, d).double().cpu()
    c = codebook.double().cpu()
    got = idx.reshape(-1).cpu()
    nan_rows = z2.isnan().any(1)
    assert (got[nan_rows] == 0).all(), f"{name}: rows with NaN must get index 0"
    z2, got = z2[~nan_rows], got[~nan_rows]
    assert ((got >= 0) & (got < c.shape[0])).all(), f"{name}: index out of range"
    s = reference.vq_scores(z2, c, metric)
    tol = slack * vq_score_tolerance(z2, c, metric)
    best, want = s.min(1)
    chosen = s.gather(1, got[:, None])[:, 0]
    bad = chosen > best + tol
    assert not bad.any(), (f"{name}: {int(bad.sum())} rows chose a code scoring more than the rounding bound above "
                           f"the minimum (worst excess {(chosen - best - tol).max().item():.3g})")
    if c.shape[0] > 1:
        second = s.scatter(1, want[:, None], float("inf")).min(1).values
        clear = second - best > 2 * tol
        mism = clear & (got != want)
        assert not mism.any(), f"{name}: {int(mism.sum())} of {int(clear.sum())} clearly separated rows differ"
    else:
        assert (got == 0).all()
# ------------------------------------------------------------------------------- reparam_kl
@dataclass
class ReparamKLCase:
    """One call of reparam_kl: mu, logvar and keyword arguments (no seed/noise: tests add them)."""
    name: str
    mu: torch.Tensor
    logvar: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def leaves(self):
        """mu and logvar as fresh leaves that require grad (the same strides kept via clone)."""
        return (self.mu.detach().clone().requires_grad_(True), self.logvar.detach().clone().requires_grad_(True))


def reparam_kl_samples(device="cpu", dtype=torch.float32, *, seed=0, large=False):
    """Cases covering what reparam_kl promises: the two chunks of one encoder output (strided
    views), odd sizes (rows not a multiple of Philox's 4 words, blocks cut mid-row), 1-D latents,
    empty batch and empty latents, extreme logvar (clamped and not), every reduction, free bits,
    channels-last views that must be copied, column strides."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    b = 3
    enc = rnd(b, 8, 5, 7)
    mu_h, lv_h = enc.chunk(2, dim=1)  # the halves of one encoder output: strided views
    cases = [
        ReparamKLCase("chunk_halves", mu_h, lv_h),
        ReparamKLCase("contiguous_4d", rnd(b, 4, 5, 7), rnd(b, 4, 5, 7)),
        ReparamKLCase("odd_cols_1001", rnd(2, 1001), rnd(2, 1001, scale=2.0), dict(reduction="sum")),
        ReparamKLCase("one_d", rnd(5), rnd(5), dict(reduction="mean")),
        ReparamKLCase("single", rnd(1, 3), rnd(1, 3), dict(reduction="none")),
        ReparamKLCase("empty_batch", rnd(0, 4, 3), rnd(0, 4, 3)),
        ReparamKLCase("empty_latent", rnd(b, 0), rnd(b, 0)),
        ReparamKLCase("extreme_logvar", rnd(2, 37), (torch.tensor([50.0, -50.0]).repeat(37)[:37] * torch.ones(2, 1)).to(
            device=device, dtype=dtype)),
        ReparamKLCase("no_clamp", rnd(2, 19), rnd(2, 19, scale=3.0), dict(logvar_clamp=None, reduction="none")),
        ReparamKLCase("narrow_clamp", rnd(2, 19), rnd(2, 19, scale=3.0), dict(logvar_clamp=(-1.0, 0.5))),
        ReparamKLCase("free_bits", rnd(4, 2, 3), rnd(4, 2, 3), dict(free_bits=0.6)),
        ReparamKLCase("free_bits_none", rnd(4, 6), rnd(4, 6), dict(free_bits=0.4, reduction="none")),
        ReparamKLCase("channels_last", rnd(b, 5, 4, 6).permute(0, 2, 3, 1), rnd(b, 5, 4, 6).permute(0, 2, 3, 1)),
        ReparamKLCase("column_stride_2", rnd(b, 40)[:, ::2], rnd(b, 41)[:, 1::2], dict(reduction="mean")),
    ]
    if large:  # several CPU work items per row and blocks that do not divide the row
        cases.append(ReparamKLCase("rows_of_40003", rnd(2, 40003), rnd(2, 40003)))
    return cases


@dataclass
class AttentionCase:
    """One call of genfast.attention: q, k, v, keyword arguments and a name for the test id."""
    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def args(self):
        return self.q, self.k, self.v

    def leaves(self, dtype=None):
        """q, k, v as fresh leaves that require grad (in `dtype` when given)."""
        return tuple(t.detach().to(dtype or t.dtype).requires_grad_(True) for t in self.args())


def attention_samples(device="cpu", dtype=torch.float32, *, long=False, seed=0):
    """Cases covering what attention promises: lengths around the block sizes, head dims 32 and 72,
    cross attention with text-length keys, causal, key padding masks with a fully masked sample,
    q/k/v as strided views of one fused qkv projection, a non-unit last stride, empty batches.
    long=True adds what the interpreter/emulation are too slow for: lengths 257 and 1000, 333 text
    tokens, head dims 64, 80, 96, 128."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def mask(b, nk, p=0.3):
        return (torch.rand(b, nk, generator=g) > p).to(device)

    def self_case(name, b, h, n, d, **kw):
        return AttentionCase(name, rnd(b, h, n, d), rnd(b, h, n, d), rnd(b, h, n, d), kw)

    def cross_case(name, b, h, nq, nk, d, **kw):
        return AttentionCase(name, rnd(b, h, nq, d), rnd(b, h, nk, d), rnd(b, h, nk, d), kw)

    cases = [
        self_case("n1_d32", 2, 2, 1, 32),
        self_case("n17_d72", 2, 2, 17, 72),
        self_case("n64_d32", 1, 2, 64, 32),
        self_case("n127_d72", 1, 2, 127, 72),
        self_case("n129_d32_scale", 1, 1, 129, 32, scale=0.3),
        cross_case("cross_17x77_d72", 2, 2, 17, 77, 72),
        self_case("causal_n127_d72", 1, 2, 127, 72, causal=True),
        cross_case("causal_cross_29x17_d32", 1, 2, 29, 17, 32, causal=True),
    ]
    m = mask(3, 77)
    m[1] = False  # a fully padded sample: its rows must be zeros
    cases.append(cross_case("mask_33x77_d72", 3, 2, 33, 77, 72, key_padding_mask=m))
    m = mask(2, 40)
    m[:, :5] = False  # causal rows 0..4 see no key
    cases.append(self_case("causal_mask_n40_d32", 2, 1, 40, 32, causal=True, key_padding_mask=m.clone()))
    m[:, 5:] = True
    cases.append(self_case("mask_none_masked_n40_d32", 2, 1, 40, 32, key_padding_mask=torch.ones_like(m)))
    # One fused qkv projection [B, N, 3 * H * D] read as three [B, H, N, D] views (no copy).
    b, n, h, d = 2, 33, 2, 72
    qkv = rnd(b, n, 3 * h * d).view(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    cases.append(AttentionCase("qkv_views_n33_d72", qkv[0], qkv[1], qkv[2]))
    t = rnd(1, 2, 32, 20).transpose(-1, -2)  # last-dim stride != 1
    cases.append(AttentionCase("transposed_d32", t, rnd(1, 2, 32, 20).transpose(-1, -2), rnd(1, 2, 20, 32)))
    cases.append(self_case("empty_batch", 0, 2, 16, 32))
    cases.append(cross_case("no_keys", 1, 2, 5, 0, 32))
    if long:
        cases += [
            self_case("n257_d64", 1, 2, 257, 64),
            self_case("n1000_d72", 1, 2, 1000, 72, causal=True),
            self_case("n128_d80", 1, 2, 128, 80),
            cross_case("cross_120x333_d96", 1, 2, 120, 333, 96, key_padding_mask=mask(1, 333)),
            self_case("n129_d128", 1, 2, 129, 128),
        ]
    return cases
