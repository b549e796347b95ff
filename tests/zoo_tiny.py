"""Tiny zoo models shared by the zoo tests (not a test module; tests/conftest.py puts this folder on
sys.path)."""
import torch

from genfast.zoo import dit


def tiny_dit(**kw):
    """A 2-block DiT on 8x8 inputs with small random weights everywhere (adaLN-Zero's zeros would make
    outputs trivially equal)."""
    torch.manual_seed(0)
    cfg = dict(input_size=8, in_channels=1, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    cfg.update(kw)
    m = dit.DiT(**cfg)
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    return m
