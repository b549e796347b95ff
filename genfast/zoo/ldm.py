"""Latent diffusion (Rombach et al.): a KL autoencoder compresses 16x16 digits to a 4x4x4 latent,
and the rectified-flow DiT of the main job is trained and sampled in that latent space, then
decoded. As in modern LDM pipelines the autoencoder may add a GAN loss on its decoder (a small
patch discriminator, non-saturating, switched on after a warm-up) for sharper reconstructions.

Latent: per-position Gaussian posterior (mu, logvar) through genfast's reparam_kl, a small KL
weight (the latent stays informative), scaled to unit variance before the flow sees it (SD's
scaling factor, measured on the training set).
"""
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genfast import data
from genfast.zoo import _ops, classifier, flow_job, gan, plots, train

LATENT = 4  # channels of the 4x4 latent


class AutoencoderKL(nn.Module):
    def __init__(self, width=64, latent=LATENT):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.SiLU(), nn.Conv2d(width, width, 4, 2, 1), nn.SiLU(),
                                     nn.Conv2d(width, 2 * latent, 3, 1, 1))
        self.decoder = nn.Sequential(nn.Conv2d(latent, width, 3, 1, 1), nn.SiLU(),
                                     nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU(),
                                     nn.ConvTranspose2d(width, width // 2, 4, 2, 1), nn.SiLU(),
                                     nn.Conv2d(width // 2, 1, 3, 1, 1))

    def encode(self, x, *, generator=None, sample=True):
        h = self.encoder(x)  # [mu; logvar] along dim 1
        if not sample:
            return h.chunk(2, dim=1)[0], None
        return _ops.reparam_kl_moments(h, generator=generator, reduction="per_sample")

    def decode(self, z):
        return self.decoder(z)


class PatchDiscriminator(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(width, 2 * width, 4, 2, 1),
                                 nn.LeakyReLU(0.2), nn.Conv2d(2 * width, 1, 3, 1, 1))

    def forward(self, x):
        return self.net(x).flatten(1)  # one logit per 4x4 patch


DEFAULTS = dict(ae_steps=800, batch=128, lr=2e-3, kl_weight=1e-3, gan_weight=0.05, gan_start=400, gan=True,
                flow_steps=800)


def train_autoencoder(cfg, *, out=None, seed=0, resume=False, progress=True):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, _ = data.digits(16, split="train")
    ae, disc = AutoencoderKL(), PatchDiscriminator()
    opt = torch.optim.Adam(ae.parameters(), lr=cfg["lr"])
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg["lr"] / 4, betas=(0.5, 0.999))

    def step(i):
        ae.train()
        xb = x[torch.randint(0, len(x), (cfg["batch"],), generator=g)]
        z, kl = ae.encode(xb, generator=g)
        rec = ae.decode(z)
        loss = F.l1_loss(rec, xb) + cfg["kl_weight"] * kl.mean() / z[0].numel()
        use_gan = cfg["gan"] and i >= cfg["gan_start"]
        if use_gan:
            loss = loss + cfg["gan_weight"] * gan.g_loss_non_saturating(disc(rec))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out = {"loss": loss.item(), "l1": F.l1_loss(rec.detach(), xb).item(), "kl": kl.mean().item()}
        if use_gan:
            ld = gan.d_loss(disc(xb), disc(rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            ld.backward()
            opt_d.step()
        return out

    conf = {k: cfg[k] for k in ("ae_steps", "batch", "lr", "kl_weight", "gan_weight", "gan_start", "gan")}
    hist = train.fit(step, steps=cfg["ae_steps"], state={"ae": ae, "disc": disc, "opt": opt, "opt_d": opt_d, "rng": g},
                     kind="ldm-autoencoder", config=conf, ckpt=None if out is None else Path(out) / "autoencoder.pt",
                     resume=resume, progress=progress, desc="training autoencoder", items_per_step=cfg["batch"])
    return ae, hist


def run(out="out/ldm", *, seed=0, resume=False, progress=True, train_steps=None, sample_steps=None, batch=None,
        **_):
    cfg = {**DEFAULTS, **({"flow_steps": train_steps} if train_steps else {})}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ae, hist_ae = train_autoencoder(cfg, out=out, seed=seed, resume=resume, progress=progress)
    ae.eval()
    x, y = data.digits(16, split="train")
    with torch.no_grad():
        lat = ae.encode(x, sample=False)[0]
    scale = float(1.0 / lat.std())  # unit-variance latents for the flow
    fcfg = {**flow_job.DEFAULTS, "size": 4, "channels": LATENT, "train_steps": cfg["flow_steps"],
            "dit": dict(hidden_size=128, depth=4, num_heads=4, patch_size=1),
            **({"sample_steps": sample_steps} if sample_steps else {})}
    dit, hist, _ = flow_job.train_model(fcfg, out=out, seed=seed, resume=resume, progress=progress,
                                        dataset=(lat * scale, y), ckpt_name="flow.pt")
    dit = dit.cpu()
    train_s = time.perf_counter() - t0
    clf, clf_acc = classifier.load_or_train(out, size=16)
    real, real_y = data.digits(16, split="test")
    with torch.no_grad():
        recon = ae.decode(ae.encode(real, sample=False)[0]).clamp(-1, 1)
    scores = {}
    rows = [("data", real[:10]), ("reconstruction", recon[:10])]
    for w in fcfg["guidances"]:
        zs, labels = flow_job.sample_grid(dit, fcfg, w, per_class=fcfg["samples_per_class"], seed=seed + 1)
        with torch.no_grad():
            xs = ae.decode(zs / scale).clamp(-1, 1)
        scores[str(w)] = classifier.score(clf, xs, labels, real)
        rows.append((f"w={w:g}", xs.view(10, -1, 1, 16, 16)[:, 0]))
    plots.save_grid(out / "samples.png", rows, title="latent rectified-flow DiT (4x4x4 latents), decoded")
    plots.save_loss_curve(out / "loss.png", {"autoencoder": hist_ae["loss"], "latent flow": hist["loss"]})
    metrics = {"model": "ldm", "latent_shape": list(lat.shape[1:]), "latent_scale": scale, "autoencoder_gan": cfg["gan"],
               "heldout_recon_l1": F.l1_loss(recon, real).item(),
               "recon_accuracy": classifier.accuracy(clf, recon, real_y), "classifier_test_accuracy": clf_acc,
               "train_seconds": round(train_s, 1), "guidance": scores, "ops": _ops.which()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
