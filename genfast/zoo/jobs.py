"""`python -m genfast demo --model NAME`: which zoo job trains and samples each model."""
import importlib

# model -> (module, function)

JOBS = {"dit": ("genfast.zoo.flow_job", "run"), "flow": ("genfast.zoo.flow_job", "run_mlp"),
        "vae": ("genfast.zoo.vae", "run"), "gan": ("genfast.zoo.gan", "run"), "vqvae": ("genfast.zoo.vqvae", "run"),
        "distill": ("genfast.zoo.distill", "run"), "ldm": ("genfast.zoo.ldm", "run")}


def run(model, out, **options):
    if model not in JOBS:
        raise NotImplementedError(f"--model {model}: not in the zoo yet (available: {', '.join(sorted(JOBS))}, flow2d)")
    module, fn = JOBS[model]
    return getattr(importlib.import_module(module), fn)(out, **options)
