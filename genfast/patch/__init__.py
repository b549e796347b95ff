"""genfast.patch: genfast kernels inside models users already have (diffusers first)."""
from genfast.patch.sampling import FlowTransformer, SchedulerPatch, guided_step, patch_scheduler  # noqa: F401
