"""Data that ships with the install: a synthetic 2-D Gaussian mixture, and scikit-learn's 8x8
digits (upsampled where a model needs it). Nothing is downloaded."""
import math

import torch


def gaussian_ring(n, *, modes=8, radius=4.0, std=0.35, generator=None):
    """n points of a ring of `modes` Gaussians; returns (points [n, 2] float32, labels [n] int64)."""
    labels = torch.randint(0, modes, (n,), generator=generator)
    angle = labels.float() * (2 * math.pi / modes)
    centres = torch.stack([angle.cos(), angle.sin()], 1) * radius
    return centres + std * torch.randn(n, 2, generator=generator), labels


def ring_centres(modes=8, radius=4.0):
    angle = torch.arange(modes).float() * (2 * math.pi / modes)
    return torch.stack([angle.cos(), angle.sin()], 1) * radius


def energy_distance(a, b):
    """Energy distance between two point clouds (0 iff same distribution): a sample-quality score."""
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()
