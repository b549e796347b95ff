"""genfast's ops: one module per hot path (checks, backend choice, autograd, torch.library)."""
from genfast.ops import flow_step
from genfast.ops.flow_step import flow_euler_step
from genfast.ops import attention as _attention_op  # the module; the function is genfast.attention

# For genfast.info(): op name -> (device type, dtype) -> {backend: reasons callable}.
REASONS_BY_OP = {"flow_euler_step": flow_step._reasons}
REASONS_BY_OP["attention"] = _attention_op._reasons

__all__ = ["flow_euler_step", "REASONS_BY_OP"]

# adaLN modulate / gated residual (issue 4)
from genfast.ops import modulate  # noqa: E402
from genfast.ops.modulate import adaln_modulate, gated_residual  # noqa: E402

REASONS_BY_OP.update({"adaln_modulate": modulate._reasons, "gated_residual": modulate._reasons})
__all__ += ["adaln_modulate", "gated_residual"]
# reparam_kl (issue 6)
from genfast.ops import kl  # noqa: E402
from genfast.ops.kl import reparam_kl  # noqa: E402

REASONS_BY_OP["reparam_kl"] = kl._reasons
__all__ += ["reparam_kl"]
