"""Checkpoints that survive a crash and explain themselves when they can't be used.

save() writes to a temporary file in the same folder, fsyncs it and os.replace()s it over the old
one: the rename is atomic, so a crash mid-write leaves the last good checkpoint intact. load()
turns every way a file can be wrong (missing, truncated, not a genfast checkpoint, another model,
another configuration) into a CheckpointError that names the file and says what is wrong.
"""
import os
import tempfile
from pathlib import Path

import torch

FORMAT = 1


class CheckpointError(RuntimeError):
    pass


def save(path, state, *, kind, config=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"genfast_checkpoint": FORMAT, "kind": kind, "config": config, **state}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def load(path, *, kind, config=None):
    """The saved dict; CheckpointError if the file is unreadable or belongs to another model/config."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, garbage bytes, a pickle of something else
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({type(e).__name__}: {e}); "
                              "delete it or point --out elsewhere to start afresh") from e
    if not isinstance(state, dict) or state.get("genfast_checkpoint") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a genfast checkpoint (format {FORMAT})")
    if state.get("kind") != kind:
        raise CheckpointError(f"checkpoint {path} holds a {state.get('kind')!r} model, expected {kind!r}")
    if config is not None and state.get("config") != config:
        diff = sorted(k for k in set(config) | set(state.get("config") or {})
                      if (state.get("config") or {}).get(k) != config.get(k))
        raise CheckpointError(f"checkpoint {path} was written with another configuration (differs in: "
                              f"{', '.join(diff)}); use the same options or another --out")
    return state


def load_model_state(path, model, state_dict):
    """model.load_state_dict with the mismatch reported against the file."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[0]}") from e
