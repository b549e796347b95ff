"""genfast.zoo: small, clean generative models on the genfast ops (issue 7).

  dit, rectified_flow, flow_job   class-conditional rectified-flow DiT with CFG (the main job)
  vae                             VAE (MLP / CNN, Gaussian or Bernoulli likelihood) on reparam_kl
  gan                             conditional DCGAN, non-saturating loss, latent interpolation
  classifier                      the digit classifier behind the quality metrics
  _ops                            the seam: genfast ops where merged, plain PyTorch otherwise

`python -m genfast demo --model dit|vae|gan|...` trains and samples one of them.
"""
