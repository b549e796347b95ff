"""genfast's ops: one module per hot path (checks, backend choice, autograd, torch.library)."""
from genfast.ops import flow_step
from genfast.ops.flow_step import flow_euler_step
from genfast.ops import attention as _attention_op  # the module; the function is genfast.attention

# For genfast.info(): op name -> (device type, dtype) -> {backend: reasons callable}.
REASONS_BY_OP = {"flow_euler_step": flow_step._reasons}
REASONS_BY_OP["attention"] = _attention_op._reasons

__all__ = ["flow_euler_step", "REASONS_BY_OP"]
