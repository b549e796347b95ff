"""`python -m genfast info` and `python -m genfast demo` (also the `genfast` command)."""
import argparse
import json


def _positive_int(text):
    """argparse type: an int >= 1 (0 or negative steps / batches failed deep inside a job, or ran nothing)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(prog="genfast", description="genfast: fused kernels for generative models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built, which backend each op uses here, versions")
    demo = sub.add_parser("demo", help="train and sample a model on embedded data; writes PNG + metrics JSON")
    demo.add_argument("--model", default="dit", choices=["dit", "flow", "vae", "vqvae", "gan", "distill", "ldm",
                                                         "flow2d"],
                      help="which model: dit (default: class-conditional rectified-flow DiT with CFG on digits), "
                           "flow2d (the 2-D mixture), and the other zoo families")
    demo.add_argument("--out", default="out/demo", help="output folder (PNGs, metrics.json, checkpoint.pt)")
    demo.add_argument("--train-steps", type=_positive_int, default=None,
                      help="training steps (default: per model; distill: the teacher's, ldm: the latent flow's)")
    demo.add_argument("--sample-steps", type=_positive_int, default=None,
                      help="sampling steps (default: 50; distill: not used, it reports its own step counts)")
    demo.add_argument("--batch", type=_positive_int, default=None,
                      help="batch size (default: per model; distill and ldm: not used)")
    demo.add_argument("--sampler", choices=["euler", "heun", "sde"], default=None,
                      help="flow models: Euler (fused step, default), Heun, or Euler-Maruyama")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "info":
        import genfast

        genfast.info()
    elif args.command == "demo":
        from genfast import demo as demo_mod

        if args.model == "flow2d":
            metrics = demo_mod.run(args.out, train_steps=args.train_steps or 1500, sample_steps=args.sample_steps or 50,
                                   seed=args.seed, progress=not args.no_progress)
        else:
            from genfast.zoo import checkpoint, jobs

            try:
                metrics = jobs.run(args.model, args.out, train_steps=args.train_steps, sample_steps=args.sample_steps,
                                   batch=args.batch, sampler=args.sampler, seed=args.seed, resume=args.resume,
                                   progress=not args.no_progress)
            except checkpoint.CheckpointError as e:
                parser.exit(2, f"genfast demo: {e}\n")
        print(json.dumps(metrics, indent=2))
        print(f"wrote {args.out}/samples.png and {args.out}/metrics.json")
    return 0
