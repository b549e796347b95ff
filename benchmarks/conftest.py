"""The harness every genfast benchmark suite uses (DESIGN.md §6): the `compare` fixture (see Compare;
benchmarks/README.md has an example suite and the options --bench-quick and --bench-malloc).

All impls of a case run in the same run: warm-up (compile time excluded), then interleaved rounds
in a shuffled order each round (see _interleave), because CPU bandwidth on the 2-core machines swings 33-81 GB/s
minutes apart; speedups and %copy are medians of per-round (paired) ratios. CPU: wall clock; GPU:
CUDA events after a sync. At the end: a table and benchmarks/results/<device>-<commit>.json.
"""
import ctypes
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import statistics
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).parent / "results"
_COPY = "<copy>"  # the reference copy's key among the timed callables
_STATE = pytest.StashKey[dict]()


def pytest_addoption(parser):
    g = parser.getgroup("genfast benchmarks")
    g.addoption("--bench-quick", action="store_true", default=os.environ.get("GENFAST_BENCH_QUICK") == "1",
                help="short timing budget per case (smoke run); results file gets a -quick suffix")
    g.addoption("--bench-budget", type=float, default=float(os.environ.get("GENFAST_BENCH_BUDGET_S", "0") or 0),
                help="seconds of timed rounds per case (default 2, quick 0.3): longer on a noisy machine, where "
                     "a 2 s case's ratios were seen to swing +-5 %% between runs")
    g.addoption("--bench-malloc", choices=("keep", "raise"), default=os.environ.get("GENFAST_BENCH_MALLOC", "keep"),
                help="raise: mallopt() the glibc mmap/trim thresholds to 1 GiB before any benchmark runs")


def pytest_configure(config):
    quick = config.getoption("bench_quick", False)
    config.stash[_STATE] = {
        "device": torch.device("cuda" if torch.cuda.is_available() else "cpu"), "quick": quick,
        "cases": [], "copy_bulk": [], "malloc": _malloc(config.getoption("bench_malloc", "keep")),
        # seconds: timed rounds per case, warm-up per impl, one repetition
        "budget_s": config.getoption("bench_budget", 0) or (0.3 if quick else 2.0), "warm_s": 0.01 if quick else 0.05,
        "rep_s": 1e-3,
    }


def _malloc(mode):
    """The allocator settings in effect; with mode 'raise', glibc's thresholds go to 1 GiB first
    (otherwise large temporaries are unmapped on free and page-faulted in again on every call)."""
    info = {k: os.environ.get(k) for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    if mode == "raise":
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = libc.mallopt(-3, 1 << 30) == 1 and libc.mallopt(-1, 1 << 30) == 1  # M_MMAP_/M_TRIM_THRESHOLD
            info["mallopt"] = "mmap_threshold=trim_threshold=1GiB" if ok else "refused"
        except OSError as e:
            info["mallopt"] = f"unavailable: {e}"
    return info


def _clock(device):
    """seconds(fn, n) for n back-to-back calls: wall clock on CPU, CUDA events after a sync on GPU."""
    def cpu(fn, n):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return time.perf_counter() - t0

    def cuda(fn, n):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3
    return cuda if device.type == "cuda" else cpu


def _warm(clock, fn, warm_s):
    """One untimed call (compilation, lazy init), then doubling batches until warm_s: seconds/call."""
    fn()
    n, t = 1, clock(fn, 1)
    while t < warm_s:
        n *= 2
        t = clock(fn, n)
    return t / n


def _interleave(clock, fns, per_call, st):
    """Per-call seconds of every round, the impls taking turns in a fresh (seeded) order each round.
    Not a rotation: with a fixed cyclic order every impl always ran right after the same neighbour
    and inherited its cache and heap state (measured: bf16 attention 4.8 ms right after the plain
    path, 3.2 ms after itself), a bias a shuffled order spreads over all neighbours."""
    inner = {k: max(1, round(st["rep_s"] / per_call[k])) for k in fns}
    rounds = st["budget_s"] / sum(inner[k] * per_call[k] for k in fns)
    rounds = int(min(2000, max(5 if st["quick"] else 11, rounds)))
    names, samples = list(fns), {k: [] for k in fns}
    order = random.Random(len(names) * 1000 + rounds)  # reproducible per case
    gc_on = gc.isenabled()
    gc.disable()  # a collection inside one impl's repetition is noise, not its cost
    try:
        for _ in range(rounds):
            for k in order.sample(names, len(names)):
                samples[k].append(clock(fns[k], inner[k]) / inner[k])
    finally:
        if gc_on:
            gc.enable()
    return samples, inner


def _cpu_seconds():
    """(busy CPU seconds of the whole machine, of this process), to see who else used the cores."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    t = os.times()
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system  # all but idle, iowait


def _others(c0, c1, seconds):
    """Share of all cores that other processes used between two _cpu_seconds() readings."""
    return max(0.0, (c1[0] - c0[0] - (c1[1] - c0[1])) / (seconds * (os.cpu_count() or 1))) if c0 and c1 else 0.0


def _measure(clock, fns, per_call, st):
    """_interleave, retried (3 tries, 1 quick) while other processes took >10% of the cores: with
    OpenMP, a thread that loses its core stalls every parallel region. Before a try, waits for a
    quiet half second (4 s at most per case; these machines are shared). Keeps the least disturbed."""
    best, polls = None, 0 if st["quick"] else 8
    for _ in range(1 if st["quick"] else 3):
        while polls:
            polls, c0 = polls - 1, _cpu_seconds()
            time.sleep(0.5)
            if _others(c0, _cpu_seconds(), 0.5) < 0.1:
                break
        c0, t0 = _cpu_seconds(), time.perf_counter()
        samples, inner = _interleave(clock, fns, per_call, st)
        others = _others(c0, _cpu_seconds(), time.perf_counter() - t0)
        if best is None or others < best[2]:
            best = samples, inner, others
        if others < 0.1:
            break
    return best


def _copy_fn(device, nbytes):
    """x.copy_(y) moving ~nbytes (read + write) through two float32 buffers: (fn, exact bytes)."""
    src = torch.ones(max(1, nbytes // 8), device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 8 * src.numel()


def _bulk_copy(st):
    """The device's bulk copy bandwidth (far beyond the caches); taken at the session's start and end."""
    fn, nbytes = _copy_fn(st["device"], (2 << 30) if st["device"].type == "cuda" else (256 << 20))
    clock = _clock(st["device"])
    s, _ = _interleave(clock, {"copy": fn}, {"copy": _warm(clock, fn, st["warm_s"])}, {**st, "budget_s": 0.3})
    return {"bytes": nbytes, "gbps": nbytes / statistics.median(s["copy"]) / 1e9,
            "at": datetime.datetime.now().isoformat(timespec="seconds")}


def _short(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


class Compare:
    """compare(case, impls, *, bytes=None, flops=None, targets=None, note="") -> the case's record.

    impls: {name: zero-arg callable | "why it cannot run"}; the first entry is the subject (genfast),
    the others are baselines. bytes/flops: analytic counts per call, for GB/s and %copy, TFLOP/s.
    targets: {baseline: minimum speedup}, printed next to the ratios, never asserted. Once per test.
    """

    def __init__(self, request, benchmark):
        self.request, self.benchmark, self.st = request, benchmark, request.config.stash[_STATE]
        self.device, self.quick, self._used = self.st["device"], self.st["quick"], False

    @staticmethod
    def compile(fn, **kwargs):
        """torch.compile on a fresh code object: dynamo caches per code object, so one function compiled
        for many shapes would reach the recompile limit and silently run eager."""
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        return torch.compile(fresh, **{"dynamic": False, "fullgraph": True, **kwargs})

    def __call__(self, case, impls, *, bytes=None, flops=None, targets=None, note=""):
        if self._used:
            raise RuntimeError("compare() runs once per test (pytest-benchmark's fixture can be fed once)")
        self._used, st, clock, subject = True, self.st, _clock(self.device), next(iter(impls))
        if not st["copy_bulk"]:
            st["copy_bulk"].append(_bulk_copy(st))
        live, per_call, skipped = {}, {}, {}
        for name, fn in impls.items():
            try:
                if isinstance(fn, str):
                    skipped[name] = fn.removeprefix("skipped: ")
                else:
                    per_call[name], live[name] = _warm(clock, fn, st["warm_s"]), fn
            except Exception as e:  # a baseline that cannot run is reported, never dropped
                if name == subject:
                    raise
                skipped[name] = _short(e)
        if bytes:  # a copy of the same byte count takes part in the rounds: %copy is a same-moment ratio
            live[_COPY], copy_bytes = _copy_fn(self.device, bytes)
            per_call[_COPY] = _warm(clock, live[_COPY], st["warm_s"])
        samples, inner, others = _measure(clock, live, per_call, st)
        copy = samples.pop(_COPY, None)
        rec = {"case": case, "test": self.request.node.nodeid, "subject": subject, "note": note, "bytes": bytes,
               "flops": flops, "copy_bytes": copy and copy_bytes,
               "copy_gbps": copy and copy_bytes / statistics.median(copy) / 1e9,
               "others_cpu_frac": others, "loadavg_1m": os.getloadavg()[0], "impls": {}, "ratios": {}}
        for name in impls:
            if name in skipped:
                rec["impls"][name] = {"skipped": skipped[name]}
                rec["ratios"][name] = f"skipped: {skipped[name]}"
                continue
            s = samples[name]
            q1, _, q3 = statistics.quantiles(s, n=4)
            r = rec["impls"][name] = {"median_s": statistics.median(s), "q1_s": q1, "q3_s": q3, "min_s": min(s),
                                      "rounds": len(s), "calls_per_rep": inner[name]}
            if bytes:
                r["gbps"] = bytes / r["median_s"] / 1e9
                r["frac_copy"] = statistics.median(bytes / copy_bytes * c / t for c, t in zip(copy, s))
            if flops:
                r["tflops"] = flops / r["median_s"] / 1e12
            if name != subject:  # paired: both timed in the same round, so drift over minutes cancels
                r["speedup"] = rec["ratios"][name] = statistics.median(b / a for a, b in zip(samples[subject], s))
                if targets and name in targets:
                    r["target"], r["meets_target"] = targets[name], r["speedup"] >= targets[name]
        st["cases"].append(rec)
        fn = live[subject]
        if self.device.type == "cuda":  # pytest-benchmark's wall clock must wait for the GPU
            fn = (lambda f: lambda: (f(), torch.cuda.synchronize()))(fn)
        self.benchmark.extra_info.update(rec)
        self.benchmark.pedantic(fn, rounds=5 if self.quick else 20, iterations=inner[subject], warmup_rounds=1)
        return rec


@pytest.fixture
def compare(request, benchmark):
    return Compare(request, benchmark)


# ------------------------------------------------------------------------------ session output
def _device_info(dev):
    if dev.type == "cuda":
        name, extra = torch.cuda.get_device_name(), {"capability": torch.cuda.get_device_capability(),
                                                     "cuda": torch.version.cuda}
    else:
        name, extra = platform.processor() or "cpu", {"cpu_count": os.cpu_count()}
        try:
            with open("/proc/cpuinfo") as f:
                name = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
    words = re.findall(r"[a-z0-9]+", re.sub(r"\((tm|r)\)|\bcpu\b|processor|\d+-core", "", name.lower()))
    slug = ("" if dev.type == "cuda" else "cpu-") + ("-".join(words[:4]) or "unknown")
    return {"name": name, "slug": slug, **extra}


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_sessionfinish(session):
    st = session.config.stash.get(_STATE, None)
    if not st or not st["cases"]:
        return
    st["copy_bulk"].append(_bulk_copy(st))
    # GENFAST_COMMIT: the commit the code is at where git cannot say (a lent GPU's copy of the tree
    # carries an older HEAD)
    dev, commit = _device_info(st["device"]), os.environ.get("GENFAST_COMMIT") or _git("rev-parse", "--short", "HEAD") or "nocommit"
    spec = importlib.util.find_spec("genfast")  # which genfast ran: installed or a checkout
    out = {
        "device": dev, "commit": commit, "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "genfast_file": spec and spec.origin,
        "quick": st["quick"], "budget_s_per_case": st["budget_s"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
                     "genfast": _version("genfast"), "pytest_benchmark": _version("pytest-benchmark")},
        "threads": {"torch": torch.get_num_threads(), "torch_interop": torch.get_num_interop_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "allocator": st["malloc"], "copy_bulk_start_end": st["copy_bulk"], "cases": st["cases"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    st["path"] = RESULTS / f"{dev['slug']}-{commit}{'-quick' if st['quick'] else ''}.json"
    st["path"].write_text(json.dumps(out, indent=1) + "\n")
    cb = st["copy_bulk"]
    st["header"] = (f"{dev['name']}, {out['threads']['torch']} threads, torch {torch.__version__}, triton "
                    f"{out['versions']['triton']}; bulk copy {cb[0]['gbps']:.1f} -> {cb[1]['gbps']:.1f} GB/s (start "
                    f"-> end, {cb[0]['bytes'] >> 20} MiB moved); malloc: "
                    + (", ".join(f"{k}={v}" for k, v in st["malloc"].items() if v) or "glibc defaults"))


def _t(s):
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter):
    tr, st = terminalreporter, terminalreporter.config.stash.get(_STATE, None)
    if not st or "path" not in st:
        return
    label = {id(c): c["case"] + (f" [others {c['others_cpu_frac']:.0%}]" if c["others_cpu_frac"] > 0.1 else "")
             for c in st["cases"]}
    w, notes = max(map(len, label.values())) + 2, {}
    tr.write_sep("=", "genfast benchmarks" + (" (quick)" if st["quick"] else ""))
    tr.write_line(st["header"])
    tr.write_line(f"{'case':<{w}}{'impl':<10}{'median':>11}{'speedup':>10}{'GB/s':>8}{'%copy':>7}{'TFLOP/s':>9}  target")
    for c in st["cases"]:
        for i, (name, r) in enumerate(c["impls"].items()):
            head = f"{label[id(c)] if i == 0 else '':<{w}}{name:<10}"
            if "skipped" in r:
                tr.write_line(f"{head} skipped: {r['skipped'][:90]}")
                continue
            cols = [f"{r['speedup']:.2f}x" if "speedup" in r else "-", f"{r['gbps']:.1f}" if "gbps" in r else "-",
                    f"{100 * r['frac_copy']:.0f}%" if "frac_copy" in r else "-",
                    f"{r['tflops']:.2f}" if "tflops" in r else "-"]
            tg = f">={r['target']:g}x {'ok' if r['meets_target'] else 'MISSED'}" if "target" in r else ""
            tr.write_line(f"{head}{_t(r['median_s']):>11}{cols[0]:>10}{cols[1]:>8}{cols[2]:>7}{cols[3]:>9}  {tg}")
        if c["note"]:
            notes.setdefault(c["note"], []).append(c["case"])
    tr.write_line("speedup = baseline time / subject time, %copy = GB/s over that of x.copy_(y) moving the same "
                  "bytes: medians of per-round ratios (interleaved rounds). Targets are printed, not asserted.")
    busy = [c for c in st["cases"] if c["others_cpu_frac"] > 0.1]
    if busy:
        tr.write_line(f"WARNING: other processes took >10% of the {os.cpu_count()} cores during {len(busy)} case(s) "
                      "even after retries ([others N%]): their times are inflated, even the ratios are suspect.")
    for note, cases in notes.items():
        tr.write_line(f"note ({len(cases)} case{'s' * (len(cases) > 1)}): {note}")
    tr.write_line(f"results: {st['path']}")
