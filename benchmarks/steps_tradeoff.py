"""Accuracy and diversity against the number of DDIM steps, on the embedded synthetic benchmark.

    python benchmarks/steps_tradeoff.py --checkpoint demo_out/model.safetensors --json out.json

For each step count, samples k masks per held-out synthetic image (the demo's test split) with
the same seed and reports GED_k (squared form, as the paper), HM-IoU_k and the sampling time,
so users can choose their speed/quality trade-off.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone

import torch

import berdiff_fast as bf
from berdiff_fast import metrics
from berdiff_fast.synthetic import SyntheticLesions


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a tiny model trained on the synthetic data (berdiff-fast demo)")
    p.add_argument("--steps", default="50,20,10,5", help="comma list of DDIM step counts")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--test-size", type=int, default=32)
    p.add_argument("--data-seed", type=int, default=10_000, help="the demo's test split is seed + 10000")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    model = bf.BerDiff.load(args.checkpoint).eval()
    test = SyntheticLesions(args.test_size, size=model.image_size, seed=args.data_seed, mode="eval")
    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        start = time.perf_counter()
        out = bf.sample(model, test.images, steps=steps, k=args.k, seed=args.seed, fast=False)
        seconds = time.perf_counter() - start
        rows.append({"steps": steps, f"GED{args.k}": metrics.ged(out.masks, test.annotations, squared=True).mean().item(),
                     f"HM-IoU{args.k}": metrics.hm_iou(out.masks, test.annotations).mean().item(),
                     "seconds": seconds})
        r = rows[-1]
        print(f"steps {steps:3d}  GED{args.k} {r[f'GED{args.k}']:.4f}  HM-IoU{args.k} {r[f'HM-IoU{args.k}']:.4f}  "
              f"{seconds:.1f} s for {args.test_size} images")
    report = {"benchmark": "steps_tradeoff", "checkpoint": args.checkpoint, "k": args.k, "test_size": args.test_size,
              "rows": rows, "versions": {"torch": torch.__version__, "berdiff_fast": bf.__version__,
                                         "python": platform.python_version()},
              "threads": torch.get_num_threads(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
