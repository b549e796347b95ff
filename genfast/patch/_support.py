"""Can genfast's kernels run a part on this device and dtype? The ops' own backend reasons decide.

A patched part that genfast would only run on its plain-PyTorch reference (say fp64, or a device
without a genfast kernel) keeps the original code: the reference gives the same answer, slower.
Forcing GENFAST_BACKEND=reference is a request, so it counts as runnable.
"""
import torch

# The parts and the ops they run: attention processors need genfast.attention; norms and blocks
# need adaln_modulate and gated_residual (their attention layers are checked on their own).
OPS = {"attention": ("attention",), "modulate": ("adaln_modulate", "gated_residual")}
_cache = {}  # (device type, dtype, part, forced backend) -> reasons ([] = runnable)


def reasons(device_type, dtype, part):
    """Why genfast cannot run `part`'s ops on this device and dtype ([] = it can)."""
    from genfast import backends

    forced = backends.forced()
    key = (device_type, dtype, part, forced)
    if key in _cache:
        return _cache[key]
    from genfast.ops._common import kernel_reasons
    from genfast.ops.attention import _reasons as attention_reasons

    out = []
    for op in OPS[part]:
        table = attention_reasons(device_type, dtype) if op == "attention" else kernel_reasons(device_type, dtype)
        try:
            name = backends.choose(op, device_type, table)
        except ValueError as e:
            out.append(str(e))
            continue
        if name == "reference" and forced != "reference":
            why = "; ".join(f"{b}: {'; '.join(r)}" for b, r in backends.explain(op, device_type, table) if r)
            out.append(f"genfast.{op} has no kernel for {str(dtype).replace('torch.', '')} on {device_type} ({why})")
    _cache[key] = out
    return out


# True: under torch.compile on the CPU the swapped parts take the original code (Inductor's own
# fusions). Measured on the DiT-S benchmark (benchmarks/test_patch.py, 2-core AMD EPYC): with
# Inductor's MKL GEMMs genfast's opaque elementwise ops gave 0.96x of that; since the Linears run
# genfast::linear (oneDNN's fp32 GEMM, ~2.2x MKL's on this CPU) genfast's path compiles to 1.29x
# of the unpatched compiled model, so False (genfast's path under compile) is the default. Tests
# compile both.
DEFER_TO_INDUCTOR_ON_CPU = False
_runnable = {}  # (device type, dtype, part) -> bool, filled in eager mode and read under torch.compile


def runnable(t, part="modulate"):
    """Per-call check of a swapped forward: may genfast run `part` on t's device and dtype? Cheap,
    and under torch.compile a constant (a dict lookup of what eager calls or the patch found)."""
    key = (t.device.type, t.dtype, part)
    if torch.compiler.is_compiling():
        return _runnable.get(key, False) and (key[0] != "cpu" or not DEFER_TO_INDUCTOR_ON_CPU)
    ok = not reasons(*key)
    _runnable[key] = ok
    return ok


def module_reasons(module, part="modulate"):
    """Reasons for a module's parameters' device and dtype (the first floating parameter)."""
    for p in module.parameters():
        if p.is_floating_point():
            r = reasons(p.device.type, p.dtype, part)
            _runnable[(p.device.type, p.dtype, part)] = not r
            return r
    return []
