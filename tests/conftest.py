"""Test setup: without a GPU the Triton kernels run under the interpreter, which must be chosen
before triton is imported; backends are forced per test through GENFAST_BACKEND."""
import os
import sys

# pytest-xdist workers (README: `pytest -n 2` on 2 cores) each run torch's 2 OpenMP threads: 4 threads
# on 2 cores, whose default spin-waiting at every parallel region's barrier burns the other worker's
# time slices. Sleeping waits there (read by libgomp when torch loads it, so set before the import):
# the zoo's small flow run took 226 s as one of two concurrent processes, 49 s with passive waits,
# 45 s with one thread each (which would drop the kernels' 2-thread paths from the tests).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Inductor's on-disk caches are keyed without the custom ops' fake implementations: a graph
# compiled against an older fake (e.g. other gradient strides) would be reused and fail its
# stride asserts. CI starts cold anyway; locally every test compiles afresh.
import torch._inductor.config  # noqa: E402

torch._inductor.config.force_disable_caches = True

HAS_GPU = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend('cuda_emu') forces that backend for the rest of the test."""
    def force(name):
        monkeypatch.setenv("GENFAST_BACKEND", name)
    return force


@pytest.fixture
def reuse_small_buffers(monkeypatch):
    """Kept buffers (genfast.ops._common.reused_buffer) for every size, so that tests of the reuse
    can use tiny shapes (outside tests, buffers under REUSE_MIN_BYTES are plain torch.empty)."""
    from genfast.ops import _common

    monkeypatch.setattr(_common, "REUSE_MIN_BYTES", 0)


@pytest.fixture
def cpu_way(use_backend, monkeypatch):
    """cpu_way(dtype, way): the CPU backend, with every shape of dtype taking that attention way
    (genfast.ops.attention_cpu.variant)."""
    from genfast.ops import attention_cpu

    def force(dtype, way):
        use_backend("cpu")
        monkeypatch.setattr(attention_cpu, "FITS", {**attention_cpu.FITS, dtype: way})
        monkeypatch.setattr(attention_cpu, "FUSED_FROM_KEYS", {})
        monkeypatch.setattr(attention_cpu, "FUSED_BELOW_KEYS", {})
        monkeypatch.setattr(attention_cpu, "CAUSAL_FUSED_FROM_KEYS", {})
        monkeypatch.setattr(attention_cpu, "SMALL16_FROM_HEADS", 0)  # bf16 "small" with any head count
        monkeypatch.setattr(attention_cpu, "SMALL32_FROM", None)  # fp32 "small" at any size (Intel's limits off)
        monkeypatch.setattr(attention_cpu, "TINY16", None)  # bf16 too (AMX CPUs: not the tiniest cases)
        monkeypatch.setattr(attention_cpu, "BF16_GEMMS", True)  # genfast's bf16 ways on any CPU
    return force


# Shared test helpers that are not test modules (diffusers_tiny.py, zoo_tiny.py): importable by name. The
# checkout's root stays off sys.path, so the tests still exercise the installed package.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
