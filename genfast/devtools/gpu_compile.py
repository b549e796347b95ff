"""Compile every GPU kernel for sm_80 and sm_90 without a GPU, and print what each one costs.

    python -m genfast.devtools.gpu_compile [--csrc DIR] [--arch 80,90] [--json FILE] [--build-report FILE]

1. Triton: imports every module of the kernels package and compiles each entry of its
   `AOT_CONFIGS` with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`.
   Which package: run from a checkout, `<repo>/kernels/*.py` loaded by path (as genfast.kernels
   unless that name is taken); from an installed genfast, `genfast.kernels`.
   Registers and spills come from ptxas's own log (TRITON_DUMP_PTXAS_LOG=1, a private
   TRITON_CACHE_DIR so nothing is a cache hit), shared memory from `metadata.shared`.
2. CUDA: `nvcc -std=c++17 -O3 -arch=sm_XX --resource-usage -I<csrc> -c` on every
   `<csrc>/cuda/*.cu` (default csrc: <repo>/csrc when run from a checkout). With
   `--build-report <installed genfast>/_cuda_usage.json`, the (file, arch) figures that setup.py's
   own nvcc build recorded are taken from it instead, where it compiled the same sources with the
   same nvcc (genfast/devtools/cuda_usage.py); the rest are compiled.
3. One table (kernel, config, arch, regs, spills, smem); exit status 1 if anything failed to
   compile, a default config spills without `allow_spills`, needs more shared memory than a
   block of that arch can have, or a kernels module failed to import.

AOT_CONFIGS (a module-level list in each kernels/<op>.py; one dict per kernel x default config
x specialisation worth checking):
    name             str, unique in the module: the row label, e.g. "flow_step[wide,bf16,cfg]"
    kernel           the @triton.jit function
    signature        {arg: type} per Triton's ASTSource: "*fp32" / "*bf16" / "*fp16" ... for
                     pointers, "i32" / "i64" / "fp32" for scalars. Constexpr args may be left out
                     (they are added as "constexpr"); every other argument must be listed.
    constexprs       {arg: value} for every tl.constexpr argument
    divisible_by_16  [arg, ...]: pointers / ints a real launch sees 16-divisible (Triton's "D"
                     specialisation): without it the figures describe a launch that never happens
    num_warps, num_stages   ints, as the launcher passes them
    allow_spills     optional str: why this config may spill (otherwise a spill fails the run)
    options          optional dict of further compile options the launcher passes, e.g.
                     {"enable_fp_fusion": False}

Works with Triton >= 3.3 (ASTSource(fn, signature, constexprs=, attrs=) keyed by arg-index
tuples); checked with 3.6 and 3.9. TRITON_INTERPRET is dropped (the process re-executes itself
without it) because under the interpreter triton.jit builds functions that cannot be compiled.
"""
import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
import warnings
from pathlib import Path

from genfast.devtools import cuda_usage

REPO = Path(__file__).resolve().parents[2]  # the checkout root when run from the source tree


# ----------------------------------------------------------------------------- ptxas output
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text):
    """ptxas -v / nvcc --resource-usage log -> {mangled entry name: figures} (entries only)."""
    out, cur = {}, None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"regs": None, "spill_stores": 0, "spill_loads": 0,
                                              "stack": 0, "smem": 0, "sm": m.group(2)})
            continue
        if cur is None:
            continue
        if m := _SPILL.search(line):
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        if m := _USED.search(line):
            cur["regs"] = int(m.group(1))
            if s := _SMEM.search(line):
                cur["smem"] = int(s.group(1))
    return out


def cuobjdump_figures(cubin, name):
    """Fallback when no ptxas log was seen: read the cubin's resource usage with cuobjdump."""
    tool = shutil.which("cuobjdump")
    try:
        import triton
        tool = triton.knobs.nvidia.cuobjdump.path  # the one Triton ships
    except Exception:
        pass
    if not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"Function " + re.escape(name) + r":\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        return None
    regs, stack, smem, local = map(int, m.groups())
    # Spills land in the stack frame, which cuobjdump does not split from local arrays: report
    # the frame as the spill bound (0 means surely no spill).
    spill = stack + local
    return {"regs": regs, "spill_stores": spill, "spill_loads": spill, "stack": stack, "smem": smem}


# ----------------------------------------------------------------------------- Triton part
def _is_checkout():
    return (REPO / "kernels").is_dir() and ((REPO / "setup.py").exists() or (REPO / "pyproject.toml").exists())


def _register_source_kernels(kdir):
    """Load <repo>/kernels as a package (named genfast.kernels unless an installed one already
    took that name), so relative imports between kernel modules resolve as once installed."""
    name = "genfast.kernels" if "genfast.kernels" not in sys.modules else "_genfast_checkout_kernels"
    init = kdir / "__init__.py"
    if init.exists():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(kdir)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
    else:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(kdir)]
        sys.modules[name] = pkg
    if name == "genfast.kernels":
        with contextlib.suppress(ImportError):
            setattr(importlib.import_module("genfast"), "kernels", pkg)
    return pkg, name


def load_kernel_modules():
    """[(module name, module or None, error or None)], and where the package came from.

    From a checkout, <repo>/kernels is checked even when genfast is also installed: genfast's
    __init__ extends its __path__ to the installed copy, so `import genfast.kernels` there would
    silently check a stale snapshot instead of the sources being edited."""
    if _is_checkout():
        pkg, pkgname = _register_source_kernels(REPO / "kernels")
        where = f"{REPO / 'kernels'} (source tree, loaded by path)"
    else:
        try:
            pkg = importlib.import_module("genfast.kernels")
        except ImportError as e:
            return [], f"no kernels package (genfast.kernels: {e}; no checkout beside this tool)"
        pkgname, where = "genfast.kernels", f"genfast.kernels ({list(pkg.__path__)[0]})"
    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        name = f"{pkgname}.{info.name}"
        try:
            mods.append((info.name, importlib.import_module(name), None))
        except Exception as e:  # a module that does not import is a failure, not a skip
            mods.append((info.name, None, f"{type(e).__name__}: {e}"))
    return mods, where


def _attrs_for(fn, names):
    try:
        from triton.backends.compiler import BaseBackend
        div = BaseBackend.parse_attr("D")  # [["tt.divisibility", 16]] in 3.3 .. 3.9
    except Exception:
        div = [["tt.divisibility", 16]]
    return {(fn.arg_names.index(n),): div for n in names}


def check_entry(entry):
    """Problems with an AOT_CONFIGS entry, before compiling it."""
    problems = []
    fn = entry.get("kernel")
    names = getattr(fn, "arg_names", None)
    if names is None:
        return [f"'kernel' is not a @triton.jit function (got {type(fn).__name__}; is TRITON_INTERPRET set?)"]
    known = set(entry.get("signature", {})) | set(entry.get("constexprs", {}))
    if missing := [n for n in names if n not in known]:
        problems.append(f"arguments missing from signature/constexprs: {missing}")
    if unknown := [n for n in list(known) + list(entry.get("divisible_by_16", [])) if n not in names]:
        problems.append(f"names that are not arguments of {fn.__name__}: {sorted(set(unknown))}")
    for key in ("name", "num_warps", "num_stages"):
        if key not in entry:
            problems.append(f"missing key {key!r}")
    return problems


def compile_triton(entry, arch):
    """One AOT compile -> figures dict (raises on a compile error)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        raise RuntimeError(f"triton {triton.__version__}: ASTSource has no constexprs= (needs triton >= 3.3)")
    fn = entry["kernel"]
    sig = {n: entry["signature"].get(n, "constexpr") for n in fn.arg_names}
    consts = dict(entry.get("constexprs", {}))
    src = ASTSource(fn, sig, constexprs=consts, attrs=_attrs_for(fn, entry.get("divisible_by_16", [])))
    log = io.StringIO()
    # Triton prints the ptxas log with print() (3.6 and 3.9) when TRITON_DUMP_PTXAS_LOG=1.
    with contextlib.redirect_stdout(log):
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": entry["num_warps"], "num_stages": entry["num_stages"],
                                    **entry.get("options", {})})
    name = k.metadata.name
    figs = parse_ptxas(log.getvalue()).get(name)
    how = "ptxas log"
    if figs is None or figs["regs"] is None:
        figs, how = cuobjdump_figures(k.asm["cubin"], name), "cuobjdump"
    if figs is None:
        raise RuntimeError("compiled, but no register figures found (no ptxas log, no cuobjdump)")
    figs = dict(figs)
    figs["smem"] = max(figs.get("smem", 0), int(getattr(k.metadata, "shared", 0) or 0))
    figs["source"] = how
    return figs


def triton_rows(archs, failures, notes):
    mods, where = load_kernel_modules()
    notes.append(f"Triton kernels from {where}")
    rows = []
    for modname, mod, err in mods:
        if err:
            failures.append(f"kernels/{modname}.py: import failed: {err}")
            continue
        entries = getattr(mod, "AOT_CONFIGS", None)
        # Public @triton.jit functions are kernels; _underscored ones are taken as helpers.
        jitted = {v.__name__ for v in vars(mod).values()
                  if hasattr(v, "arg_names") and hasattr(v, "fn") and not v.__name__.startswith("_")}
        if entries is None:
            if jitted:
                notes.append(f"kernels/{modname}.py: no AOT_CONFIGS; unchecked kernels: {sorted(jitted)}")
            continue
        covered = set()
        for e in entries:
            label = f"{modname}:{e.get('name', '?')}"
            if problems := check_entry(e):
                failures.append(f"{label}: bad AOT_CONFIGS entry: " + "; ".join(problems))
                continue
            covered.add(e["kernel"].__name__)
            for arch in archs:
                row = {"kind": "triton", "file": f"kernels/{modname}.py", "kernel": e["kernel"].__name__,
                       "config": e["name"], "arch": arch, "allow_spills": e.get("allow_spills")}
                t = time.time()
                try:
                    row.update(compile_triton(e, arch))
                    row["status"] = "ok"
                except Exception as ex:
                    row["status"] = "FAIL"
                    row["error"] = f"{type(ex).__name__}: {str(ex).strip()[-2000:]}"
                row["seconds"] = round(time.time() - t, 2)
                rows.append(row)
        if uncovered := sorted(jitted - covered):
            notes.append(f"kernels/{modname}.py: kernels without AOT_CONFIGS entries (unchecked): {uncovered}")
    return rows


# ----------------------------------------------------------------------------- CUDA part
def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    r = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    got = r.stdout.splitlines()
    return dict(zip(names, got)) if r.returncode == 0 and len(got) == len(names) else {n: n for n in names}


def short_name(demangled):
    """'void genfast::(anonymous namespace)::k<float>(genfast::P)' -> 'k<float>'."""
    s = demangled
    if s.endswith(")"):  # drop the parameter list (match the parenthesis)
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    s = s.split(" ", 1)[1] if s.startswith("void ") else s
    # strip namespaces outside template arguments
    depth, cut = 0, 0
    for i, ch in enumerate(s):
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if depth == 0 and s.startswith("::", i):
            cut = i + 2
    return s[cut:]


def cuda_rows(csrc, archs, nvcc, failures, notes, jobs, build_report=None, nvcc_version="unknown"):
    sources = sorted((csrc / "cuda").glob("*.cu"))
    if not sources:
        notes.append(f"no CUDA sources in {csrc / 'cuda'}")
        return []
    rows, work = [], [(cu, arch) for cu in sources for arch in archs]
    tmp = tempfile.mkdtemp(prefix="genfast-nvcc-")
    running = []

    def add_rows(cu, arch, text, seconds, source):
        rel = f"{csrc.name}/cuda/{cu.name}"
        figs = parse_ptxas(text)
        names = demangle(list(figs))
        if not figs:
            notes.append(f"{rel} sm_{arch}: no __global__ kernels compiled")
        for mangled, f in sorted(figs.items(), key=lambda kv: names[kv[0]]):
            rows.append({"kind": "cuda", "file": rel, "kernel": short_name(names[mangled]),
                         "demangled": names[mangled], "config": cu.name, "arch": arch, "status": "ok",
                         "seconds": seconds, "source": source, **f})

    def finish(p, cu, arch, t0):
        text = p.stdout.read() if p.stdout else ""
        p.wait()
        if p.returncode != 0:
            rows.append({"kind": "cuda", "file": f"{csrc.name}/cuda/{cu.name}", "kernel": "(nvcc)", "config": cu.name,
                         "arch": arch, "status": "FAIL", "error": f"nvcc exit {p.returncode}: " + text.strip()[-3000:],
                         "seconds": round(time.time() - t0, 2)})
            return
        add_rows(cu, arch, text, round(time.time() - t0, 2), "nvcc --resource-usage")

    if build_report is not None:  # the installed build's own ptxas figures, where it compiled these sources
        report, why = cuda_usage.load(build_report, csrc, nvcc_version)
        if report is None:
            notes.append(f"CUDA: compiling (the build's report is not used: {why})")
        else:
            kept = [(cu, arch) for cu, arch in work if arch in report["logs"].get(cu.name, {})]
            for cu, arch in kept:
                add_rows(cu, arch, report["logs"][cu.name][arch], 0.0, "setup.py's nvcc build (--resource-usage)")
            work = [w for w in work if w not in kept]
            notes.append(f"CUDA: {len(kept)} of {len(kept) + len(work)} (file, arch) figures from the build's report"
                         f" ({build_report}, {report['nvcc']}), same sources")

    for cu, arch in work:  # a few nvcc processes at a time, collected in order
        while len(running) >= jobs:
            finish(*running.pop(0))
        obj = Path(tmp) / f"{cu.stem}.sm{arch}.o"
        cmd = [nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", "--resource-usage", f"-I{csrc}", "-c", str(cu), "-o", str(obj)]
        running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                        cu, arch, time.time()))
    while running:
        finish(*running.pop(0))
    shutil.rmtree(tmp, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------- report
# Opt-in shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin), by arch:
# a kernel over it compiles but fails at launch (Triton raises OutOfResources then).
MAX_SMEM = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def judge(rows, failures):
    for r in rows:
        if r["status"] != "ok":
            failures.append(f"{r['file']} {r['kernel']} {r['config']} sm_{r['arch']}: {r.get('error', 'failed')[:4000]}")
            continue
        limit = MAX_SMEM.get(r["arch"])
        if limit and r.get("smem", 0) > limit:
            r["status"] = "SMEM>MAX"
            failures.append(f"{r['file']} {r['config']} sm_{r['arch']}: {r['smem']} B shared memory > the"
                            f" {limit} B a block can have: it would fail at launch")
            continue
        if r.get("spill_stores", 0) or r.get("spill_loads", 0):
            if r.get("allow_spills"):
                r["status"] = "spills (allowed)"
            else:
                r["status"] = "SPILLS"
                failures.append(f"{r['file']} {r['config']} sm_{r['arch']}: spills {r['spill_stores']} B stores /"
                                f" {r['spill_loads']} B loads (mark allow_spills with a reason if it must)")


def print_table(rows, out=sys.stdout):
    head = ("kernel", "config (Triton) / file (CUDA)", "arch", "regs", "spills st/ld B", "smem B", "status")
    body = []
    for r in rows:
        ok = r["status"] != "FAIL"
        body.append((r["kernel"], r["config"], f"sm_{r['arch']}",
                     str(r.get("regs", "-")) if ok else "-",
                     f"{r.get('spill_stores', 0)}/{r.get('spill_loads', 0)}" if ok else "-",
                     str(r.get("smem", "-")) if ok else "-", r["status"]))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'>' if i in (3, 4, 5) else '<'}{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*head), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for b in body:
        print(fmt.format(*b), file=out)


def run_cuda_part(args, archs, res):
    if args.no_cuda:
        return
    csrc = args.csrc or (REPO / "csrc" if _is_checkout() and (REPO / "csrc").is_dir() else None)
    nvcc = find_nvcc()
    if csrc is None:
        res["notes"].append("CUDA: skipped (no csrc folder: installed package; pass --csrc)")
    elif not csrc.is_dir():
        res["failures"].append(f"--csrc {csrc}: not a folder")
    elif nvcc is None:
        msg = "CUDA: nvcc not found (set CUDA_HOME or PATH)"
        (res["failures"] if args.csrc else res["notes"]).append(msg)  # asked for explicitly: a failure
    else:
        try:
            version = cuda_usage.nvcc_version(nvcc)
            res["notes"].append(f"nvcc: {version}")
            res["rows"] += cuda_rows(csrc.resolve(), archs, nvcc, res["failures"], res["notes"], args.jobs,
                                     args.build_report, version)
        except Exception as e:  # never lose a CUDA problem in the thread
            res["failures"].append(f"CUDA part crashed: {type(e).__name__}: {e}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m genfast.devtools.gpu_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--csrc", type=Path, default=None,
                   help="folder holding cuda/*.cu (default: <repo>/csrc when run from a checkout)")
    p.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and failures as JSON here")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    p.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources")
    p.add_argument("--build-report", type=Path, default=None,
                   help="an installed genfast's _cuda_usage.json: take the CUDA figures of the archs it holds from"
                        " it where it was built from the same csrc sources (else compile them)")
    p.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="parallel nvcc processes")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # Kernels decorated under the interpreter cannot be compiled: start over without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "genfast.devtools.gpu_compile", *argv], env=env).returncode
    args = parse_args(argv)
    archs = [int(a.strip().replace("sm_", "")) for a in args.arch.split(",") if a.strip()]
    failures, notes, rows = [], [], []
    t0 = time.time()

    cache = tempfile.mkdtemp(prefix="genfast-triton-cache-")
    os.environ["TRITON_CACHE_DIR"] = cache  # private: every compile runs ptxas and logs
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # two entries with one cache key both run ptxas
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    try:
        # nvcc runs in a thread (it waits on child processes) while Triton compiles here.
        cuda = {"rows": [], "failures": [], "notes": []}
        worker = threading.Thread(target=run_cuda_part, args=(args, archs, cuda), daemon=True)
        worker.start()
        if not args.no_triton:
            try:
                import triton
                notes.append(f"triton {triton.__version__}")
                rows += triton_rows(archs, failures, notes)
            except ImportError as e:
                failures.append(f"triton cannot be imported: {e}")
        worker.join()
        rows, failures, notes = rows + cuda["rows"], failures + cuda["failures"], notes + cuda["notes"]
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    judge(rows, failures)
    print_table(rows)
    for n in notes:
        print(f"note: {n}")
    for f in failures:
        print(f"FAILED: {f}")
    n_ok = sum(r["status"] != "FAIL" for r in rows)
    print(f"{n_ok} of {len(rows)} kernel compiles ok, {len(failures)} problem(s), {time.time() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "failures": failures, "notes": notes, "archs": archs},
                                        indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
