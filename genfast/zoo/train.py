"""The zoo's training loop: progress bar with loss and throughput, periodic atomic checkpoints,
--resume, and DistributedDataParallel when launched by torchrun.

fit() calls step_fn(step) -> {"loss": float, ...} for step = start .. steps-1. Everything a resumed
run needs (modules, optimizers, schedulers, RNG generators, the history) is in `state`, a dict of
objects with state_dict()/load_state_dict() or torch.Generators; the run continues bit-for-bit as
if it had not been interrupted.
"""
import os
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from genfast.zoo import checkpoint


def distributed():
    """(rank, world size, device: the GPU when there is one). Under torchrun (WORLD_SIZE > 1) the process group is set up on
    first call: gloo for CPU, nccl when each rank has a GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
        raise ValueError(f"genfast.zoo: local rank {local_rank} but this machine shows {torch.cuda.device_count()} "
                         "GPU(s): start at most one rank per GPU (torchrun --nproc_per_node), or hide the GPUs "
                         "(CUDA_VISIBLE_DEVICES=) to train on CPU ranks (gloo)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap(model):
    """DistributedDataParallel(model) when a process group is up, else the model."""
    if not dist.is_initialized():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def global_mean(value):
    """The mean over ranks of a scalar tensor (as a float); the value itself in one process."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


def _state_of(obj):
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def _restore(name, obj, saved, path):
    if isinstance(obj, torch.Generator):
        obj.set_state(saved)
    elif isinstance(obj, torch.nn.Module):
        checkpoint.load_model_state(path, obj, saved)
    else:
        try:
            obj.load_state_dict(saved)
        except (ValueError, KeyError, RuntimeError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path}: cannot restore {name!r}: {e}") from e


def fit(step_fn, *, steps, state, kind, config, ckpt=None, resume=False, every=200, progress=True, desc="training",
        items_per_step=None, unit="img"):
    """Runs the loop; returns the history {metric: [values per step]}."""
    history, start = {}, 0
    if resume and ckpt is not None and os.path.exists(ckpt):
        saved = checkpoint.load(ckpt, kind=kind, config=config)
        missing = sorted(set(state) - set(saved.get("state", {})))
        if missing:
            raise checkpoint.CheckpointError(f"checkpoint {ckpt} lacks {', '.join(missing)}")
        for name, obj in state.items():
            _restore(name, obj, saved["state"][name], ckpt)
        history, start = saved["history"], saved["step"]
    rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def write(step):
        if ckpt is not None and rank0:
            checkpoint.save(ckpt, {"step": step, "history": history,
                                   "state": {k: _state_of(v) for k, v in state.items()}}, kind=kind, config=config)

    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not (progress and rank0),
               dynamic_ncols=True)
    t0, n0 = time.perf_counter(), start
    for step in bar:
        out = step_fn(step)
        for k, v in out.items():
            history.setdefault(k, []).append(float(v))
        if bar.disable is False and (step % 10 == 0 or step == steps - 1):
            loss = history["loss"][-50:]
            post = {"loss": f"{sum(loss) / len(loss):.4f}"}
            if items_per_step:
                post[f"{unit}/s"] = f"{items_per_step * (step + 1 - n0) / (time.perf_counter() - t0):.0f}"
            bar.set_postfix(post)
        if ckpt is not None and every and (step + 1) % every == 0 and step + 1 < steps:
            write(step + 1)
    if start < steps:
        write(steps)
    return history


def smoothed(values, k=50):
    """Running mean over the last k values (for logs and the loss curve)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out
