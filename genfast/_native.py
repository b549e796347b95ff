"""Loads genfast's compiled modules; a missing or broken one degrades to a reason, never an
ImportError at `import genfast` (the C++/CUDA backends are optional speed-ups)."""
import importlib
import warnings

_MODULES = {}  # name -> (module or None, reason it is unavailable)
# The compiled module each compiled kernel backend runs on (genfast.backends' names).
MODULE_OF = {"cpu": "_C", "cuda": "_cuda", "cuda_emu": "_cuda_emu"}


def module(name):
    """genfast._C / _cuda / _cuda_emu, or None when it was not built or does not load."""
    return status(name)[0]


def for_backend(name):
    """module() of compiled kernel backend `name` ("cpu", "cuda" or "cuda_emu")."""
    return module(MODULE_OF[name])


def status(name):
    if name not in _MODULES:
        try:
            _MODULES[name] = (importlib.import_module(f"genfast.{name}"), "")
        except ImportError as e:
            _MODULES[name] = (None, f"genfast.{name} is not available ({e})")
    return _MODULES[name]


def build_info():
    try:
        from genfast._build_info import BUILD
    except ImportError:
        return None
    return BUILD


def warn_if_cpu_module_missing():
    mod, why = status("_C")
    if mod is None:
        warnings.warn(
            f"genfast: the C++ CPU kernels are missing, CPU tensors use the plain-PyTorch reference ({why}). "
            "Reinstall with `pip install .` from the genfast checkout to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
