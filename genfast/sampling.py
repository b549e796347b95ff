"""Rectified-flow sampling on the fused Euler / CFG step (the lecture notes' sampler), optionally
replayed from a CUDA graph (small models and batches are launch-bound on a GPU)."""
import itertools
import weakref
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from genfast import reference
from genfast.ops.flow_step import flow_euler_step


def sample_rectified_flow(model, shape, *, steps=None, guidance=None, labels=None, null_label=None,
                          schedule="uniform", shift=1.0, sigmas=None, generator=None, progress=False,
                          device=None, dtype=torch.float32, cuda_graph=False):
    """Samples x ~ data by walking t from 1 (noise) to 0 with Euler steps x <- x - dt * v.

    model(x, t) or model(x, t, labels) returns the velocity v = noise - data at time t ([B] float32,
    x_t = (1 - t) data + t noise). With `guidance` (a float or a per-sample tensor [B]) the model runs
    once on a doubled batch (labels, then `null_label`) and v = (1 + w) v_cond - w v_uncond, fused
    into the step (diffusers' guidance_scale g is w = g - 1).

    labels: class labels [B] (null_label: the unconditional class, an int or a tensor [B]), or a
        dict of conditioning tensors with batch dim B (say a diffusers transformer's
        encoder_hidden_states / pooled_projections, see genfast.patch.sampling.FlowTransformer);
        null_label is then the dict of the unconditional ones, same keys and shapes.
    steps, schedule, shift: steps+1 times from 1 to 0, "uniform" or "shifted"
        (t -> shift t / (1 + (shift - 1) t)); steps defaults to 50.
    sigmas: the times themselves instead (a decreasing 1-D tensor, t_0 .. t_steps), e.g. a diffusers
        FlowMatchEulerDiscreteScheduler's `sigmas` after set_timesteps.
    cuda_graph: capture one step (model + fused step) in a CUDA graph and replay it (CUDA only;
        a CPU device raises ValueError). No autograd then; the model must be capturable (no host
        syncs, no data-dependent shapes) and deterministic or using the default CUDA generator.
        The capture is reused by later calls with the same model object, shapes and weights (see
        _graphed_sample); after changing the model's code in place, call clear_cuda_graphs().
    The noise comes from torch.randn(shape, generator=generator) outside any graph, so a plain loop
    with the same generator gives the same samples (genfast.reference.sample_rectified_flow).
    """
    t = _times(steps, schedule, shift, sigmas, device)
    steps = t.shape[0] - 1
    b = shape[0]
    if guidance is not None and (labels is None or null_label is None):
        raise ValueError("guidance needs labels and null_label (the unconditional class) for the doubled batch")
    _check_labels("labels", labels, b)
    if cuda_graph:
        _require_cuda(torch.device(device) if device is not None else torch.get_default_device())
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    t = t.to(x.device)
    dts = t[:-1] - t[1:]
    cond = _doubled(labels, null_label, b) if guidance is not None else labels
    if cuda_graph:
        with torch.no_grad():
            return _graphed_sample(model, x, t, dts, cond, guidance, progress)
    in_place = not torch.is_grad_enabled()
    # on the CPU the step sizes as floats (the same fp32 values; no sync there): the op's short path
    dts = dts.tolist() if x.device.type == "cpu" and not dts.requires_grad else dts
    for i in tqdm(range(steps), disable=not progress, desc="sampling", leave=False):
        out = x if in_place else None
        if guidance is None:
            v = model(x, t[i].expand(b)) if labels is None else model(x, t[i].expand(b), labels)
            x = flow_euler_step(x, v, dt=dts[i], out=out)
        else:
            v = model(torch.cat([x, x]), t[i].expand(2 * b), cond)
            v_cond, v_uncond = v.chunk(2)  # strided halves, read in place by the fused step
            x = flow_euler_step(x, v_cond, v_uncond, dt=dts[i], guidance=guidance, out=out)
    return x


class CudaGraphStep:
    """One sampling step (model + fused Euler / CFG step, in place on a static x) captured in a CUDA
    graph; run() replays it once per step after writing that step's t and dt into static buffers.

    Follows torch.cuda.graphs' recipe: warm-up on a side stream (lazy init, cuBLAS workspaces,
    torch.compile autotuning happen outside the capture), then the capture on that same stream.
    The graph reads its own static copies of x, the conditioning and a tensor guidance; run()
    copies the call's values into them (device to device), so the loop never synchronises.
    """

    WARMUP = 3

    def __init__(self, model, x, cond=None, guidance=None):
        _require_cuda(x.device)
        b = x.shape[0]
        self.model, self.b = model, b
        self.cond = _map(cond, torch.clone)
        # a host scalar would be a host-to-device copy inside the capture: a device copy instead
        self.guidance = guidance.to(x.device, torch.float32).clone() if isinstance(guidance, torch.Tensor) else guidance
        self.x = x.clone()
        self.t = torch.ones(2 * b if guidance is not None else b, device=x.device)  # the model's time input
        self.dt = torch.zeros((), device=x.device)  # zero: the warm-up steps leave x as it is
        self.graph = self._capture(x.device)

    def _capture(self, device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):  # the warmed-up stream: its BLAS handles exist
            self._step()
        return graph

    def _step(self):
        x = self.x
        if self.guidance is None:
            v = self.model(x, self.t) if self.cond is None else self.model(x, self.t, self.cond)
            flow_euler_step(x, v, dt=self.dt, out=x)
        else:
            v_cond, v_uncond = self.model(torch.cat([x, x]), self.t, self.cond).chunk(2)
            flow_euler_step(x, v_cond, v_uncond, dt=self.dt, guidance=self.guidance, out=x)

    def run(self, x, t, dts, *, cond=None, guidance=None, progress=False):
        """Replays the step for t[0] .. t[-2] (device tensors) from x; returns a new tensor.
        cond / a tensor guidance: this call's values (same structure and shapes as at capture)."""
        self.x.copy_(x)
        if cond is not None:
            _map2(self.cond, cond, lambda static, new: new is static or static.copy_(new))
        if isinstance(guidance, torch.Tensor) and guidance is not self.guidance:
            self.guidance.copy_(guidance.to(torch.float32).expand_as(self.guidance))
        for i in tqdm(range(dts.shape[0]), disable=not progress, desc="sampling", leave=False):
            self.t.copy_(t[i].expand(self.t.shape[0]))
            self.dt.copy_(dts[i])
            self.graph.replay()
        return self.x.clone()  # self.x is overwritten by the next call


def _require_cuda(device):
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got device {device}; use cuda_graph=False on the CPU")


# model -> (key, CudaGraphStep): the last captured step per model, reused while the key holds.
_GRAPHS = weakref.WeakKeyDictionary()


def clear_cuda_graphs():
    """Drops the cached graphs (and their memory pools) of sample_rectified_flow(cuda_graph=True)."""
    _GRAPHS.clear()


def _graphed_sample(model, x, t, dts, cond, guidance, progress):
    """Replays a cached capture when the model object, shapes, dtypes, conditioning structure, a float
    guidance, and the model's module objects and parameter / buffer tensors are all unchanged;
    captures anew otherwise (or every call for a model whose weights it cannot see)."""
    key = _graph_key(model, x, cond, guidance)
    try:
        cached = _GRAPHS.get(model) if key is not None else None
    except TypeError:  # not weak-referenceable
        key, cached = None, None
    if cached is not None and cached[0] == key:
        step = cached[1]
    else:
        if key is not None:
            _GRAPHS.pop(model, None)  # free the old graph's pool before capturing
        step = CudaGraphStep(model, x, cond, guidance)
        if key is not None:
            _GRAPHS[model] = (key, step)
    return step.run(x, t, dts, cond=cond, guidance=guidance, progress=progress)


def _graph_key(model, x, cond, guidance):
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "transformer", None)
    if not isinstance(module, torch.nn.Module):
        return None
    weights = tuple(p.data_ptr() for p in itertools.chain(module.parameters(), module.buffers()))
    structure = _map(cond, lambda c: (tuple(c.shape), c.dtype, c.device))
    if isinstance(structure, dict):
        structure = tuple(sorted(structure.items()))
    g = ("tensor", tuple(guidance.shape), guidance.device) if isinstance(guidance, torch.Tensor) else guidance
    return (tuple(x.shape), x.dtype, x.device, structure, g, weights, tuple(map(id, module.modules())))


def _map(cond, fn):
    if cond is None:
        return None
    return {k: fn(v) for k, v in cond.items()} if isinstance(cond, Mapping) else fn(cond)


def _map2(static, new, fn):
    if isinstance(static, Mapping):
        for k in static:
            fn(static[k], new[k])
    else:
        fn(static, new)


def _times(steps, schedule, shift, sigmas, device):
    """t_0 .. t_steps (float32): the given sigmas, else reference.timesteps(steps or 50)."""
    if sigmas is None:
        steps = 50 if steps is None else steps
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return reference.timesteps(steps, schedule=schedule, shift=shift, device=device)
    if not isinstance(sigmas, torch.Tensor) or not sigmas.is_floating_point() or sigmas.dim() != 1 \
            or sigmas.shape[0] < 2:
        raise ValueError("sigmas must be a 1-D floating tensor of at least 2 times (t_0 = noise .. t_steps), got "
                         + (f"shape {tuple(sigmas.shape)} {sigmas.dtype}" if isinstance(sigmas, torch.Tensor)
                            else type(sigmas).__name__))
    if steps is not None and steps != sigmas.shape[0] - 1:
        raise ValueError(f"steps={steps!r} does not match sigmas ({sigmas.shape[0] - 1} steps)")
    return sigmas.to(torch.float32)


def _check_labels(name, labels, b):
    if labels is None:
        return
    items = labels.items() if isinstance(labels, Mapping) else [(None, labels)]
    for key, value in items:
        what = name if key is None else f"{name}[{key!r}]"
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != b:
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{what} must be a tensor with batch size {b} (first dim), got {got}")


def _doubled(labels, null, b):
    """The doubled batch's conditioning: labels, then the unconditional ones (built once per call)."""
    if isinstance(labels, Mapping):
        if not isinstance(null, Mapping) or set(null) != set(labels):
            raise ValueError(f"null_label must be a dict with the keys of labels ({sorted(labels)}), got "
                             + (str(sorted(null)) if isinstance(null, Mapping) else type(null).__name__))
        for k, v in labels.items():
            if not isinstance(null[k], torch.Tensor) or null[k].shape != v.shape:
                raise ValueError(f"null_label[{k!r}] must be a tensor of shape {tuple(v.shape)} like labels[{k!r}]")
        return {k: torch.cat([v, null[k].to(v.device, v.dtype)]) for k, v in labels.items()}
    if isinstance(null, torch.Tensor):
        if null.shape != labels.shape:
            raise ValueError(f"null_label must be an int or a tensor of shape {tuple(labels.shape)}, "
                             f"got shape {tuple(null.shape)}")
        return torch.cat([labels, null.to(labels.device, labels.dtype)])
    return torch.cat([labels, torch.full_like(labels, null)])
