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


def digits(size=16, *, split="train", holdout=0.2, seed=0):
    """scikit-learn's 8x8 handwritten digits (1797 images, shipped with scikit-learn), scaled to
    [-1, 1] and bilinearly upsampled to size x size: (images [n, 1, size, size] float32, labels [n]).
    split "train" | "test" | "all": a fixed class-stratified hold-out of `holdout` of each class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # pixel values 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if split == "all":
        return x, y
    g = torch.Generator().manual_seed(seed)
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        test[idx[: int(round(holdout * len(idx)))]] = True
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    keep = test if split == "test" else ~test
    return x[keep], y[keep]
