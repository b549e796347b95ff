"""Variational autoencoder (Kingma & Welling): MLP or small CNN encoder/decoder, Gaussian posterior
through genfast's reparam_kl (one fused pass: sample + KL), Gaussian or Bernoulli likelihood.

Per image, in nats:  ELBO = E_q[log p(x|z)] - KL(q(z|x) || N(0, I)) <= log p(x); the loss is -ELBO.
  bernoulli  pixels mapped to [0, 1] act as the Bernoulli means' targets (binary cross-entropy with
             soft targets: the usual choice for digits; not a normalised density of real-valued x)
  gaussian   N(x; decoder(z), sigma^2) with one learned log-sigma (a proper density of x in [-1, 1])
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


class VAE(nn.Module):
    def __init__(self, *, arch="cnn", size=16, latent=16, hidden=256, likelihood="bernoulli"):
        super().__init__()
        if arch not in ("mlp", "cnn"):
            raise ValueError(f"arch must be 'mlp' or 'cnn', got {arch!r}")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        for name, v in (("size", size), ("latent", latent), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if arch == "cnn" and size % 4:
            raise ValueError(f"size must be a multiple of 4 for arch='cnn' (two stride-2 convolutions), got {size}")
        self.config = dict(arch=arch, size=size, latent=latent, hidden=hidden, likelihood=likelihood)
        self.size, self.latent, self.likelihood = size, latent, likelihood
        d = size * size
        if arch == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                         nn.SiLU(), nn.Linear(hidden, 2 * latent))
            self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                         nn.Linear(hidden, d), nn.Unflatten(1, (1, size, size)))
        else:
            s4 = size // 4
            self.encoder = nn.Sequential(
                nn.Conv2d(1, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.SiLU(), nn.Flatten(),
                nn.Linear(64 * s4 * s4, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent))
            self.decoder = nn.Sequential(
                nn.Linear(latent, hidden), nn.SiLU(), nn.Linear(hidden, 64 * s4 * s4), nn.SiLU(),
                nn.Unflatten(1, (64, s4, s4)), nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.SiLU(),
                nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.SiLU(), nn.Conv2d(32, 1, 3, 1, 1))
        self.log_sigma = nn.Parameter(torch.tensor(-1.0)) if likelihood == "gaussian" else None

    def moments(self, x):
        """The encoder output: mu and logvar concatenated along dim 1."""
        return self.encoder(x)

    def encode(self, x):
        mu, logvar = self.moments(x).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        """Decoder output: Bernoulli logits or Gaussian means (both [B, 1, size, size])."""
        return self.decoder(z)

    def mean_image(self, z):
        """The image in [-1, 1] the decoder stands for at z."""
        out = self.decode(z)
        return torch.sigmoid(out) * 2 - 1 if self.likelihood == "bernoulli" else out.clamp(-1, 1)

    def log_likelihood(self, out, x):
        """log p(x | z) per image [B]."""
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, (x + 1) / 2, reduction="none").flatten(1).sum(1)
        ls = self.log_sigma
        return (-0.5 * ((x - out) / ls.exp()).pow(2) - ls - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    def forward(self, x, *, generator=None, noise=None, beta=1.0):
        """{"loss": -ELBO (beta-weighted KL) mean, "elbo", "recon" (-log p(x|z)), "kl"}: means over the batch."""
        # the encoder output whole: the backward writes d(mu) and d(logvar) into one buffer (no split backward)
        z, kl = _ops.reparam_kl_moments(self.moments(x), generator=generator, noise=noise, reduction="per_sample")
        rec = -self.log_likelihood(self.decode(z), x)
        return {"loss": (rec + beta * kl).mean(), "elbo": -(rec + kl).mean(), "recon": rec.mean(), "kl": kl.mean(),
                "z": z}

    @torch.no_grad()
    def sample(self, n, *, generator=None):
        return self.mean_image(torch.randn(n, self.latent, generator=generator))


DEFAULTS = dict(train_steps=1500, batch=128, lr=2e-3, size=16, arch="cnn", latent=16, hidden=256,
                likelihood="bernoulli", beta_warmup=300)


def train_model(cfg, *, out=None, seed=0, resume=False, progress=True):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, _ = data.digits(cfg["size"], split="train")
    model = VAE(arch=cfg["arch"], size=cfg["size"], latent=cfg["latent"], hidden=cfg["hidden"],
                likelihood=cfg["likelihood"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["train_steps"])

    def step(i):
        model.train()
        idx = torch.randint(0, len(x), (cfg["batch"],), generator=g)
        beta = min(1.0, (i + 1) / cfg["beta_warmup"]) if cfg["beta_warmup"] else 1.0  # KL warm-up
        r = model(x[idx], generator=g, beta=beta)
        opt.zero_grad(set_to_none=True)
        r["loss"].backward()
        opt.step()
        sched.step()
        return {"loss": r["loss"].item(), "elbo": r["elbo"].item(), "recon": r["recon"].item(), "kl": r["kl"].item()}

    config = {k: cfg[k] for k in ("size", "arch", "latent", "hidden", "likelihood", "batch", "lr", "train_steps")}
    t0 = time.perf_counter()
    hist = train.fit(step, steps=cfg["train_steps"], state={"model": model, "opt": opt, "sched": sched, "rng": g},
                     kind="vae", config=config, ckpt=None if out is None else Path(out) / "checkpoint.pt",
                     resume=resume, progress=progress, desc=f"training vae ({cfg['arch']})",
                     items_per_step=cfg["batch"])
    return model, hist, time.perf_counter() - t0


@torch.no_grad()
def heldout_elbo(model, x, *, samples=1, seed=0):
    """Mean ELBO terms over held-out images (nats per image), averaged over `samples` draws of z."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    acc = {"elbo": 0.0, "recon": 0.0, "kl": 0.0}
    for _ in range(samples):
        r = model(x, generator=g)
        for k in acc:
            acc[k] += r[k].item() / samples
    return acc


def run(out="out/vae", *, seed=0, resume=False, progress=True, sample_steps=None, **overrides):
    cfg = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, hist, train_s = train_model(cfg, out=out, seed=seed, resume=resume, progress=progress)
    test, test_y = data.digits(cfg["size"], split="test")
    ev = heldout_elbo(model, test, samples=4, seed=seed)
    clf, clf_acc = classifier.load_or_train(out, size=cfg["size"])
    g = torch.Generator().manual_seed(seed + 1)
    samples = model.sample(300, generator=g)
    with torch.no_grad():
        recon = model.mean_image(model.encode(test[:12])[0])
    rows = [("data", test[:12]), ("reconstruction", recon)] + [(f"sample {i}", samples[12 * i:12 * i + 12]) for i in range(6)]
    plots.save_grid(out / "samples.png", rows, title=f"VAE ({cfg['arch']}, {cfg['likelihood']}): held-out data, "
                    "reconstructions (posterior mean), prior samples")
    plots.save_loss_curve(out / "loss.png", {"-ELBO (nats/image)": [-v for v in hist["elbo"]], "KL": hist["kl"]})
    metrics = {"model": "vae", "config": model.config, "train_steps": cfg["train_steps"],
               "train_seconds": round(train_s, 1),
               "heldout_elbo_nats_per_image": ev["elbo"], "heldout_recon_nll": ev["recon"], "heldout_kl": ev["kl"],
               "heldout_elbo_nats_per_pixel": ev["elbo"] / cfg["size"] ** 2,
               "classifier_test_accuracy": clf_acc,
               "frechet_prior_samples": classifier.frechet_distance(clf, test, samples),
               "frechet_real_train_vs_test": classifier.frechet_distance(clf, data.digits(cfg["size"])[0], test),
               "ops": _ops.which()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
