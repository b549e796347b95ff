"""genfast's ops: one module per hot path (checks, backend choice, autograd, torch.library)."""
from genfast.ops import attention as _attention_op  # the module; the function is genfast.attention
from genfast.ops import flow_step, gelu, kl, modulate, vq
from genfast.ops.flow_step import flow_euler_step
from genfast.ops.kl import reparam_kl, reparam_kl_moments
from genfast.ops.modulate import adaln_modulate, gated_residual
from genfast.ops.vq import code_counts, vector_quantize, vq_nearest

# For genfast.info(): op name -> (device type, dtype) -> {backend: reasons callable}.
REASONS_BY_OP = {
    "flow_euler_step": flow_step._reasons,
    "attention": _attention_op._reasons,
    "adaln_modulate": modulate._reasons,
    "gated_residual": modulate._reasons,
    "vq_nearest": vq._reasons,
    "reparam_kl": kl._reasons,
    "gelu_tanh_backward_bias": gelu._reasons,
    "column_sums": gelu._reasons,
}

__all__ = ["flow_euler_step", "reparam_kl", "reparam_kl_moments", "adaln_modulate", "gated_residual", "vq_nearest", "vector_quantize",
           "code_counts", "REASONS_BY_OP"]
