"""The rectified-flow sampling step: genfast.flow_euler_step vs eager PyTorch and torch.compile.

genfast runs in place (out=x) as the sampler calls it; eager and torch.compile return a new tensor,
as a user's `x = x - dt * v` does. Bytes per call: read x, v_cond (, v_uncond), write the result.
"""
import pytest
import torch

genfast = pytest.importorskip("genfast", reason="genfast is not importable: build and install it (pip install .)")

DT, W = 0.02, 4.0  # 50 steps; CFG scale 5 in the (1 + w) v_c - w v_u form
CUDA = torch.cuda.is_available()
SHAPES = [(8, 4, 32, 32), (8, 16, 64, 64), (16, 16, 64, 64)] + ([(64, 16, 128, 128)] if CUDA else [])
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGETS = None if CUDA else {"eager": 2.0, "compile": 1.0}  # the CPU targets
NOTE = "genfast in place (out=x); eager and torch.compile out of place (new tensor)"


def cfg_step(x, v_cond, v_uncond, dt, w):
    # the baseline exactly as a user writes it
    return x - dt * ((1 + w) * v_cond - w * v_uncond)


def euler_step(x, v, dt):
    return x - dt * v


def _backend(x):
    try:
        return genfast.ops.flow_step.backend_for(x)
    except Exception:  # an internal helper: the benchmark must not depend on it
        return "?"


def _inputs(shape, dtype, device, cfg=True):
    x = torch.randn(shape, dtype=dtype, device=device)
    # CFG: the model ran once on the doubled batch; v_cond / v_uncond are its two halves (views)
    v = torch.randn((2 * shape[0] if cfg else shape[0], *shape[1:]), dtype=dtype, device=device)
    return (x, *v.chunk(2)) if cfg else (x, v)


def _check(got, x, *vs):
    """The benchmarked call must be right: genfast's result vs the fp32 formula, in x's dtype."""
    ref = cfg_step(x.float(), vs[0].float(), vs[1].float(), DT, W) if len(vs) == 2 else euler_step(x.float(), vs[0].float(), DT)
    torch.testing.assert_close(got, ref.to(x.dtype))


def _name(shape):
    return "x".join(map(str, shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_name)
def test_cfg_step(compare, shape, dtype):
    x, vc, vu = _inputs(shape, DTYPES[dtype], compare.device)
    _check(genfast.flow_euler_step(x, vc, vu, dt=DT, guidance=W), x, vc, vu)
    compiled = compare.compile(cfg_step)
    compare(f"cfg {dtype} {_name(shape)}", {
        "genfast": lambda: genfast.flow_euler_step(x, vc, vu, dt=DT, guidance=W, out=x),
        "eager": lambda: cfg_step(x, vc, vu, DT, W),
        "compile": lambda: compiled(x, vc, vu, DT, W),
    }, bytes=4 * x.numel() * x.element_size(), targets=TARGETS, note=f"{NOTE}; genfast backend: {_backend(x)}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_euler_step(compare, dtype):
    shape = SHAPES[-1] if CUDA else SHAPES[1]
    x, v = _inputs(shape, DTYPES[dtype], compare.device, cfg=False)
    _check(genfast.flow_euler_step(x, v, dt=DT), x, v)
    compiled = compare.compile(euler_step)
    compare(f"euler {dtype} {_name(shape)}", {
        "genfast": lambda: genfast.flow_euler_step(x, v, dt=DT, out=x),
        "eager": lambda: euler_step(x, v, DT),
        "compile": lambda: compiled(x, v, DT),
    }, bytes=3 * x.numel() * x.element_size(), targets=TARGETS, note=f"{NOTE}; genfast backend: {_backend(x)}")


def test_call_overhead(compare):
    """Tiny latents: the step is launch-bound, so this is the per-call cost (us/call) of each path."""
    shape = (2, 4, 8, 8)
    x, vc, vu = _inputs(shape, torch.float32, compare.device)
    _check(genfast.flow_euler_step(x, vc, vu, dt=DT, guidance=W), x, vc, vu)
    compiled = compare.compile(cfg_step)
    compare(f"overhead cfg fp32 {_name(shape)}", {
        "genfast": lambda: genfast.flow_euler_step(x, vc, vu, dt=DT, guidance=W, out=x),
        "eager": lambda: cfg_step(x, vc, vu, DT, W),
        "compile": lambda: compiled(x, vc, vu, DT, W),
    }, note="per-call overhead (us/call), launch-bound; " + NOTE)
