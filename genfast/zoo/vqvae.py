"""VQ-VAE (van den Oord et al. 2017) and a GPT-style autoregressive prior over its token grid: the
notes' "images as sequences of discrete tokens".

  VQVAE    conv encoder -> 4x4 grid of D-dim vectors -> genfast.nn.VectorQuantizer (the fused
           nearest-code search; straight-through z_q, indices, codebook + beta * commitment loss;
           or ema=True: the codebook follows EMA cluster means, only the commitment term trains
           the encoder) -> conv decoder. Reports codebook usage (fraction of codes used,
           perplexity) from the quantizer's fused per-code counts.
  ARPrior  causal transformer over the 16 tokens (genfast attention, causal=True), optionally
           class-conditional through its start token; sampling with temperature / top-k,
           classifier-free guidance on the logits, and a KV cache (each new token attends to the
           cached keys: one token's work per step).
           Small (dim 64, depth 2) and trained with residual dropout, weight decay and early
           stopping on a validation split of the training grids: 1437 grids of 16 tokens are few,
           and the earlier dim-128, depth-4 prior without dropout overfit them (held-out 5.07
           bits / token, worse than the 4.9-bit unigram of the code frequencies; now 2.8).
"""
import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genfast import data
from genfast.nn import VectorQuantizer
from genfast.ops.vq import code_counts
from genfast.zoo import _ops, classifier, plots, train


class VQVAE(nn.Module):
    def __init__(self, *, size=16, dim=16, codebook_size=64, width=64, beta=0.25, ema=False, dead_code_threshold=0.0):
        super().__init__()
        self.config = dict(size=size, dim=dim, codebook_size=codebook_size, width=width, beta=beta, ema=ema,
                           dead_code_threshold=dead_code_threshold)
        self.encoder = nn.Sequential(nn.Conv2d(1, width, 4, 2, 1), nn.SiLU(), nn.Conv2d(width, width, 4, 2, 1),
                                     nn.SiLU(), nn.Conv2d(width, dim, 1))
        self.quantizer = VectorQuantizer(dim, codebook_size, beta=beta, ema=ema,
                                         dead_code_threshold=dead_code_threshold)
        self.decoder = nn.Sequential(nn.Conv2d(dim, width, 3, 1, 1), nn.SiLU(), nn.ConvTranspose2d(width, width, 4, 2, 1),
                                     nn.SiLU(), nn.ConvTranspose2d(width, width, 4, 2, 1), nn.SiLU(),
                                     nn.Conv2d(width, 1, 3, 1, 1))

    def encode(self, x):
        """-> (z_q [B, D, h, w], indices [B, h, w], vq loss)."""
        z = self.encoder(x).permute(0, 2, 3, 1)  # channels last: [B, h, w, D]
        zq, idx, loss = self.quantizer(z)
        return zq.permute(0, 3, 1, 2), idx, loss

    def decode_indices(self, idx):
        return self.decoder(self.quantizer.decode(idx).permute(0, 3, 1, 2))

    def forward(self, x):
        zq, idx, vq_loss = self.encode(x)
        rec = F.mse_loss(self.decoder(zq), x)
        return {"loss": rec + vq_loss, "recon": rec, "vq": vq_loss, "indices": idx}


def codebook_usage(indices, k):
    """Fraction of the k codes used and the perplexity of their distribution over `indices`
    (genfast's fused per-code counts, VectorQuantizer.usage's statistics)."""
    counts = code_counts(indices, k)
    p = counts.double() / counts.sum().clamp_min(1)
    return {"used_fraction": (counts > 0).double().mean().item(),
            "perplexity": math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())}


def unigram_bits(train_tokens, heldout_tokens, k):
    """The baseline an AR prior must beat: (entropy in bits of the code frequencies on the training
    tokens, cross-entropy in bits of the held-out tokens under those frequencies with add-one
    smoothing, so that a code unseen in training costs finite bits)."""
    counts = torch.bincount(train_tokens.flatten(), minlength=k).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log2()).sum().item()
    smoothed = (counts + 1) / (counts.sum() + k)
    return entropy, -smoothed.log2()[heldout_tokens.flatten()].mean().item()


class Block(nn.Module):
    def __init__(self, dim, heads, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.drop = nn.Dropout(dropout)  # residual dropout (GPT-2's): the prior's regulariser
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x, cache=None):
        """x [B, n, C]; with cache (a dict), the n new tokens attend to the cached keys too."""
        b, n, c = x.shape
        qkv = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # causal over the new block; with one new token and a cache it sees every cached key
        o = _ops.attention(q, k, v, causal=n > 1 or cache is None)
        x = x + self.drop(self.proj(o.transpose(1, 2).reshape(b, n, c)))
        return x + self.drop(self.fc2(_ops.gelu_tanh(self.fc1(self.ln2(x)))))


class ARPrior(nn.Module):
    """p(t_1..t_n | y) = prod p(t_i | t_<i, y); the start token is the class (or one shared token)."""

    def __init__(self, vocab, length, *, classes=10, dim=128, depth=4, heads=4, dropout=0.0):
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads} (a positive int)")
        self.config = dict(vocab=vocab, length=length, classes=classes, dim=dim, depth=depth, heads=heads,
                           dropout=dropout)
        self.vocab, self.length = vocab, length
        self.tok = nn.Embedding(vocab + classes + 1, dim)  # codes, class start tokens, unconditional start
        self.pos = nn.Parameter(torch.zeros(length, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(dim, heads, dropout) for _ in range(depth)])
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)
        self.classes = classes

    def start(self, y, b, device):
        """Start tokens: the class's, or the shared unconditional one where y is None or -1."""
        uncond = torch.full((b,), self.vocab + self.classes, device=device)
        return uncond if y is None else torch.where(y < 0, uncond, y + self.vocab)

    def forward(self, tokens, y=None):
        """Logits [B, n, vocab] of token i given the start token and tokens < i."""
        b, n = tokens.shape
        seq = torch.cat([self.start(y, b, tokens.device)[:, None], tokens[:, :-1]], 1)
        h = self.drop(self.tok(seq) + self.pos[:n])
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))

    @torch.no_grad()
    def bits_per_token(self, tokens, y=None):
        """Mean cross-entropy of `tokens` in bits (eval mode: no dropout)."""
        with self._eval_mode():
            logits = self(tokens, y)
        return F.cross_entropy(logits.reshape(-1, self.vocab), tokens.reshape(-1)).item() / math.log(2)

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode (no dropout) for the block; the training flag as it was afterwards."""
        was = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was)

    @torch.no_grad()
    def sample(self, b, y=None, *, temperature=1.0, top_k=None, guidance=0.0, generator=None, use_cache=True):
        """b token grids [b, length]. guidance w > 0 (needs y): classifier-free guidance on the logits,
        (1 + w) * conditional - w * unconditional (the prior also trains on the unconditional start
        token), through a doubled batch."""
        if guidance and y is None:
            raise ValueError("guidance needs class labels y")
        with self._eval_mode():  # no dropout while sampling
            return self._sample(b, y, temperature, top_k, guidance, generator, use_cache)

    def _sample(self, b, y, temperature, top_k, guidance, generator, use_cache):
        device = self.pos.device
        seq = self.start(y, b, device)[:, None]
        if guidance:  # rows b.. are the unconditional twins of rows ..b
            seq = torch.cat([seq, self.start(None, b, device)[:, None]])
        caches = [{} for _ in self.blocks] if use_cache else None
        out = []
        for i in range(self.length):
            if use_cache:  # only the newest token goes through the network
                h = self.tok(seq[:, -1:]) + self.pos[i]
                for blk, c in zip(self.blocks, caches):
                    h = blk(h, c)
            else:
                h = self.tok(seq) + self.pos[:i + 1]
                for blk in self.blocks:
                    h = blk(h)
            logits = self.head(self.ln(h[:, -1]))
            if guidance:
                cond, uncond = logits.chunk(2)
                logits = cond + guidance * (cond - uncond)
            logits = logits / max(temperature, 1e-6)
            if top_k is not None:
                kth = logits.topk(top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            out.append(nxt)
            seq = torch.cat([seq, torch.cat([nxt, nxt]) if guidance else nxt], 1)
        return torch.cat(out, 1)


DEFAULTS = dict(train_steps=1200, prior_steps=1000, batch=128, lr=2e-3, size=16, dim=16, codebook_size=64,
                # sampling: top-k 8 and classifier-free guidance, scored at each of `guidances` (measured on
                # the default run, 200 samples: plain sampling classified 0.64, Frechet 52)
                ema=True, temperature=1.0, top_k=8, guidances=(0.0, 0.5, 1.0), guidance=0.5,
                # the prior (see train_prior). Held-out bits / token on this VQ-VAE's tokens, 1000 steps
                # (unigram 4.90): dim 128, depth 4, no dropout 5.03 (its best, 2.93, at step 200);
                # + dropout 0.1: 3.33 (best 2.83); + dropout 0.2, weight decay 0.1: 2.84 (best 2.76);
                # dim 64, depth 2, dropout 0.1: 2.76, still falling at the end, at a third of the time
                prior_dim=64, prior_depth=2, prior_dropout=0.1, prior_weight_decay=0.01, prior_lr=1e-3,
                prior_val_fraction=0.1, prior_eval_every=50)
PRIOR_KEYS = ("prior_dim", "prior_depth", "prior_dropout", "prior_weight_decay", "prior_lr", "prior_val_fraction",
              "prior_eval_every")


class BestSoFar:
    """The prior's weights at its lowest validation bits per token so far (early stopping); a
    state_dict()/load_state_dict() object so that it is checkpointed and resumed with the run."""

    def __init__(self):
        self.bits, self.step, self.weights = float("inf"), -1, None

    def offer(self, bits, step, model):
        if bits < self.bits:
            self.bits, self.step = bits, step
            self.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state_dict(self):
        return {"bits": self.bits, "step": self.step, "weights": self.weights}

    def load_state_dict(self, state):
        self.bits, self.step, self.weights = state["bits"], state["step"], state["weights"]


def split_validation(n, fraction, seed):
    """(train indices, validation indices): a fixed random `fraction` of n held out for early stopping
    (the test split stays untouched for the reported figures)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(round(n * fraction))
    return perm[k:], perm[:k]


def train_prior(tokens, y, cfg, *, generator, ckpt=None, config=None, resume=False, progress=True):
    """The AR prior on (tokens, y), regularised: residual and embedding dropout, AdamW weight decay,
    and early stopping on a validation split of the training grids (the weights of the best
    validation bits per token are kept). Returns (prior, history)."""
    g, b = generator, cfg["batch"]
    tr, va = split_validation(len(y), cfg["prior_val_fraction"], 1234)
    prior = ARPrior(cfg["codebook_size"], tokens.shape[1], dim=cfg["prior_dim"], depth=cfg["prior_depth"],
                    heads=4, dropout=cfg["prior_dropout"])
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg["prior_lr"], weight_decay=cfg["prior_weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg["prior_steps"])
    best = BestSoFar()

    def step(i):
        prior.train()
        idx = tr[torch.randint(0, len(tr), (b,), generator=g)]
        yy = torch.where(torch.rand(b, generator=g) < 0.1, -1, y[idx])  # some unconditional
        loss = F.cross_entropy(prior(tokens[idx], yy).reshape(-1, prior.vocab), tokens[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        out = {"loss": loss.item()}
        if len(va) and ((i + 1) % cfg["prior_eval_every"] == 0 or i + 1 == cfg["prior_steps"]):
            out["val_bits"] = prior.bits_per_token(tokens[va], y[va])
            best.offer(out["val_bits"], i + 1, prior)
        return out

    # dropout draws from torch's global generator: checkpointed too, so that a resumed run is the same run
    state = {"prior": prior, "opt": opt, "sched": sched, "rng": g, "dropout_rng": torch.default_generator, "best": best}
    hist = train.fit(step, steps=cfg["prior_steps"], state=state,
                     kind="ar-prior", config=config, ckpt=ckpt, resume=resume, progress=progress,
                     desc="training ar prior", items_per_step=b, every=cfg.get("checkpoint_every", 200))
    if best.weights is not None:
        prior.load_state_dict(best.weights)
    hist["best_step"], hist["best_val_bits"] = best.step, best.bits
    return prior, hist


def train_models(cfg, *, out=None, seed=0, resume=False, progress=True):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = data.digits(cfg["size"], split="train")
    vq = VQVAE(size=cfg["size"], dim=cfg["dim"], codebook_size=cfg["codebook_size"], ema=cfg["ema"])
    opt = torch.optim.Adam([p for p in vq.parameters() if p.requires_grad], lr=cfg["lr"])
    ck = None if out is None else Path(out)

    def vq_step(i):
        vq.train()
        r = vq(x[torch.randint(0, len(y), (cfg["batch"],), generator=g)])
        opt.zero_grad(set_to_none=True)
        r["loss"].backward()
        opt.step()
        return {"loss": r["loss"].item(), "recon": r["recon"].item()}

    conf = {k: cfg[k] for k in ("size", "dim", "codebook_size", "ema", "batch", "lr", "train_steps", "prior_steps")}
    t0 = time.perf_counter()
    h1 = train.fit(vq_step, steps=cfg["train_steps"], state={"model": vq, "opt": opt, "rng": g}, kind="vqvae",
                   config=conf, ckpt=ck and ck / "checkpoint.pt", resume=resume, progress=progress,
                   desc="training vq-vae", items_per_step=cfg["batch"])
    vq.eval()
    with torch.no_grad():
        tokens = vq.encode(x)[1].flatten(1)
    prior, h2 = train_prior(tokens, y, cfg, generator=g, ckpt=ck and ck / "prior.pt", resume=resume,
                            config={**conf, **{k: cfg[k] for k in PRIOR_KEYS}}, progress=progress)
    return vq, prior, h1, h2, time.perf_counter() - t0


def run(out="out/vqvae", *, seed=0, resume=False, progress=True, sample_steps=None, **overrides):
    cfg = {**DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vq, prior, h1, h2, secs = train_models(cfg, out=out, seed=seed, resume=resume, progress=progress)
    test, test_y = data.digits(cfg["size"], split="test")
    train_x, _ = data.digits(cfg["size"], split="train")
    with torch.no_grad():
        r = vq(test)
        test_tokens = r["indices"].flatten(1)
        labels = torch.arange(10).repeat_interleave(20)
        samples = {}
        for w in dict.fromkeys((*cfg["guidances"], cfg["guidance"])):
            toks = prior.sample(len(labels), labels, temperature=cfg["temperature"], top_k=cfg["top_k"], guidance=w,
                                generator=torch.Generator().manual_seed(seed + 1))
            samples[w] = vq.decode_indices(toks.view(-1, *r["indices"].shape[1:])).clamp(-1, 1)
        xs = samples[cfg["guidance"]]
        prior.eval()
        bpt = prior.bits_per_token(test_tokens, test_y)
        bpt_uncond = prior.bits_per_token(test_tokens)
        train_tokens = vq.encode(train_x)[1]
    unigram_entropy, unigram_heldout = unigram_bits(train_tokens, test_tokens, cfg["codebook_size"])
    clf, clf_acc = classifier.load_or_train(out, size=cfg["size"])
    scores = {w: classifier.score(clf, x, labels, test) for w, x in samples.items()}
    s = scores[cfg["guidance"]]
    rows = [("data", test[:12]), ("reconstruction", vq.decode_indices(r["indices"][:12]).clamp(-1, 1).detach())]
    rows += [(f"class {c}", xs.view(10, 20, 1, cfg["size"], cfg["size"])[c, :12]) for c in range(10)]
    rows += [(f"w={w:g}", x.view(10, 20, 1, cfg["size"], cfg["size"])[:, 0]) for w, x in samples.items()]
    plots.save_grid(out / "samples.png", rows,
                    title=f"VQ-VAE reconstructions; AR-prior samples (top-k {cfg['top_k']}), one row per class at "
                          f"guidance w={cfg['guidance']:g}, then one row per guidance weight")
    plots.save_loss_curve(out / "loss.png", {"vq-vae loss": h1["loss"], "prior cross-entropy (nats)": h2["loss"]})
    metrics = {"model": "vqvae", "config": vq.config, "prior": prior.config, "train_seconds": round(secs, 1),
               "heldout_recon_mse": r["recon"].item(), "heldout_bits_per_token": bpt,
               "heldout_bits_per_token_unconditional": bpt_uncond,
               # reference figures: a unigram prior (the training code frequencies) and a uniform one
               "unigram_entropy_bits": unigram_entropy, "unigram_heldout_bits_per_token": unigram_heldout,
               "uniform_bits_per_token": math.log2(cfg["codebook_size"]),
               "prior_beats_unigram": bpt < unigram_heldout,
               "prior_early_stop": {"best_step": h2["best_step"], "validation_bits_per_token": h2["best_val_bits"],
                                    "of_steps": cfg["prior_steps"]},
               "codebook_usage_train": codebook_usage(train_tokens, cfg["codebook_size"]),
               "codebook_usage_last_batch": vq.quantizer.usage(),
               "sample_accuracy": s["accuracy"], "frechet": s["frechet"], "classifier_test_accuracy": clf_acc,
               "guidance": cfg["guidance"], "by_guidance": {str(w): v for w, v in scores.items()},
               "temperature": cfg["temperature"], "top_k": cfg["top_k"], "ops": _ops.which()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

