"""The fp16 / bf16 loads and stores of the C++ CPU kernels (csrc/cpu/vec16.h: 16 lanes as two 8-lane
vectors, lane masks by arithmetic) convert as torch does, bit for bit, on the values where conversions
go wrong: ties, overflow to inf, fp16 subnormals and underflow to zero, NaN, inf, -0. The gated
residual x + gate * y is one fp32 product and one fp32 sum (no FMA), rounded once into the output
dtype, so its exact answer is torch's fp32 math cast by torch. C = 71: 64 channels through the vector
code, 7 through the scalar tail, and every value lands in both."""
import pytest
import torch

import genfast

SPECIAL = {
    torch.float16: [65504.0, 65519.0, 65520.0, 1e5, 6.1e-5, 6.0e-8, 2.9e-8, 3.0e-8, 1e-9, 1.00048828125,
                    1.000732421875, 2049.0, 2051.0, float("inf"), float("nan"), 0.0],
    torch.bfloat16: [3.39e38, 3.4e38, 1.00390625, 1.005859375, 257.0, 259.0, 1e-38, 1e-40, float("inf"),
                     float("nan"), 0.0],
}
# gate values whose products with x need rounding (fp16: into subnormals / overflow; bf16 likewise)
GATES = {torch.float16: [1.5, 3.0, 0.75, 1 / 1024, 1024.0], torch.bfloat16: [1.5, 3.0, 0.75, 2.0 ** -100, 2.0 ** 100]}


def _values(dtype, C=71):
    vals = torch.tensor(SPECIAL[dtype], dtype=torch.float32)
    vals = torch.cat([vals, -vals])
    rows = 2 * ((vals.numel() + C - 1) // C) + 1
    # every value repeated at shifting offsets: each one falls in the vector part and in the tail
    x = vals.repeat(rows * C // vals.numel() + 1)[: rows * C].view(1, rows, C)
    return x.to(dtype)


def _same_bits(a, b):
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_special_values_round_trip_and_products_round_once(dtype, use_backend):
    use_backend("cpu")
    x = _values(dtype)
    C = x.shape[-1]
    got = genfast.gated_residual(x, torch.ones(1, C, dtype=dtype), torch.zeros_like(x))  # load + store of x
    assert _same_bits(got, (x.float() + 0.0).to(dtype))  # x itself, but -0 + 0 = +0
    g = torch.Generator().manual_seed(0)
    zero = torch.zeros_like(x)
    for s in GATES[dtype]:
        # y * gate is exact in fp32 (a power of two, or 11 / 8-bit significands times 2-bit ones) and
        # is rounded once by the store: ties to even, overflow to inf, subnormals, underflow to 0
        y = (x.float() * (1 + torch.rand(x.shape, generator=g))).to(dtype)
        gate = torch.full((1, C), s, dtype=dtype)
        got = genfast.gated_residual(zero, gate, y)
        want = (zero.float() + gate.float()[:, None] * y.float()).to(dtype)
        assert _same_bits(got, want), s
