"""Build of genfast's compiled modules, with ninja, without torch (DESIGN.md §2).

  genfast._C         C++ CPU kernels (csrc/cpu), OpenMP, runtime ISA dispatch. Always built.
  genfast._cuda      CUDA kernels (csrc/cuda) built by nvcc, cudart linked statically. Built when
                     nvcc is found (GENFAST_BUILD_CUDA=0 skips it, =1 makes a missing nvcc an error).
  genfast._cuda_emu  the same csrc/cuda sources compiled as C++ against csrc/emu (DESIGN.md §8):
                     runs the CUDA kernels on CPU tensors for tests. Always built (plain C++).

None of them links libtorch: they take data pointers, sizes and strides as Python ints, so one
build serves every torch 2.x. GENFAST_CUDA_ARCH="80;90" picks the CUDA archs (default: the
visible GPU's, else sm_80 and sm_90). The build prints what it built and why it skipped anything,
and records it in genfast/_build_info.py for genfast.info().
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
CPU_SOURCES = sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))
CUDA_SOURCES = sorted(str(p) for p in (CSRC / "cuda").glob("*.cu"))
# CPU sources built with -ffp-contract=off: GCC otherwise fuses a product and a sum into one FMA in
# the AVX2 / AVX-512 clones but not in the SSE2 one, so the bits depend on the CPU, and an FMA keeps
# a product's rounding error where the formula cancels it (the modulate backward at C = 1, where
# xhat = 0: dx = rstd (dxhat - mean(dxhat)) gave ~1e-4 instead of 0). Memory-bound row kernels
# whose GPU twins spell out each rounding too (csrc/cuda/modulate*.cuh).
NO_CONTRACT = {"modulate.cpp", "gated_residual.cpp"}
BINDINGS = str(CSRC / "bindings.cpp")


def log(msg):
    print(f"genfast build: {msg}", file=sys.stderr, flush=True)


def load_by_path(rel):
    """A standard-library-only module of the genfast package, loaded from its file (genfast, which
    needs torch, is not importable while it is being built)."""
    spec = importlib.util.spec_from_file_location("_genfast_build_" + Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# nvcc's version and the build's resource report, in the form genfast.devtools.gpu_compile reads them
CUDA_USAGE = load_by_path("genfast/devtools/cuda_usage.py")


def find_nvcc():
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env and (Path(env) / "bin" / "nvcc").exists():
        return str(Path(env) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cuda_home(nvcc):
    # /usr/local/bin/nvcc may be a wrapper script: ask nvcc itself where its toolkit lives.
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        for line in out.splitlines():
            if "TOP=" in line:
                return os.path.normpath(line.split("TOP=", 1)[1].strip().strip('"'))
    except OSError:
        pass
    return str(Path(os.path.realpath(nvcc)).parent.parent)


def cuda_archs():
    env = os.environ.get("GENFAST_CUDA_ARCH")
    if env:
        return [a.strip().replace("sm_", "").replace(".", "") for a in env.replace(",", ";").split(";") if a.strip()], "GENFAST_CUDA_ARCH"
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True)
        caps = sorted({c.strip().replace(".", "") for c in r.stdout.split() if c.strip()})
        if r.returncode == 0 and caps:
            return caps, "the visible GPU"
    return ["80", "90"], "default (no GPU visible)"


class NinjaBuildExt(build_ext):
    """Compiles every object of every extension in one ninja run (parallel), then links each."""

    def run(self):
        self.built, self.skipped = [], {}
        nvcc = find_nvcc()
        want_cuda = os.environ.get("GENFAST_BUILD_CUDA")
        self.cuda = None
        if want_cuda == "0":
            self.skipped["genfast._cuda"] = "GENFAST_BUILD_CUDA=0"
        elif not nvcc:
            if want_cuda == "1":
                raise RuntimeError("GENFAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
            self.skipped["genfast._cuda"] = "nvcc not found"
        elif not CUDA_SOURCES:
            self.skipped["genfast._cuda"] = "no csrc/cuda sources"
        else:
            archs, why = cuda_archs()
            self.cuda = dict(nvcc=nvcc, home=cuda_home(nvcc), archs=archs, why=why,
                             version=CUDA_USAGE.nvcc_version(nvcc))
        self.extensions = [e for e in self.extensions if e.name != "genfast._cuda" or self.cuda]
        self.build_all_objects()
        super().run()
        self.write_build_info()
        for name, why in self.skipped.items():
            log(f"skipped {name}: {why}")
        log("built " + ", ".join(self.built))

    def build_all_objects(self):
        tmp = Path(self.build_temp).resolve()
        tmp.mkdir(parents=True, exist_ok=True)
        import pybind11

        inc = f"-I{CSRC} -I{pybind11.get_include()} -I{sysconfig.get_paths()['include']}"
        cxx = os.environ.get("CXX", "g++")
        base = f"-O3 -std=c++17 -fPIC -fvisibility=hidden -Wall -Wno-unused-function {inc}"
        rules = [
            f"rule cxx\n  command = {cxx} {base} $flags -MMD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc\n",
            # The emulated CUDA build: the .cu text as C++ against csrc/emu (DESIGN.md §8).
            f"rule emu\n  command = {cxx} -x c++ {base} -O2 -fno-strict-aliasing -Wno-unknown-pragmas -pthread -DGENFAST_EMULATE"
            f" $flags -MMD -MF $out.d -c $in -o $out\n  depfile = $out.d\n  deps = gcc\n",
        ]
        self.objects = {"genfast._C": [], "genfast._cuda_emu": [], "genfast._cuda": []}
        builds = []

        def add(rule, src, ext, flags=""):
            obj = tmp / ext / (Path(src).name + ".o")
            builds.append(f"build {obj}: {rule} {src}\n  flags = {flags}\n")
            self.objects[ext].append(str(obj))

        for s in CPU_SOURCES:
            # errno-free sqrtf vectorises; NO_CONTRACT files round every product as written (no FMA)
            contract = " -ffp-contract=off" if Path(s).name in NO_CONTRACT else ""
            add("cxx", s, "genfast._C", "-fopenmp -fno-math-errno" + contract)
        add("cxx", BINDINGS, "genfast._C", "-DGENFAST_MODULE_CPU")
        for s in CUDA_SOURCES:
            add("emu", s, "genfast._cuda_emu")
        add("cxx", BINDINGS, "genfast._cuda_emu", "-DGENFAST_MODULE_CUDA_EMU -pthread")
        if self.cuda:
            gencode = " ".join(f"-gencode arch=compute_{a},code=sm_{a}" for a in self.cuda["archs"])
            top = max(self.cuda["archs"])  # PTX of the newest arch too, so newer GPUs can JIT it
            gencode += f" -gencode arch=compute_{top},code=compute_{top}"
            # ptxas's resource report of each object kept in $out.usage (genfast/devtools/cuda_usage.py:
            # the GPU compile check reads it instead of compiling the same sources again); its output
            # is shown where nvcc fails. -MD: header changes rebuild the objects that include them.
            rules.append(
                f"rule nvcc\n  command = {self.cuda['nvcc']} -std=c++17 -O3 -Xcompiler -fPIC,-fvisibility=hidden"
                f" -I{CSRC} {gencode} -lineinfo --resource-usage -MD -MF $out.d -c $in -o $out > $out.usage 2>&1"
                " || { cat $out.usage; exit 1; }\n  depfile = $out.d\n  deps = gcc\n"
            )
            for s in CUDA_SOURCES:
                add("nvcc", s, "genfast._cuda")
            add("cxx", BINDINGS, "genfast._cuda", f"-DGENFAST_MODULE_CUDA -I{self.cuda['home']}/include")
            log(f"CUDA archs sm_{', sm_'.join(self.cuda['archs'])} ({self.cuda['why']}), {self.cuda['version']}")
        (tmp / "build.ninja").write_text("ninja_required_version = 1.3\n" + "".join(rules) + "".join(builds))
        ninja = shutil.which("ninja")
        if ninja is None:
            import ninja as ninja_pkg

            ninja = str(Path(ninja_pkg.BIN_DIR) / "ninja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run([ninja, "-C", str(tmp), "-j", jobs], check=True)

    def build_extension(self, ext):
        objects = self.objects[ext.name]
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        args = ["-shared"] + objects + ["-o", str(out)]
        if ext.name == "genfast._C":
            args += ["-fopenmp"]
        elif ext.name == "genfast._cuda_emu":
            args += ["-pthread"]
        else:
            home = self.cuda["home"]
            libdir = next((d for d in ("lib64", "lib", "targets/x86_64-linux/lib") if (Path(home) / d / "libcudart_static.a").exists()), "lib64")
            # Static cudart: the module needs only the driver (libcuda) at run time.
            args += [f"-L{home}/{libdir}", "-lcudart_static", "-ldl", "-lrt", "-pthread"]
        subprocess.run([os.environ.get("CXX", "g++")] + args, check=True)
        self.built.append(ext.name)

    def write_build_info(self):
        info = {
            "built": self.built, "skipped": self.skipped,
            "cuda": {"built": bool(self.cuda), "archs": self.cuda["archs"] if self.cuda else [],
                     "toolkit": self.cuda["version"] if self.cuda else None,
                     "why": self.cuda["why"] if self.cuda else self.skipped.get("genfast._cuda")},
            "cpu_compiler": subprocess.run([os.environ.get("CXX", "g++"), "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        }
        # Beside the compiled modules, wherever this build puts them (a wheel, or in place).
        where = Path(self.get_ext_fullpath("genfast._C")).parent
        (where / "_build_info.py").write_text(f"# Written by setup.py at build time.\nBUILD = {info!r}\n")
        report = where / CUDA_USAGE.FILE_NAME
        if self.cuda:  # nvcc's resource report of this build, for genfast.devtools.gpu_compile
            tmp = Path(self.build_temp).resolve() / "genfast._cuda"
            found = [(Path(s).name, tmp / (Path(s).name + ".o.usage")) for s in CUDA_SOURCES]
            logs = {name: f.read_text() for name, f in found if f.is_file()}  # (the check compiles any missing)
            CUDA_USAGE.write(report, CSRC, self.cuda["archs"], self.cuda["version"], logs)
        elif report.exists():
            report.unlink()  # an earlier in-place build's


ext_modules = [Extension(n, sources=[]) for n in ("genfast._C", "genfast._cuda_emu", "genfast._cuda")]

setup(
    packages=["genfast", "genfast.ops", "genfast.nn", "genfast.zoo", "genfast.integrations", "genfast.devtools", "genfast.kernels",
              "genfast.patch"],
    package_dir={"genfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": NinjaBuildExt},
)
