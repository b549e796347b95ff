"""diffusers' flow-matching sampling on genfast's fused Euler / CFG step.

    handle = patch_scheduler(pipe.scheduler)   # FlowMatchEulerDiscreteScheduler.step, fused, no host sync
    latents = guided_step(pipe.scheduler, noise_pred, t, latents, guidance_scale=7.0)  # CFG + step in one pass
    flow = FlowTransformer(pipe.transformer)   # a diffusers transformer as a genfast.sample_rectified_flow model
    x = genfast.sample_rectified_flow(flow, shape, sigmas=sigmas, guidance=g - 1, labels=cond, null_label=uncond)

Conventions (diffusers' FlowMatchEulerDiscreteScheduler): x_t = (1 - sigma) x0 + sigma noise, the model
predicts v = noise - x0 and takes timestep = sigma * num_train_timesteps (1000); a step is
x + (sigma_next - sigma) v. genfast's step is x - dt v with t = sigma and dt = sigma - sigma_next: the
same update. Pipelines' CFG is uncond + g (cond - uncond) = (1 + w) cond - w uncond with w = g - 1.
diffusers is imported only when one of these is used.
"""
import types
from collections.abc import Mapping

import torch

from genfast.ops.flow_step import flow_euler_step

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scheduler_class():
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
    except ImportError as e:
        raise ImportError("genfast.patch.sampling needs diffusers: pip install 'genfast[diffusers]'") from e
    return FlowMatchEulerDiscreteScheduler


def _check_scheduler(scheduler):
    cls = _scheduler_class()
    if not isinstance(scheduler, cls):
        raise TypeError(f"scheduler must be a diffusers FlowMatchEulerDiscreteScheduler, "
                        f"got {type(scheduler).__name__}")
    if type(scheduler).step is not cls.step:  # a subclass with its own step: not ours to replace
        raise TypeError(f"scheduler's class {type(scheduler).__name__} overrides step(); only "
                        "FlowMatchEulerDiscreteScheduler's own step can be fused")
    return cls


class SchedulerPatch:
    """What patch_scheduler did; unpatch() (or leaving a `with` block) restores the original step."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    @property
    def patched(self):
        return getattr(self.scheduler.step, "_genfast_fused", False)

    def unpatch(self):
        if self.patched:
            del self.scheduler.step  # the instance attribute: the class's step shows through again
        return self.scheduler

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()

    def __repr__(self):
        return f"SchedulerPatch({type(self.scheduler).__name__}, patched={self.patched})"


def patch_scheduler(scheduler):
    """Replaces, on this instance only, FlowMatchEulerDiscreteScheduler.step by the fused step.

    Same signature, return type and latents (within rounding: one fused fp32 pass instead of
    upcast, multiply, add, cast). No host synchronisation: the step index is tracked as diffusers
    does, and the first step finds its index without reading the device (see _start_index).
    Cases the fused step does not cover (stochastic_sampling, per_token_timesteps, mixed or fp64
    dtypes) run the original step. Patching twice is harmless. Returns a SchedulerPatch.
    """
    _check_scheduler(scheduler)
    if "step" in vars(scheduler) and not getattr(scheduler.step, "_genfast_fused", False):
        raise ValueError("scheduler.step is already replaced on this instance by something else; not patching over it")
    if not getattr(scheduler.step, "_genfast_fused", False):
        scheduler.step = types.MethodType(_patched_step, scheduler)
    return SchedulerPatch(scheduler)


def _patched_step(self, model_output, timestep, sample, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
                  s_noise=1.0, generator=None, per_token_timesteps=None, return_dict=True):
    if not _fusable(self, model_output, timestep, sample, per_token_timesteps):
        cls = _scheduler_class()
        return cls.step(self, model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                        per_token_timesteps, return_dict)
    prev = _fused_step(self, timestep, sample, model_output)
    return _output(prev, return_dict)


_patched_step._genfast_fused = True  # how SchedulerPatch and a second patch_scheduler recognise it


def guided_step(scheduler, noise_pred, timestep, sample, *, guidance_scale, uncond_first=True, return_dict=False):
    """The pipeline's CFG combination and scheduler.step in one fused pass:

        noise_uncond, noise_cond = noise_pred.chunk(2)            (uncond_first=False: cond, uncond)
        scheduler.step(noise_uncond + g * (noise_cond - noise_uncond), timestep, sample)

    guidance_scale g: a float, a 0-d or a per-sample [B] tensor. Works on a patched or unpatched
    FlowMatchEulerDiscreteScheduler (its step index advances as step() would advance it). Returns
    (prev_sample,) or, with return_dict, the scheduler's output class.
    """
    _check_scheduler(scheduler)
    if not isinstance(noise_pred, torch.Tensor) or not isinstance(sample, torch.Tensor):
        raise TypeError("noise_pred and sample must be tensors")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, torch.Tensor)):
        raise TypeError(f"guidance_scale must be a float or a tensor, got {type(guidance_scale).__name__}")
    if noise_pred.dim() == 0 or noise_pred.shape[0] != 2 * sample.shape[0] or noise_pred.shape[1:] != sample.shape[1:]:
        raise ValueError(f"noise_pred must be the doubled batch [2 * {sample.shape[0]}, ...] of sample's shape "
                         f"{tuple(sample.shape)}, got {tuple(noise_pred.shape)}")
    if sample.dtype != noise_pred.dtype or sample.dtype not in _FUSED_DTYPES or scheduler.config.stochastic_sampling:
        first, second = noise_pred.chunk(2)  # not fusable: the pipeline's own two steps
        uncond, cond = (first, second) if uncond_first else (second, first)
        g = guidance_scale.reshape(-1, *[1] * (cond.dim() - 1)) if isinstance(guidance_scale, torch.Tensor) \
            else guidance_scale
        return scheduler.step(uncond + g * (cond - uncond), timestep, sample, return_dict=return_dict)
    first, second = noise_pred.chunk(2)  # views: read in place by the fused step
    cond, uncond = (second, first) if uncond_first else (first, second)
    prev = _fused_step(scheduler, timestep, sample, cond, uncond, guidance_scale - 1)
    return _output(prev, return_dict)


def _output(prev, return_dict):
    if not return_dict:
        return (prev,)
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
    return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev)


def _fusable(self, model_output, timestep, sample, per_token_timesteps):
    if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
        return False  # the original raises its error about integer timesteps
    return (per_token_timesteps is None and not self.config.stochastic_sampling
            and isinstance(model_output, torch.Tensor) and isinstance(sample, torch.Tensor)
            and model_output.dtype == sample.dtype and model_output.dtype in _FUSED_DTYPES
            and model_output.shape == sample.shape and model_output.device == sample.device)


def _fused_step(self, timestep, sample, v_cond, v_uncond=None, w=0.0):
    if self.step_index is None:
        self._step_index = _start_index(self, timestep)
    i = self.step_index
    out = flow_euler_step(sample, v_cond, v_uncond, dt=_dt(self, i, sample.device), guidance=w)
    self._step_index = i + 1
    return out


def _dt(self, i, device):
    """sigma_i - sigma_{i+1}, as diffusers rounds it (fp32): a Python float when the sigmas live on
    the CPU (exact, no copy), else a 0-d view of a device tensor made once per schedule (no sync)."""
    sigmas = self.sigmas
    cache = getattr(self, "_genfast_dts", None)
    if cache is None or cache[0] is not sigmas:
        d = sigmas[:-1] - sigmas[1:]  # sigma_next - sigma negated: exact in fp32
        cache = (sigmas, d.tolist() if d.device.type == "cpu" else d)
        self._genfast_dts = cache
    dts = cache[1]
    if i + 1 >= len(sigmas):
        raise IndexError(f"step index {i} is past the schedule's {len(sigmas) - 1} steps; call set_timesteps again")
    if isinstance(dts, list):
        return dts[i]
    return dts[i] if dts.device == device else dts[i].to(device)


def _start_index(self, timestep):
    """The first step's index, as diffusers' _init_step_index finds it but without reading the device:
    begin_index if set; a timestep that is an element of scheduler.timesteps (the pipelines' `for t in
    timesteps`) by its position in that tensor (diffusers' lookup by value differs only for a value
    the schedule repeats: it takes the second); a host value by a host lookup; else the original
    lookup (which synchronises, as unpatched diffusers does)."""
    if self.begin_index is not None:
        return self.begin_index
    ts = self.timesteps
    if isinstance(timestep, torch.Tensor) and timestep.dim() == 0 and ts.dim() == 1 and ts.device == timestep.device \
            and timestep.dtype == ts.dtype and timestep.untyped_storage().data_ptr() == ts.untyped_storage().data_ptr():
        off = timestep.storage_offset() - ts.storage_offset()
        if ts.stride(0) > 0 and off % ts.stride(0) == 0 and 0 <= off // ts.stride(0) < ts.shape[0]:
            return off // ts.stride(0)
    if (not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu") and ts.device.type == "cpu":
        return self.index_for_timestep(timestep)
    self._init_step_index(timestep)
    return self.step_index


class FlowTransformer:
    """A diffusers flow-matching transformer as a genfast.sample_rectified_flow model: v = f(x, t, cond).

    Calls transformer(x, timestep=t * timestep_scale, return_dict=False, **kwargs, **cond)[0], where
    cond is a class-label tensor (passed as class_labels: DiT) or a dict of batched conditioning
    tensors (encoder_hidden_states, pooled_projections, encoder_attention_mask...: SD3, PixArt, Flux),
    and kwargs are the unbatched ones given here (PixArt's added_cond_kwargs, Flux's img_ids/txt_ids).
    timestep_scale: 1000 (the scheduler's num_train_timesteps) for DiT, PixArt and SD3; 1 for Flux,
    whose pipeline passes sigma and whose model scales by 1000 itself. An output with more channels
    than x (DiT's and PixArt's learned variance) keeps its first x.shape[1] channels, as pipelines do.
    """

    def __init__(self, transformer, *, timestep_scale=1000.0, **kwargs):
        if not callable(transformer):
            raise TypeError(f"transformer must be callable (a diffusers transformer), got {type(transformer).__name__}")
        if isinstance(timestep_scale, bool) or not isinstance(timestep_scale, (int, float)) or timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be a positive number, got {timestep_scale!r}")
        self.transformer, self.timestep_scale, self.kwargs = transformer, float(timestep_scale), kwargs

    def __call__(self, x, t, cond=None):
        kw = dict(self.kwargs)
        if isinstance(cond, torch.Tensor):
            kw["class_labels"] = cond
        elif isinstance(cond, Mapping):
            kw.update(cond)
        elif cond is not None:
            raise TypeError(f"cond must be None, a class-label tensor or a dict of tensors, got {type(cond).__name__}")
        out = self.transformer(x, timestep=t * self.timestep_scale, return_dict=False, **kw)[0]
        return out if out.shape[1] == x.shape[1] else out[:, :x.shape[1]]

    def __repr__(self):
        return f"FlowTransformer({type(self.transformer).__name__}, timestep_scale={self.timestep_scale:g})"
