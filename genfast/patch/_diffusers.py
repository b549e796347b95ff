"""The walk over a diffusers model: which attention layers, norms and blocks genfast.patch swaps."""
from genfast.patch import _diffusers_attn as attn_mod
from genfast.patch import _diffusers_blocks as blocks_mod
from genfast.patch._handle import already_patched
from genfast.patch._support import module_reasons

# Classes diffusers uses in these models that carry no hot path of their own.
_SILENT = {"FeedForward", "GELU", "GEGLU", "ApproximateGELU", "PatchEmbed", "Timesteps", "TimestepEmbedding",
           "LabelEmbedding", "CombinedTimestepLabelEmbeddings", "PixArtAlphaCombinedTimestepSizeEmbeddings",
           "PixArtAlphaTextProjection", "CombinedTimestepTextProjEmbeddings", "FluxPosEmbed",
           "CombinedTimestepGuidanceTextProjEmbeddings", "RMSNorm", "LayerNorm"}
# Models whose final-layer LayerNorm + modulation is written inline in the model's forward.
_INLINE_FINAL = {n: "the final layer's LayerNorm + modulation is inline in the model's forward (one layer): "
                    "left to diffusers" for n in ("DiTTransformer2DModel", "PixArtTransformer2DModel")}
_DISPATCH_PROCESSORS = ("FluxAttnProcessor",)  # processors known to call dispatch_attention_fn for their attention


def patch_modules(handle, model, kinds):
    for path, mod in model.named_modules():
        cls = type(mod)
        if not cls.__module__.startswith("diffusers.") or cls.__name__ in _SILENT:
            continue
        name = cls.__name__
        if hasattr(mod, "processor") and hasattr(mod, "set_processor"):
            if kinds["attention"]:
                _attention(handle, path, mod)
        elif name in blocks_mod.NORM_FORWARDS or name.startswith(("AdaLayerNorm", "AdaGroupNorm")):
            if kinds["norm"]:
                _norm(handle, path, mod)
        elif name in blocks_mod.BLOCKS:
            if kinds["block"]:
                _block(handle, path, mod)
        elif name in _INLINE_FINAL:
            if kinds["norm"]:
                handle.add(path, "norm", name, False, _INLINE_FINAL[name])
        elif name.endswith(("Block", "Attention", "Norm")):
            kind = "block" if name.endswith("Block") else "attention" if name.endswith("Attention") else "norm"
            if kinds[kind]:
                handle.add(path, kind, name, False, "not a part genfast.patch recognises")


def _attention(handle, path, mod):
    proc = mod.processor
    pname = type(proc).__name__
    if already_patched(proc) or already_patched(mod):
        handle.add(path, "attention", pname, False, "already patched by another genfast.patch handle")
        return
    why = module_reasons(mod, "attention")
    if why:
        handle.add(path, "attention", pname, False, "; ".join(why))
        return
    if pname in _DISPATCH_PROCESSORS and type(proc).__module__.startswith("diffusers."):
        why = attn_mod.dispatch_processor_reasons(proc)
        if why:
            handle.add(path, "attention", pname, False, "; ".join(why))
            return
        member = attn_mod.register_backend()
        handle.set_attr(proc, "_attention_backend", member, mark=proc)
        handle.add(path, "attention", pname, True, "diffusers attention backend 'genfast' (rotary, QK-norm kept)")
        return
    cls, why = attn_mod.processor_for(mod)
    if cls is None:
        handle.add(path, "attention", pname, False, why)
        return
    new = cls(mod, proc)
    handle.set_attr(mod, "processor", new, mark=new)
    handle.add(path, "attention", pname, True, f"-> {cls.__name__}")


def _norm(handle, path, mod):
    name = type(mod).__name__
    if already_patched(mod):
        handle.add(path, "norm", name, False, "already patched by another genfast.patch handle")
        return
    if name == "AdaLayerNormSingle":  # PixArt: the modulation it feeds is applied (fused) in the blocks
        handle.add(path, "norm", name, False, "computes the modulation vector only; the blocks apply it")
        return
    why = blocks_mod.norm_reasons(mod) + module_reasons(mod)
    if why:
        handle.add(path, "norm", name, False, "; ".join(why))
        return
    handle.set_forward(mod, blocks_mod.NORM_FORWARDS[name])
    handle.add(path, "norm", name, True, "-> genfast.adaln_modulate")


def _block(handle, path, mod):
    name = type(mod).__name__
    if already_patched(mod):
        handle.add(path, "block", name, False, "already patched by another genfast.patch handle")
        return
    reasons_fn, forward = blocks_mod.BLOCKS[name]
    why = reasons_fn(mod) + module_reasons(mod)
    if why:
        handle.add(path, "block", name, False, "; ".join(why))
        return
    handle.set_forward(mod, forward)
    handle.add(path, "block", name, True, "-> genfast.adaln_modulate + genfast.gated_residual")
