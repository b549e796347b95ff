"""A plain-PyTorch DiT block and genfast.nn.DiTBlock with the same random weights, shared by the DiT
block tests (not a test module; tests/conftest.py puts this folder on sys.path)."""
import torch
from torch import nn

import genfast.nn
from genfast import reference


def block_pair(hidden=64, heads=4, dtype=torch.float32, seed=0, std=0.2):
    """(reference.DiTBlock, genfast.nn.DiTBlock) in dtype, weights ~ N(0, std) (adaLN-Zero's zero
    initialisation would make the modulation trivial)."""
    torch.manual_seed(seed)
    ref = reference.DiTBlock(hidden, heads)
    for p in ref.parameters():
        nn.init.normal_(p, std=std)
    ours = genfast.nn.DiTBlock(hidden, heads)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype), ours.to(dtype)
