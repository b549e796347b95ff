"""`python -m genfast info` and `python -m genfast demo` (also the `genfast` command)."""
import argparse
import json


def main(argv=None):
    parser = argparse.ArgumentParser(prog="genfast", description="genfast: fused kernels for generative models")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built, which backend each op uses here, versions")
    demo = sub.add_parser("demo", help="train and sample a model on embedded data; writes PNG + metrics JSON")
    demo.add_argument("--model", default="flow2d", choices=["flow2d"], help="which model (the zoo adds more)")
    demo.add_argument("--out", default="out/demo", help="output folder")
    demo.add_argument("--train-steps", type=int, default=1500)
    demo.add_argument("--sample-steps", type=int, default=50)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "info":
        import genfast

        genfast.info()
    elif args.command == "demo":
        from genfast import demo as demo_mod

        metrics = demo_mod.run(args.out, train_steps=args.train_steps, sample_steps=args.sample_steps,
                               seed=args.seed, progress=not args.no_progress)
        print(json.dumps(metrics, indent=2))
        print(f"wrote {args.out}/samples.png and {args.out}/metrics.json")
    return 0
