"""genfast: fused kernels for generative models, with the numbers of plain PyTorch.

    import genfast
    genfast.info()                                  # what was built, which backend runs each op
    x = genfast.flow_euler_step(x, v_cond, v_uncond, dt=dt, guidance=w, out=x)
    samples = genfast.sample_rectified_flow(model, shape, steps=50, guidance=4.0, labels=y, null_label=10)
"""
import pkgutil

# Run from a source checkout (`python -m genfast` in the repo root), this folder shadows the
# installed package; extend the path so the installed compiled modules and kernels still load.
__path__ = pkgutil.extend_path(__path__, __name__)

__version__ = "0.1.0"

from genfast import _native  # noqa: E402

_native.warn_if_cpu_module_missing()

from genfast.info import info  # noqa: E402
from genfast.ops import (  # noqa: E402
    adaln_modulate, code_counts, flow_euler_step, gated_residual, reparam_kl, reparam_kl_moments, vector_quantize,
    vq_nearest)
from genfast.ops.attention import attention  # noqa: E402
from genfast.sampling import sample_rectified_flow  # noqa: E402



def free_workspace():
    """Drops the buffers genfast keeps between calls to spare fresh pages every step (the CPU
    attention's score and probability buffers, the GELU kernel's output buffers, the fused DiT
    block's backward temporaries)."""
    from genfast.ops import attention_cpu, dit_block, gelu

    attention_cpu.free_workspace()
    gelu.free_workspace()
    dit_block.free_workspace()


# Subpackages loaded on first use, so that `import genfast` then `genfast.nn.DiTBlock(...)` works
# (as `torch.nn` after `import torch`) while `import genfast` stays light and never imports
# diffusers (genfast.patch, a callable module: genfast.patch(model)).
_LAZY = ("nn", "zoo", "patch", "testing", "reference", "integrations")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"genfast.{name}")
    raise AttributeError(f"module 'genfast' has no attribute {name!r}")


__all__ = ["info", "nn", "zoo", "patch", "flow_euler_step", "sample_rectified_flow", "attention", "adaln_modulate", "gated_residual",
           "vq_nearest", "vector_quantize", "code_counts", "reparam_kl", "reparam_kl_moments", "free_workspace",
           "__version__"]
