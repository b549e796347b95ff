"""The tensor-core wrappers (csrc/cuda/mma.cuh) under the CUDA emulation (DESIGN.md §8).

Builds csrc/emu/mma_selftest.cpp with g++ and runs it: mma.sync m16n8k16 (bf16, f16) and
ldmatrix x1/x2/x4 (+ .trans) against a scalar matmul, a Q K^T -> P -> P V chain as the attention
kernel uses it, and deliberately wrong layouts (swapped A or B registers, wrong C row pair, wrong
half of a packed register, misaligned ldmatrix rows) that must fail. About 5 s.
"""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CXX = os.environ.get("CXX", "g++")
EMU_FLAGS = ["-std=c++17", "-DGENFAST_EMULATE", "-fno-strict-aliasing", "-pthread", f"-I{CSRC}",
             "-Wall", "-Wno-unknown-pragmas"]


def test_mma_and_ldmatrix_layouts(tmp_path):
    exe = tmp_path / "mma_selftest"
    r = subprocess.run([CXX, *EMU_FLAGS, "-O1", str(CSRC / "emu" / "mma_selftest.cpp"), "-o", str(exe)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all mma/ldmatrix checks passed" in r.stdout
    # every broken layout was seen to fail, not skipped
    assert r.stdout.count("fails") >= 12 and "FAIL\n" not in r.stdout
