"""`python -m genfast demo --model NAME`: which zoo job trains and samples each model."""
import importlib

JOBS = {"dit": "genfast.zoo.flow_job", "vae": "genfast.zoo.vae", "gan": "genfast.zoo.gan",
        "vqvae": "genfast.zoo.vqvae", "distill": "genfast.zoo.distill",
        "ldm": "genfast.zoo.ldm"}


def run(model, out, **options):
    if model not in JOBS:
        raise NotImplementedError(f"--model {model}: not in the zoo yet (available: {', '.join(sorted(JOBS))}, flow2d)")
    return importlib.import_module(JOBS[model]).run(out, **options)
