"""The patch handle: the undo log, the report, and the walk over a model's modules."""
import types
from dataclasses import dataclass, field

MARK = "_genfast_patch"  # set on every module / processor the patch swapped; the value is the handle
ORIGINAL_FORWARD = "_genfast_original_forward"  # on a module whose forward was swapped: its own before


@dataclass
class PatchEntry:
    path: str        # the module's name in model.named_modules() ("" is the model itself)
    kind: str        # "attention" | "norm" | "block"
    cls: str         # the module's (or processor's) class name
    swapped: bool
    reason: str = ""  # why it was left alone (or what it became)

    def as_dict(self):
        return dict(path=self.path, kind=self.kind, cls=self.cls, swapped=self.swapped, reason=self.reason)


@dataclass
class PatchReport:
    """What genfast.patch did: .swapped and .skipped (lists of PatchEntry), counts(), str()."""
    model: str
    entries: list = field(default_factory=list)

    @property
    def swapped(self):
        return [e for e in self.entries if e.swapped]

    @property
    def skipped(self):
        return [e for e in self.entries if not e.swapped]

    def counts(self):
        """{kind: {"swapped": n, "skipped": m}}."""
        out = {}
        for e in self.entries:
            c = out.setdefault(e.kind, {"swapped": 0, "skipped": 0})
            c["swapped" if e.swapped else "skipped"] += 1
        return out

    def as_dict(self):
        return dict(model=self.model, counts=self.counts(), entries=[e.as_dict() for e in self.entries])

    def __str__(self):
        lines = [f"genfast.patch({self.model}):"]
        for kind, c in sorted(self.counts().items()):
            lines.append(f"  {kind}: {c['swapped']} swapped, {c['skipped']} left alone")
        why = {}
        for e in self.skipped:  # group the left-alone parts by reason: a 28-block model has few reasons
            why.setdefault((e.kind, e.cls, e.reason), []).append(e.path or "<model>")
        for (kind, cls, reason), paths in why.items():
            shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} in all)" if len(paths) > 3 else "")
            lines.append(f"  left alone: {kind} {cls} at {shown}: {reason}")
        return "\n".join(lines)


class PatchHandle:
    """Returned by genfast.patch: .report, .unpatch(), and a context manager (unpatch on exit)."""

    def __init__(self, model):
        self.model = model
        self.report = PatchReport(type(model).__name__)
        self._undo = []  # callables, run in reverse order
        self.active = True

    # -- recording ---------------------------------------------------------------------------
    def add(self, path, kind, cls, swapped, reason=""):
        self.report.entries.append(PatchEntry(path, kind, cls, swapped, reason))

    def set_forward(self, module, fn):
        """module.forward = fn bound to module (this instance only); undone exactly."""
        had = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        bound = types.MethodType(fn, module)
        module.forward = bound
        # the forward an unpatched instance runs, for the swapped one's fallback: a bound method
        # torch.compile traces (it refuses type(module).forward(module, ...) on diffusers' blocks)
        module.__dict__[ORIGINAL_FORWARD] = old if had else types.MethodType(type(module).forward, module)
        setattr(module, MARK, self)

        def undo():
            if module.__dict__.get("forward") is bound:  # unless someone swapped it again since
                if had:
                    module.forward = old
                else:
                    del module.__dict__["forward"]
            if getattr(module, MARK, None) is self:
                delattr(module, MARK)
                module.__dict__.pop(ORIGINAL_FORWARD, None)
        self._undo.append(undo)

    def set_attr(self, obj, name, value, mark=None):
        """obj.name = value, undone exactly (the attribute deleted again if obj had none of its own)."""
        d = obj.__dict__
        had, old = name in d, d.get(name)
        setattr(obj, name, value)
        if mark is not None:
            setattr(mark, MARK, self)

        def undo():
            if obj.__dict__.get(name) is value:
                if had:
                    setattr(obj, name, old)
                else:
                    delattr(obj, name)
            if mark is not None and getattr(mark, MARK, None) is self:
                delattr(mark, MARK)
        self._undo.append(undo)

    def on_unpatch(self, fn):
        self._undo.append(fn)

    # -- user API ----------------------------------------------------------------------------
    def unpatch(self):
        """Restores every swapped processor and forward; harmless when called again."""
        while self._undo:
            self._undo.pop()()
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()
        return False

    def __repr__(self):
        c = self.report.counts()
        n = sum(v["swapped"] for v in c.values())
        return f"<genfast PatchHandle of {self.report.model}: {n} parts swapped{'' if self.active else ', unpatched'}>"


def already_patched(obj):
    h = getattr(obj, MARK, None)
    return h is not None and h.active


def apply(model, *, attention, norms, blocks):
    handle = PatchHandle(model)
    from genfast.patch import _zoo

    kinds = {"attention": attention, "norm": norms, "block": blocks}
    _zoo.patch_modules(handle, model, kinds)
    if _diffusers_loaded():
        from genfast.patch import _diffusers

        _diffusers.patch_modules(handle, model, kinds)
    return handle


def _diffusers_loaded():
    """A model can only hold diffusers modules if diffusers was imported: never import it here."""
    import sys

    return "diffusers" in sys.modules
