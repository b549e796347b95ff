"""genfast.patch(model): run a model users already have on genfast's kernels, in place.

    handle = genfast.patch(model)      # or: with genfast.patch(model): ...
    print(handle.report)               # what was swapped, what was left alone and why
    handle.unpatch()                   # the original processors / forwards, exactly

What is swapped (per instance, never per class, so other models are untouched):
  * diffusers attention processors (self, cross, joint; PixArt's text key mask) -> processors
    that run one GEMM over the concatenated q/k/v weights and genfast.attention;
  * processors that call diffusers' attention dispatcher (Flux, with its rotary embedding and
    QK-norm) -> the "genfast" attention backend registered in diffusers' registry;
  * adaLN norms (AdaLayerNormZero / Single / Continuous) -> genfast.adaln_modulate;
  * transformer blocks (DiT, PixArt, SD3, Flux) -> forwards that use genfast.adaln_modulate and
    genfast.gated_residual, which diffusers writes inline in the blocks' forward;
  * genfast's zoo DiT blocks that run the plain-PyTorch fallback -> genfast.nn.DiTBlock's forward.

Parameters are never replaced (state_dict() is unchanged) and every swapped forward checks, per
call, that genfast can run the case; anything else takes the original code. A module the patch
does not recognise is left alone and reported.
"""
import sys
import types

from genfast.patch._handle import PatchHandle, PatchReport
from genfast.patch.sampling import FlowTransformer, SchedulerPatch, guided_step, patch_scheduler

__all__ = ["patch", "register_attention_backend", "PatchHandle", "PatchReport",
           "FlowTransformer", "SchedulerPatch", "guided_step", "patch_scheduler"]
MIN_DIFFUSERS = (0, 35)


def patch(model, *, attention=True, norms=True, blocks=True):
    """Swaps the hot parts of `model` for genfast kernels, in place; returns a PatchHandle.

    Args:
        model: a torch.nn.Module: a diffusers DiT / PixArt / SD3 / Flux transformer (or any model
            built from their blocks, attention layers and norms), or a genfast zoo DiT.
        attention, norms, blocks: which kinds of part to swap (all by default).
    Returns:
        PatchHandle: .report (printable; .swapped / .skipped as data), .unpatch(), and a context
        manager that unpatches on exit. Patching a model twice is harmless: parts already patched
        are reported as such, and unpatching either handle restores the originals.
    """
    import torch

    from genfast.patch import _handle

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("attention", attention), ("norms", norms), ("blocks", blocks)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return _handle.apply(model, attention=attention, norms=norms, blocks=blocks)


def register_attention_backend():
    """Makes "genfast" an attention backend of diffusers' dispatcher (diffusers.models.
    attention_dispatch), without touching diffusers' files: then `model.set_attention_backend(
    "genfast")` or `with attention_backend("genfast"): ...` route the processors that use the
    dispatcher (Flux, and most newer diffusers models) to genfast.attention. Calls genfast cannot
    serve exactly go to diffusers' native backend. Idempotent; returns the backend's enum member."""
    require_diffusers("genfast.patch.register_attention_backend()")
    from genfast.patch._diffusers_attn import register_backend

    return register_backend()


def require_diffusers(feature):
    """Raises ImportError naming the extra when diffusers is missing or too old."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"{feature} needs diffusers: pip install 'genfast[diffusers]'") from e
    version = tuple(int(p) for p in diffusers.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_DIFFUSERS:
        raise ImportError(f"{feature} needs diffusers >= {'.'.join(map(str, MIN_DIFFUSERS))}, found "
                          f"{diffusers.__version__}: pip install -U 'genfast[diffusers]'")


class _CallableModule(types.ModuleType):
    """`import genfast.patch` binds the package to genfast.patch; calling it patches a model."""

    def __call__(self, model, **kwargs):
        return patch(model, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
