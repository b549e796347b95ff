"""The CUDA build's own resource report, kept so that the GPU compile check need not compile again.

setup.py runs nvcc with --resource-usage on every csrc/cuda/*.cu and keeps what ptxas printed, with a
digest of the sources, in genfast/_cuda_usage.json beside the compiled modules (write). Where that
digest equals the one of the csrc folder being checked, genfast.devtools.gpu_compile takes each
arch's figures from that log (load) instead of compiling the same sources again: the CUDA half of
the check cost ~5 CPU minutes a run on the 2-core CI machine, the same nvcc work as the install.

Standard library only: setup.py loads this file by path, before genfast is installed.
"""
import hashlib
import json
import re
import subprocess
from pathlib import Path

FILE_NAME = "_cuda_usage.json"
# what nvcc reads to compile csrc/cuda/*.cu: the sources and every header they may include
SUFFIXES = (".cu", ".cuh", ".h", ".hpp")
_ENTRY_ARCH = re.compile(r"Compiling entry function '[^']+' for 'sm_(\d+)'")


def nvcc_version(nvcc):
    """The last line of `nvcc --version` ("Build cuda_13.0.r13.0/compiler.…"): what a report records
    (write) and what a check compares it with (load)."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    return out[-1] if out else "unknown"


def csrc_digest(csrc):
    """sha256 over the CUDA-relevant files under csrc (relative path and bytes, in path order)."""
    csrc = Path(csrc)
    h = hashlib.sha256()
    for p in sorted(q for q in csrc.rglob("*") if q.is_file() and q.suffix in SUFFIXES):
        h.update(p.relative_to(csrc).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def write(path, csrc, archs, nvcc_version, logs):
    """logs: {cu file name: nvcc --resource-usage output for all archs of that file}."""
    data = {"csrc_digest": csrc_digest(csrc), "archs": sorted(int(a) for a in archs), "nvcc": nvcc_version,
            "logs": logs}
    Path(path).write_text(json.dumps(data, indent=1))


def split_by_arch(text):
    """One nvcc log of several -gencode archs -> {arch: the lines of that arch's entries}."""
    out, arch = {}, None
    for line in text.splitlines():
        if m := _ENTRY_ARCH.search(line):
            arch = int(m.group(1))
        if arch is not None:
            out.setdefault(arch, []).append(line)
    return {a: "\n".join(lines) + "\n" for a, lines in out.items()}


def load(path, csrc, nvcc_version):
    """(report, why): report = {"archs", "nvcc", "logs": {cu name: {arch: log}}} where the build's
    report at path exists and was made from csrc's current sources by that nvcc; else (None, why not)."""
    path = Path(path)
    if not path.is_file():
        return None, f"no build report at {path}"
    try:
        data = json.loads(path.read_text())
        digest, logs = data["csrc_digest"], data["logs"]
    except (ValueError, KeyError, TypeError) as e:
        return None, f"{path}: unreadable build report ({type(e).__name__}: {e})"
    if digest != csrc_digest(csrc):
        return None, f"{path}: built from other sources than {csrc} (digest differs)"
    if data.get("nvcc") != nvcc_version:
        return None, f"{path}: built by another nvcc ({data.get('nvcc')!r}, here {nvcc_version!r})"
    report = {"archs": data.get("archs", []), "nvcc": data.get("nvcc"),
              "logs": {name: split_by_arch(text) for name, text in logs.items()}}
    return report, None
