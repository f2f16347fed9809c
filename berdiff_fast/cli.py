"""The ``berdiff-fast`` command line."""
from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(out=args.out, minutes=args.minutes, train_size=args.train_size, test_size=args.test_size,
                      k=args.k, steps=args.steps, seed=args.seed, overwrite=args.overwrite,
                      progress=not args.no_progress)
    k = args.k
    print(f"GED{k} = {result[f'GED{k}']:.4f}   HM-IoU{k} = {result[f'HM-IoU{k}']:.4f}   "
          f"({result['train']['steps']} training steps, sampling {result['sampling_seconds']} s)")
    print(f"wrote {args.out}/metrics.json, {args.out}/demo.png, {args.out}/model.safetensors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berdiff-fast", description="Conditional Bernoulli diffusion for binary segmentation")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train the tiny model on the embedded synthetic lesions, sample, evaluate",
                       description="Train the tiny preset on synthetic ambiguous lesions (CPU, bounded time), "
                                   "draw k masks per held-out image, report GED and HM-IoU, write a figure.")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--minutes", type=float, default=7.0, help="training time budget in minutes (default: 7)")
    d.add_argument("--train-size", type=int, default=2000, help="synthetic training images (default: 2000)")
    d.add_argument("--test-size", type=int, default=32, help="held-out images to evaluate (default: 32)")
    d.add_argument("--k", type=int, default=16, help="samples per image (default: 16)")
    d.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"berdiff-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
