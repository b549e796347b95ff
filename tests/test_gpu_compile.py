"""Every GPU kernel compiles for sm_80 and sm_90 without a GPU (DESIGN.md §8).

Runs `python -m genfast.devtools.gpu_compile --csrc <repo>/csrc` on the checkout and checks, from
an independent reading of the sources, that each Triton AOT_CONFIGS entry and each __global__
kernel of csrc/cuda/*.cu was compiled for both archs with its registers, spills and shared memory.
"""
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)


def _nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


pytestmark = pytest.mark.skipif(_nvcc() is None, reason="nvcc not found: the CUDA half of the GPU compile check cannot run")


def _expected_triton_configs():
    """{(module stem, config name)} read from <repo>/kernels/*.py's AOT_CONFIGS."""
    kdir = REPO / "kernels"
    name = "_genfast_test_kernels"
    init = kdir / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init if init.exists() else None,
                                                  submodule_search_locations=[str(kdir)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    if init.exists():
        spec.loader.exec_module(pkg)
    want = set()
    for path in sorted(kdir.glob("*.py")):
        if path.name == "__init__.py":
            continue
        mod = importlib.import_module(f"{name}.{path.stem}")
        for entry in getattr(mod, "AOT_CONFIGS", []):
            want.add((path.stem, entry["name"]))
    return want


def _expected_cuda_kernels():
    """{(file name, kernel name)} for every __global__ function in csrc/cuda/*.cu."""
    want = set()
    for cu in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        src = cu.read_text()
        src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
        src = re.sub(r"//[^\n]*", "", src)
        src = re.sub(r"__launch_bounds__\s*\([^)]*\)", "", src)
        for m in re.finditer(r"__global__\s+(?:static\s+)?(?:inline\s+)?void\s+(\w+)\s*\(", src):
            want.add((cu.name, m.group(1)))
    return want


def _installed_build_report():
    """The installed genfast's record of its own nvcc build (setup.py), or None (no CUDA build)."""
    import genfast
    from genfast.devtools import cuda_usage

    path = Path(genfast.__file__).parent / cuda_usage.FILE_NAME
    return path if path.is_file() else None


def _run_tool(out, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # TRITON_INTERPRET may be set by conftest: the tool must cope (it restarts itself without it).
    proc = subprocess.run(
        [sys.executable, "-m", "genfast.devtools.gpu_compile", *args, "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    # The CUDA figures from the install's own nvcc build where it compiled these sources (the same
    # nvcc work again cost ~5 CPU minutes on the 2-core CI machine); the Triton half compiles (~4 min).
    built = _installed_build_report()
    extra = ["--build-report", str(built)] if built else []
    return _run_tool(tmp_path_factory.mktemp("gpu_compile") / "report.json", "--csrc", str(REPO / "csrc"), *extra)


def test_tool_succeeds(report):
    proc, data = report
    assert proc.returncode == 0, f"gpu_compile failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    assert data is not None and data["failures"] == []
    assert "arch" in proc.stdout and "regs" in proc.stdout  # the table was printed


def _has_figures(row):
    return (row["status"] in ("ok", "spills (allowed)") and isinstance(row.get("regs"), int) and row["regs"] > 0
            and isinstance(row.get("spill_stores"), int) and isinstance(row.get("smem"), int))


def test_every_triton_config_compiled_for_both_archs(report):
    proc, data = report
    assert data is not None, proc.stdout + proc.stderr
    want = _expected_triton_configs()
    assert want, "no AOT_CONFIGS found under kernels/"
    got = {(Path(r["file"]).stem, r["config"], r["arch"]): r for r in data["rows"] if r["kind"] == "triton"}
    for stem, name in sorted(want):
        for arch in ARCHS:
            row = got.get((stem, name, arch))
            assert row is not None, f"{stem}:{name} sm_{arch} missing from the report:\n{proc.stdout}"
            assert _has_figures(row), f"{stem}:{name} sm_{arch}: {row}"
            assert f"sm_{arch}" in proc.stdout and name in proc.stdout


def test_every_cuda_kernel_compiled_for_both_archs(report):
    proc, data = report
    assert data is not None, proc.stdout + proc.stderr
    rows = [r for r in data["rows"] if r["kind"] == "cuda"]
    for cu_name, kernel in sorted(_expected_cuda_kernels()):
        for arch in ARCHS:
            hits = [r for r in rows if r["config"] == cu_name and r["arch"] == arch
                    and r["kernel"].split("<")[0] == kernel]
            assert hits, (f"{cu_name}: __global__ {kernel} has no sm_{arch} figures (not compiled, or a"
                          f" template never instantiated in that file):\n{proc.stdout}")
            assert all(_has_figures(r) for r in hits), hits


def _figures(rows):
    return {(r["kernel"], r["arch"]): (r["regs"], r["spill_stores"], r["spill_loads"], r["smem"]) for r in rows}


def test_build_report_figures_equal_a_fresh_compile(tmp_path):
    """The figures the check takes from the build's report are the ones nvcc gives when it compiles
    a source itself: colsum.cu (small) compiled fresh vs the same file's rows from the report."""
    built = _installed_build_report()
    if built is None:
        pytest.skip("the installed genfast has no CUDA build report (built without nvcc)")
    from genfast.devtools import cuda_usage

    got, why = cuda_usage.load(built, REPO / "csrc", cuda_usage.nvcc_version(_nvcc()))
    if got is None:
        pytest.skip(f"the installed build is not of this checkout's sources: {why}")
    csrc = tmp_path / "csrc"
    shutil.copytree(REPO / "csrc", csrc)
    for cu in (csrc / "cuda").glob("*.cu"):
        if cu.name != "colsum.cu":
            cu.unlink()
    fresh_proc, fresh = _run_tool(tmp_path / "fresh.json", "--no-triton", "--csrc", str(csrc))
    assert fresh_proc.returncode == 0, fresh_proc.stdout + fresh_proc.stderr
    # the checkout's sources with the report: colsum.cu's rows come from it, and equal the fresh ones
    used_proc, used = _run_tool(tmp_path / "used.json", "--no-triton", "--csrc", str(REPO / "csrc"), "--build-report", str(built))
    assert used_proc.returncode == 0, used_proc.stdout + used_proc.stderr
    from_report = [r for r in used["rows"] if r["config"] == "colsum.cu"]
    assert from_report and all(r["source"].startswith("setup.py") for r in from_report)
    want = _figures(fresh["rows"])
    assert {a for _, a in want} == set(ARCHS) and _figures(from_report) == want
