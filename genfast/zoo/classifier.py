"""The sample-quality yardstick: a small CNN digit classifier trained inside the project on the same
16x16 digits (never downloaded), cached in the output folder. It gives
  - the accuracy on class-conditional samples (is a sample of "3" classified as 3?), and
  - the Frechet distance between real and generated images in its 128-d penultimate features
    (FID's formula, on this classifier instead of Inception; comparable only within this project).
"""
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genfast import data
from genfast.zoo import checkpoint

FEATURES = 128


class DigitClassifier(nn.Module):
    def __init__(self, size=16):
        super().__init__()
        self.size = size
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, FEATURES), nn.GELU())
        self.head = nn.Linear(FEATURES, 10)

    def features(self, x):
        return self.conv(x)

    def forward(self, x):
        return self.head(self.features(x))


def _shift(x, generator):
    """Random translations by up to one pixel (the samples need not be centred like the data)."""
    dx, dy = torch.randint(-1, 2, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_classifier(*, size=16, epochs=12, batch=64, seed=0, progress=False):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = data.digits(size, split="train")
    model = DigitClassifier(size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(y) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def _key(size, epochs, seed):
    return hashlib.sha1(json.dumps({"v": 1, "size": size, "epochs": epochs, "seed": seed}).encode()).hexdigest()[:12]


def load_or_train(cache_dir, *, size=16, epochs=12, seed=0):
    """The classifier cached at cache_dir/classifier-<key>.pt (trained on first use, ~10 s), and its
    held-out accuracy."""
    path = Path(cache_dir) / f"classifier-{_key(size, epochs, seed)}.pt"
    model = DigitClassifier(size)
    if path.exists():
        state = checkpoint.load(path, kind="digit-classifier")
        model.load_state_dict(state["model"])
        model.eval()
        return model, state["test_accuracy"]
    model = train_classifier(size=size, epochs=epochs, seed=seed)
    acc = accuracy(model, *data.digits(size, split="test"))
    checkpoint.save(path, {"model": model.state_dict(), "test_accuracy": acc}, kind="digit-classifier")
    return model, acc


@torch.no_grad()
def accuracy(model, x, y):
    return (model(x.float()).argmax(1) == y).float().mean().item()


@torch.no_grad()
def frechet_distance(model, a, b):
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of the classifier features."""
    fa, fb = model.features(a.float()).double(), model.features(b.float()).double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    sa, sb = torch.cov(fa.T), torch.cov(fb.T)
    ev, vec = torch.linalg.eigh(sa)
    sa_half = vec @ torch.diag(ev.clamp(min=0).sqrt()) @ vec.T
    cross = torch.linalg.eigvalsh(sa_half @ sb @ sa_half).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + sa.trace() + sb.trace() - 2 * cross).item()


def score(model, samples, labels, real):
    """{"accuracy": classified as their label, "frechet": distance to the real images}."""
    samples = samples.clamp(-1, 1)
    return {"accuracy": accuracy(model, samples, labels), "frechet": frechet_distance(model, real, samples)}
