"""The CUDA emulation itself (csrc/emu, DESIGN.md §8), without a GPU and without the Python module.

Builds two small programs with g++ and runs them:
  csrc/emu/emu_selftest.cpp  shuffles, votes, atomics, early exits across barriers, dynamic shared
                             memory, the failures the emulation reports, flow_step from a second
                             translation unit -- with fibers (fast switch and ucontext) and with
                             one OS thread per CUDA thread.
  csrc/emu/tsan_check.cpp    -fsanitize=thread with the OS-thread runner: a block reduction with its
                             __syncthreads is clean, the same without it is reported as a data race,
                             and csrc/cuda/flow_step.cu is clean.
Both builds run in parallel (about 12 s on 2 cores, most of it the TSan build).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CXX = os.environ.get("CXX", "g++")

# The emulated build of a .cu file: what setup.py's genfast._cuda_emu uses, plus warnings.
EMU_FLAGS = ["-std=c++17", "-DGENFAST_EMULATE", "-fno-strict-aliasing", "-pthread", f"-I{CSRC}",
             "-Wall", "-Wno-unknown-pragmas"]
TSAN_ENV = {"TSAN_OPTIONS": "halt_on_error=0 exitcode=66 second_deadlock_stack=1"}


def selftest_command(out):
    return [CXX, *EMU_FLAGS, "-O1", str(CSRC / "emu" / "emu_selftest.cpp"),
            "-x", "c++", str(CSRC / "cuda" / "flow_step.cu"), "-o", str(out)]


def tsan_command(out):
    return [CXX, *EMU_FLAGS, "-O1", "-g", "-fsanitize=thread", str(CSRC / "emu" / "tsan_check.cpp"),
            "-x", "c++", str(CSRC / "cuda" / "flow_step.cu"), "-o", str(out)]


def _tsan_launcher(tmp):
    """How to run a TSan binary here: [] or setarch -R (older TSan fails with high-entropy ASLR).
    None (with the reason) when TSan does not work on this machine."""
    probe_src = tmp / "probe.cpp"
    probe_src.write_text("#include <thread>\nint x;\nint main(){std::thread t([]{x=1;}); t.join(); return x-1;}\n")
    probe = tmp / "probe"
    r = subprocess.run([CXX, "-fsanitize=thread", "-pthread", str(probe_src), "-o", str(probe)],
                       capture_output=True, text=True)
    if r.returncode:
        return None, f"{CXX} cannot build with -fsanitize=thread: {r.stderr.strip()[-300:]}"
    for prefix in ([], ["setarch", os.uname().machine, "-R"]):
        if prefix and not shutil.which("setarch"):
            continue
        r = subprocess.run(prefix + [str(probe)], capture_output=True, text=True, env={**os.environ, **TSAN_ENV})
        if r.returncode == 0:
            return prefix, None
    return None, f"ThreadSanitizer binaries do not run here: {r.stderr.strip()[-300:]}"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Compiles both programs at once; returns {name: (path or None, skip reason)}."""
    if shutil.which(CXX) is None:
        pytest.skip(f"{CXX} not found: the emulation checks need a C++17 compiler")
    tmp = tmp_path_factory.mktemp("cuda_emu")
    launcher, tsan_reason = _tsan_launcher(tmp)
    jobs = {"selftest": subprocess.Popen(selftest_command(tmp / "emu_selftest"), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)}
    if tsan_reason is None:
        jobs["tsan"] = subprocess.Popen(tsan_command(tmp / "tsan_check"), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
    result = {"tsan": (None, tsan_reason), "launcher": launcher}
    for name, proc in jobs.items():
        log, _ = proc.communicate()
        exe = tmp / ("emu_selftest" if name == "selftest" else "tsan_check")
        assert proc.returncode == 0, f"building {name} failed:\n{log}"
        result[name] = (exe, None)
    return result


def test_emulation_selftest_both_runners(built):
    exe, _ = built["selftest"]
    r = subprocess.run([str(exe), "fibers", "fibers-ucontext", "threads"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "PASSED" in r.stdout, r.stdout + r.stderr
    for runner in ("fibers", "fibers-ucontext", "threads"):
        assert f"runner: {runner}\n" in r.stdout
    # the deliberate failures must have been reported with a reason, by every runner
    assert r.stderr.count("deadlock:") == 3 and r.stderr.count("not in its mask") == 3, r.stderr


def _run_tsan(built, mode):
    exe, reason = built["tsan"]
    if exe is None:
        pytest.skip(reason)
    return subprocess.run(built["launcher"] + [str(exe), mode], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **TSAN_ENV})


def test_tsan_correct_reduction_is_clean(built):
    r = _run_tsan(built, "correct")
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0 and "correct: results ok" in r.stdout, r.stdout + r.stderr[-2000:]


def test_tsan_flags_missing_syncthreads(built):
    r = _run_tsan(built, "broken")
    assert "WARNING: ThreadSanitizer: data race" in r.stderr, r.stdout + r.stderr[-2000:]
    assert "partial" in r.stderr  # the report names the __shared__ array
    assert r.returncode == 66


def test_tsan_flow_step_is_clean(built):
    r = _run_tsan(built, "flow_step")
    assert "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0 and "flow_step: results ok" in r.stdout, r.stdout + r.stderr[-2000:]
