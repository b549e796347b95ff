"""genfast.info(): what was built, which backend each op takes here and why, and versions."""
import os
import platform
import sys

import torch

from genfast import _native, backends


def _versions():
    lines = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError as e:
        lines.append(f"triton: not installed ({e})")
    build = _native.build_info()
    if build:
        cuda = build["cuda"]
        lines.append(f"CUDA toolkit at build: {cuda['toolkit'] or 'none'}")
        lines.append(f"C++ compiler at build: {build['cpu_compiler']}")
    return lines


def report():
    from genfast.ops import REASONS_BY_OP

    out = ["genfast " + __import__("genfast").__version__]
    out.append("compiled modules:")
    for name, what in (("_C", "C++ CPU kernels"), ("_cuda", "CUDA kernels"), ("_cuda_emu", "CUDA kernels emulated on the CPU (tests)")):
        mod, why = _native.status(name)
        out.append(f"  genfast.{name:<10} {'built' if mod else 'missing'}: {what}" + ("" if mod else f" — {why}"))
    build = _native.build_info()
    if build:
        for name, why in build.get("skipped", {}).items():
            out.append(f"  {name} skipped at build: {why}")
        if build["cuda"]["built"]:
            out.append(f"  CUDA archs: sm_{', sm_'.join(build['cuda']['archs'])} ({build['cuda']['why']})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    forced = os.environ.get("GENFAST_BACKEND")
    out.append("backends" + (f" (GENFAST_BACKEND={forced} forces one)" if forced else "") + ":")
    for op, reasons_for in REASONS_BY_OP.items():
        for dev in devices:
            table = reasons_for(dev, torch.float32)
            chosen = None
            notes = []
            for name, reasons in backends.explain(op, dev, table):
                if not reasons and chosen is None:
                    chosen = name
                elif reasons:
                    notes.append(f"{name}: {'; '.join(reasons)}")
            out.append(f"  {op:<20} {dev:<5} -> {chosen}" + (f"   (skipped {' | '.join(notes)})" if notes else ""))
    if torch.cuda.is_available():
        out.append(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        out.append("GPU: none visible")
    out.append("versions: " + ", ".join(_versions()))
    out.append(f"CPU threads: {torch.get_num_threads()} (torch), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    return "\n".join(out)


def info(file=None):
    """Prints what genfast built, which backend each op uses on this machine and why, and versions."""
    print(report(), file=file or sys.stdout)
