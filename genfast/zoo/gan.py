"""A small class-conditional DCGAN (Radford et al.) for 16x16 digits, trained with the
non-saturating generator loss (Goodfellow et al. 2014, section 3):

  D step:  max  E log D(x, y) + E log(1 - D(G(z, y), y))     (softplus form on the logits)
  G step:  max  E log D(G(z, y), y)   (instead of min log(1 - D(G)), which saturates early on)
The minimax value V(D, G) = E log D(x) + E log(1 - D(G(z))) is logged every step (log 4 ~ -1.386
at the game's equilibrium). The discriminator sees the label through a projection (Miyato & Koyama).
The smooth-latent demonstration: images along the line between two noise vectors, one class.
"""
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genfast import data
from genfast.zoo import _ops, classifier, plots, train


class Generator(nn.Module):
    def __init__(self, latent=32, classes=10, width=64):
        super().__init__()
        self.latent, self.width = latent, width
        self.embed = nn.Embedding(classes, latent)
        self.fc = nn.Linear(2 * latent, 2 * width * 16)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),   # 8x8
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.BatchNorm2d(width // 2), nn.ReLU(),  # 16x16
            nn.Conv2d(width // 2, 1, 3, 1, 1), nn.Tanh())

    def forward(self, z, y):
        h = self.fc(torch.cat([z, self.embed(y)], 1)).view(-1, 2 * self.width, 4, 4)
        return self.net(h)


class Discriminator(nn.Module):
    def __init__(self, classes=10, width=64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2),                                   # 8x8
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2),  # 4x4
            nn.Flatten(), nn.Linear(2 * width * 16, 256), nn.LeakyReLU(0.2))
        self.out = nn.Linear(256, 1)
        self.embed = nn.Embedding(classes, 256)  # projection discriminator

    def forward(self, x, y):
        h = self.net(x)
        return self.out(h).squeeze(1) + (self.embed(y) * h).sum(1)


def d_loss(d_real, d_fake):
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


def g_loss_non_saturating(d_fake):
    return F.softplus(-d_fake).mean()


def minimax_value(d_real, d_fake):
    """E log D(x) + E log(1 - D(G(z))) with D = sigmoid(logit)."""
    return (-F.softplus(-d_real).mean() - F.softplus(d_fake).mean()).item()


DEFAULTS = dict(train_steps=1500, batch=64, lr=2e-4, size=16, latent=32, width=64)


def train_model(cfg, *, out=None, seed=0, resume=False, progress=True):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = data.digits(cfg["size"], split="train")
    G, D = Generator(cfg["latent"], width=cfg["width"]), Discriminator(width=cfg["width"])
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg["lr"], betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg["lr"], betas=(0.5, 0.999))
    b = cfg["batch"]

    def step(i):
        G.train()
        D.train()
        idx = torch.randint(0, len(y), (b,), generator=g)
        real, lab = x[idx], y[idx]
        z = torch.randn(b, cfg["latent"], generator=g)
        fake = G(z, lab)
        d_real, d_fake = D(real, lab), D(fake.detach(), lab)
        ld = d_loss(d_real, d_fake)
        opt_d.zero_grad(set_to_none=True)
        ld.backward()
        opt_d.step()
        lg = g_loss_non_saturating(D(fake, lab))
        opt_g.zero_grad(set_to_none=True)
        lg.backward()
        opt_g.step()
        return {"loss": lg.item(), "d_loss": ld.item(), "minimax": minimax_value(d_real.detach(), d_fake.detach())}

    config = {k: cfg[k] for k in ("size", "latent", "width", "batch", "lr", "train_steps")}
    t0 = time.perf_counter()
    hist = train.fit(step, steps=cfg["train_steps"], state={"G": G, "D": D, "opt_g": opt_g, "opt_d": opt_d, "rng": g},
                     kind="gan", config=config, ckpt=None if out is None else Path(out) / "checkpoint.pt",
                     resume=resume, progress=progress, desc="training gan", items_per_step=b)
    return G, D, hist, time.perf_counter() - t0


@torch.no_grad()
def interpolate(G, z0, z1, label, steps=10):
    """Images along the straight line z0 -> z1 for one class (the notes' smooth-latent demo)."""
    G.eval()
    a = torch.linspace(0, 1, steps)[:, None]
    return G((1 - a) * z0 + a * z1, torch.full((steps,), label, dtype=torch.long))


def run(out="out/gan", *, seed=0, resume=False, progress=True, sample_steps=None, **overrides):
    cfg = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    G, D, hist, train_s = train_model(cfg, out=out, seed=seed, resume=resume, progress=progress)
    G.eval()
    clf, clf_acc = classifier.load_or_train(out, size=cfg["size"])
    gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(10).repeat_interleave(30)
    with torch.no_grad():
        xs = G(torch.randn(len(labels), cfg["latent"], generator=gen), labels)
    real, _ = data.digits(cfg["size"], split="test")
    s = classifier.score(clf, xs, labels, real)
    rows = [(f"class {c}", xs.view(10, 30, 1, cfg["size"], cfg["size"])[c, :12]) for c in range(10)]
    z0, z1 = torch.randn(2, cfg["latent"], generator=gen)
    strip = [(f"z0->z1, class {c}", interpolate(G, z0, z1, c, steps=12)) for c in (3, 8)]
    plots.save_grid(out / "samples.png", rows + strip, title="conditional DCGAN: one row per class; latent interpolation")
    plots.save_grid(out / "interpolation.png", strip, title="straight line between two noise vectors")
    plots.save_loss_curve(out / "loss.png", {"G (non-saturating)": hist["loss"], "D": hist["d_loss"]})
    metrics = {"model": "gan", "config": {k: cfg[k] for k in ("latent", "width", "batch", "lr")},
               "train_steps": cfg["train_steps"], "train_seconds": round(train_s, 1),
               "minimax_value_last100": sum(hist["minimax"][-100:]) / len(hist["minimax"][-100:]),
               "minimax_at_equilibrium": -2 * math.log(2),
               "classifier_test_accuracy": clf_acc, "sample_accuracy": s["accuracy"], "frechet": s["frechet"],
               "frechet_real_train_vs_test": classifier.frechet_distance(clf, data.digits(cfg["size"])[0], real),
               "ops": _ops.which()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
