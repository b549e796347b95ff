"""The zoo's VAE, VQ-VAE + AR prior and GAN: losses, the pieces the notes define, training lowers
the loss, and the same outputs with the genfast ops as with GENFAST_BACKEND=reference. Tiny models,
few steps (the whole file: well under a minute on 2 CPU cores)."""
import math

import pytest
import torch

import genfast
import genfast.nn
from genfast import data
from genfast.zoo import _ops, gan, vae, vqvae


def _same_with_reference_backend(fn, monkeypatch):
    """fn() with the genfast ops, with GENFAST_BACKEND=reference, and with the seam's eager versions."""
    a = fn()
    monkeypatch.setenv("GENFAST_BACKEND", "reference")
    b = fn()
    monkeypatch.delenv("GENFAST_BACKEND")
    with _ops.use_genfast(False):
        c = fn()
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(x, z, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- VAE
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_vae_elbo_terms(arch, likelihood, monkeypatch):
    torch.manual_seed(0)
    m = vae.VAE(arch=arch, likelihood=likelihood, latent=4, hidden=32)
    x = data.digits(16, split="test")[0][:6]
    noise = torch.randn(6, 4)
    r = m(x, noise=noise)
    torch.testing.assert_close(r["elbo"], -(r["recon"] + r["kl"]))
    mu, logvar = m.encode(x)
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1)
    torch.testing.assert_close(r["kl"], kl.mean())
    torch.testing.assert_close(r["z"], mu + (0.5 * logvar).exp() * noise)
    if likelihood == "gaussian":  # a proper density: -log N(x; mean, sigma^2) summed over pixels
        mean = m.decode(r["z"])
        nll = -torch.distributions.Normal(mean, m.log_sigma.exp()).log_prob(x).flatten(1).sum(1).mean()
        torch.testing.assert_close(r["recon"], nll)

    def run():
        m.zero_grad()
        out = m(x, noise=noise)
        out["loss"].backward()
        return out["loss"], out["z"], m.encoder[-1].weight.grad.clone()
    _same_with_reference_backend(run, monkeypatch)


def test_vae_training_lowers_the_loss():
    cfg = {**vae.DEFAULTS, "train_steps": 80, "arch": "mlp", "hidden": 128}
    _, h, _ = vae.train_model(cfg, progress=False)
    assert sum(h["elbo"][-10:]) / 10 > sum(h["elbo"][:10]) / 10 + 20  # nats per image


def test_vae_bad_options():
    with pytest.raises(ValueError, match="arch"):
        vae.VAE(arch="rnn")
    with pytest.raises(ValueError, match="likelihood"):
        vae.VAE(likelihood="poisson")
    with pytest.raises(ValueError, match="size must be a multiple of 4"):  # failed in the first forward before
        vae.VAE(arch="cnn", size=10)
    with pytest.raises(ValueError, match="latent"):
        vae.VAE(latent=0)
    vae.VAE(arch="mlp", size=10)  # any size for the MLP


def test_zoo_bad_configs_name_the_argument():
    """Caught at construction with the argument's name (each used to fail later, in a forward's reshape)."""
    from genfast.zoo import dit_variants

    with pytest.raises(ValueError, match="divisible by heads"):
        vqvae.ARPrior(16, 8, dim=30, heads=4)
    with pytest.raises(ValueError, match="context_len"):
        dit_variants.ConditionedDiT(mode="cross", context_len=0, input_size=8, hidden_size=32, depth=1, num_heads=2)
    with pytest.raises(TypeError, match="beta"):
        vqvae.VQVAE(beta="a")
    with pytest.raises(TypeError, match="decay"):
        genfast.nn.VectorQuantizer(4, 8, decay="0.9")


# ---------------------------------------------------------------------------------------- VQ-VAE
@pytest.mark.parametrize("ema", [False, True])
def test_vqvae_quantizer_and_reference_backend(ema, monkeypatch):
    torch.manual_seed(0)
    m = vqvae.VQVAE(codebook_size=16, width=16, ema=ema).eval()
    x = data.digits(16, split="test")[0][:4]

    def run():
        m.zero_grad()
        r = m(x)
        r["loss"].backward()
        return r["loss"], r["indices"].float(), m.encoder[0].weight.grad.clone()
    _same_with_reference_backend(run, monkeypatch)
    zq, idx, _ = m.encode(x)
    z = m.encoder(x).permute(0, 2, 3, 1)
    assert torch.equal(idx, torch.cdist(z.reshape(-1, z.shape[-1]), m.quantizer.codebook).argmin(1).view(idx.shape))
    u = vqvae.codebook_usage(idx, 16)
    assert 0 < u["used_fraction"] <= 1 and 1 <= u["perplexity"] <= 16


def test_vqvae_quantizer_is_genfast_vector_quantizer_with_ema():
    m = vqvae.VQVAE(dim=2, codebook_size=2, width=8, ema=True)
    q = m.quantizer
    assert isinstance(q, genfast.nn.VectorQuantizer) and q.ema
    q.decay = 0.0
    q.eps = 0.0
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0], [9.0, 9.0]])
    q.train()
    q(z)  # the codebook moves to the cluster means, and the batch's usage is reported
    torch.testing.assert_close(q.codebook, torch.tensor([[2.0, 1.0], [9.0, 9.0]]))
    assert q.usage()["used_fraction"] == 1.0 and abs(q.usage()["perplexity"] - 3 / 2 ** (2 / 3)) < 1e-6
    assert vqvae.codebook_usage(torch.tensor([[0, 0], [0, 0]]), 2) == {"used_fraction": 0.5, "perplexity": 1.0}


def test_ar_prior_uses_causal_genfast_attention(monkeypatch):
    calls = []
    real = genfast.attention

    def spy(q, k, v, **kw):
        calls.append(kw.get("causal"))
        return real(q, k, v, **kw)
    monkeypatch.setattr(genfast, "attention", spy)
    prior = vqvae.ARPrior(12, 9, dim=32, depth=2, heads=2).eval()
    prior(torch.randint(0, 12, (2, 9)), torch.tensor([1, -1]))
    assert calls == [True, True]  # one causal call per block through genfast.attention


def test_ar_prior_kv_cache_topk_and_bits(monkeypatch):
    torch.manual_seed(0)
    prior = vqvae.ARPrior(12, 9, dim=32, depth=2, heads=2).eval()
    y = torch.tensor([0, 3, -1])
    toks = torch.randint(0, 12, (3, 9))
    _same_with_reference_backend(lambda: (prior(toks, y),), monkeypatch)
    a = prior.sample(3, y, generator=torch.Generator().manual_seed(1), top_k=4, temperature=0.8)
    b = prior.sample(3, y, generator=torch.Generator().manual_seed(1), top_k=4, temperature=0.8, use_cache=False)
    assert torch.equal(a, b) and a.shape == (3, 9) and a.max() < 12
    # one-hot: top_k=1 is greedy decoding, the same whatever the seed
    g1 = prior.sample(3, y, generator=torch.Generator().manual_seed(1), top_k=1)
    g2 = prior.sample(3, y, generator=torch.Generator().manual_seed(2), top_k=1)
    assert torch.equal(g1, g2)
    # classifier-free guidance: the cached doubled batch gives the uncached one; greedy first tokens are
    # the argmax of (1 + w) * conditional - w * unconditional logits
    a = prior.sample(3, y, generator=torch.Generator().manual_seed(1), top_k=4, guidance=1.5)
    b = prior.sample(3, y, generator=torch.Generator().manual_seed(1), top_k=4, guidance=1.5, use_cache=False)
    assert torch.equal(a, b)
    greedy = prior.sample(3, y, top_k=1, guidance=2.0)
    first = 3 * prior(toks, y)[:, 0] - 2 * prior(toks)[:, 0]
    assert torch.equal(greedy[:, 0], first.argmax(-1))
    # sampling and bits_per_token run without dropout and leave a training prior training
    drop = vqvae.ARPrior(12, 9, dim=32, depth=2, heads=2, dropout=0.5).train()
    drop.load_state_dict(prior.state_dict())
    assert torch.equal(drop.sample(3, y, generator=torch.Generator().manual_seed(1), top_k=4, guidance=1.5), a)
    assert drop.bits_per_token(a, y) == prior.bits_per_token(a, y) and drop.training
    with pytest.raises(ValueError, match="guidance needs class labels"):
        prior.sample(3, None, guidance=1.0)
    # an untrained prior is close to uniform: ~log2(12) bits per token
    assert abs(prior.bits_per_token(a, y) - math.log2(12)) < 1.0
    # causal: changing a later token leaves the logits of earlier positions alone
    t2 = a.clone()
    t2[:, 5] = (t2[:, 5] + 1) % 12
    torch.testing.assert_close(prior(a, y)[:, :6], prior(t2, y)[:, :6])


def test_vqvae_and_prior_training_lower_the_losses():
    cfg = {**vqvae.DEFAULTS, "train_steps": 60, "prior_steps": 60, "batch": 64}
    _, _, h1, h2, _ = vqvae.train_models(cfg, progress=False)
    assert sum(h1["loss"][-10:]) < 0.7 * sum(h1["loss"][:10])
    assert sum(h2["loss"][-10:]) < 0.8 * sum(h2["loss"][:10])


def _patch_tokens(x, codebook):
    """4x4 pixel patches of 16x16 digits -> their nearest codebook patch: a 16-token grid per image."""
    return genfast.vq_nearest(x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(len(x), 16, 16), codebook)


def test_unigram_bits():
    ent, heldout = vqvae.unigram_bits(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 2]), 3)
    assert ent == pytest.approx(1.0) and heldout == pytest.approx(-(math.log2(3 / 7) + math.log2(1 / 7)) / 2)


def test_ar_prior_beats_the_unigram_on_heldout_tokens():
    """The prior's recipe (dropout, weight decay, early stopping on a validation split) on 150 training
    grids, where an unregularised prior overfits. Measured (seed 0, 200 steps, ~5 s): held-out 3.11
    bits / token vs 4.65 for the unigram of the training code frequencies; without dropout, weight
    decay and early stop 4.01 (train 0.6), which fails the assertion."""
    x, y = data.digits(16, split="train")
    xt, yt = data.digits(16, split="test")
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(-1, 16)
    codebook = patches[torch.randperm(len(patches), generator=torch.Generator().manual_seed(0))[:32]]
    tokens, heldout = _patch_tokens(x[:150], codebook), _patch_tokens(xt, codebook)
    cfg = {**vqvae.DEFAULTS, "codebook_size": 32, "batch": 64, "prior_steps": 200, "prior_dim": 64, "prior_depth": 2,
           "prior_lr": 3e-3, "prior_eval_every": 25}
    prior, hist = vqvae.train_prior(tokens, y[:150], cfg, generator=torch.Generator().manual_seed(0), progress=False)
    _, unigram = vqvae.unigram_bits(tokens, heldout, 32)
    bits = prior.bits_per_token(heldout, yt)
    assert bits < unigram - 1.0, (bits, unigram)
    assert 0 < hist["best_step"] <= 200 and hist["best_val_bits"] == min(hist["val_bits"])


def test_ar_prior_resumes_bit_for_bit_with_its_early_stopping_state(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 12, (40, 9), generator=g), torch.randint(0, 10, (40,), generator=g)
    cfg = {**vqvae.DEFAULTS, "codebook_size": 12, "batch": 8, "prior_steps": 12, "prior_dim": 32, "prior_depth": 1,
           "prior_lr": 1e-2, "prior_eval_every": 2, "checkpoint_every": 3, "prior_val_fraction": 0.25}
    torch.manual_seed(0)  # the prior's initial weights
    full, hist_full = vqvae.train_prior(tokens, y, cfg, generator=torch.Generator().manual_seed(1), progress=False)
    real_fit = vqvae.train.fit

    def crashing_fit(step_fn, **kw):  # the process dies in step 7, after the checkpoint of step 6
        def step(i):
            if i == 7:
                raise KeyboardInterrupt
            return step_fn(i)
        return real_fit(step, **kw)
    monkeypatch.setattr(vqvae.train, "fit", crashing_fit)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        vqvae.train_prior(tokens, y, cfg, generator=torch.Generator().manual_seed(1), ckpt=tmp_path / "prior.pt",
                          progress=False)
    monkeypatch.undo()
    torch.manual_seed(123)  # whatever the global RNG: the checkpoint restores it (dropout draws from it)
    resumed, hist = vqvae.train_prior(tokens, y, cfg, generator=torch.Generator().manual_seed(1),
                                      ckpt=tmp_path / "prior.pt", resume=True, progress=False)
    assert hist["loss"] == hist_full["loss"] and hist["val_bits"] == hist_full["val_bits"]
    assert (hist["best_step"], hist["best_val_bits"]) == (hist_full["best_step"], hist_full["best_val_bits"])
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- GAN
def test_gan_losses():
    d_real, d_fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    D = torch.sigmoid
    torch.testing.assert_close(torch.tensor(gan.minimax_value(d_real, d_fake)),
                               (D(d_real).log().mean() + (1 - D(d_fake)).log().mean()))
    torch.testing.assert_close(gan.d_loss(d_real, d_fake), torch.tensor(-gan.minimax_value(d_real, d_fake)))
    # non-saturating: where D confidently rejects the fake, log(1 - D) has a vanishing gradient, -log D does not
    f = torch.tensor([-8.0], requires_grad=True)
    (g_ns,) = torch.autograd.grad(gan.g_loss_non_saturating(f), f)
    (g_mm,) = torch.autograd.grad(-torch.nn.functional.softplus(f).mean(), f)  # min log(1 - D(G))
    assert g_ns.abs() > 100 * g_mm.abs()


def test_gan_interpolation_and_training():
    cfg = {**gan.DEFAULTS, "train_steps": 30, "batch": 32, "width": 16}
    G, D, h, _ = gan.train_model(cfg, progress=False)
    assert len(h["minimax"]) == 30 and all(math.isfinite(v) for v in h["minimax"])
    z0, z1 = torch.randn(2, cfg["latent"])
    strip = gan.interpolate(G, z0, z1, 3, steps=5)
    assert strip.shape == (5, 1, 16, 16)
    with torch.no_grad():
        ends = G(torch.stack([z0, z1]), torch.tensor([3, 3]))
    torch.testing.assert_close(strip[[0, -1]], ends)


# ------------------------------------------------------------------------------ DiT variants
@pytest.mark.parametrize("mode", ["cross", "joint"])
def test_conditioned_dit_variants(mode, monkeypatch):
    from genfast.zoo import dit_variants
    from genfast.zoo import rectified_flow as rf

    torch.manual_seed(0)
    m = dit_variants.ConditionedDiT(mode=mode, context_len=3, input_size=8, patch_size=2, hidden_size=32, depth=2,
                                    num_heads=2)
    for p in m.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 4, 10])
    ctx = torch.randn(3, 5, 32)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True] + [False] * 4])

    def run():
        m.zero_grad()
        out = m(x, t, y, context=ctx, context_mask=mask)
        out.square().sum().backward()
        return out, m.blocks[0].attn.qkv.weight.grad.clone() if mode == "cross" else m.blocks[0].x_attn.qkv.weight.grad.clone()
    _same_with_reference_backend(run, monkeypatch)
    # masked condition tokens change nothing
    ctx2 = ctx.clone()
    ctx2[1, 2:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, y, context=ctx2, context_mask=mask)[1], m(x, t, y, context=ctx, context_mask=mask)[1])
    # trains through the ordinary flow loss from labels alone
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    xb, yb = data.digits(8, split="train")
    losses = []
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        idx = torch.randint(0, len(yb), (32,), generator=g)
        loss = rf.flow_loss(m, xb[idx], yb[idx], null_label=10, label_dropout=0.1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_joint_attention_is_attention_over_the_concatenation():
    from genfast.zoo import dit_variants

    torch.manual_seed(0)
    blk = dit_variants.JointBlock(16, 2)
    for p in blk.parameters():
        p.data.normal_(0, 0.1)
    x, ctx, c = torch.randn(2, 5, 16), torch.randn(2, 3, 16), torch.randn(2, 16)
    ox, oc = blk(x, c, ctx)
    # by hand: one softmax over the 8 keys of [ctx; x] for every query
    mx, mc = blk.x_adaLN_modulation(c).chunk(6, 1), blk.c_adaLN_modulation(c).chunk(6, 1)
    hx = torch.nn.functional.layer_norm(x, (16,), eps=1e-6) * (1 + mx[1][:, None]) + mx[0][:, None]
    hc = torch.nn.functional.layer_norm(ctx, (16,), eps=1e-6) * (1 + mc[1][:, None]) + mc[0][:, None]
    qkv = torch.cat([blk.c_attn.qkv(hc), blk.x_attn.qkv(hx)], 1).view(2, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
    a = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / 8 ** 0.5, -1) @ qkv[2]
    a = a.transpose(1, 2).reshape(2, 8, 16)
    x1 = x + mx[2][:, None] * blk.x_attn.proj(a[:, 3:])
    h = torch.nn.functional.layer_norm(x1, (16,), eps=1e-6) * (1 + mx[4][:, None]) + mx[3][:, None]
    torch.testing.assert_close(ox, x1 + mx[5][:, None] * blk.x_mlp(h), atol=1e-5, rtol=1e-4)
