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
from genfast.ops import flow_euler_step  # noqa: E402
from genfast.ops.attention import attention  # noqa: E402
from genfast.sampling import sample_rectified_flow  # noqa: E402
from genfast.ops import reparam_kl  # noqa: E402

__all__ = ["info", "flow_euler_step", "sample_rectified_flow", "reparam_kl", "__version__"]

from genfast.ops import adaln_modulate, gated_residual  # noqa: E402

__all__ += ["adaln_modulate", "gated_residual"]
__all__ += ["attention"]
