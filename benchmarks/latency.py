"""Per-image sampling latency: the released sampler's structure against the fast paths, one run.

    python benchmarks/latency.py                 # lidc on CUDA, tiny on CPU
    python benchmarks/latency.py --quick         # CPU, tiny, a couple of minutes
    python benchmarks/latency.py --preset lidc --k 16 --steps 50 --json out.json

Modes, side by side on the same inputs:
  original  fp32, eager, reference ("torch") ops, the k samples as k sequential sampling loops
            (the released code's structure)
  eager     the k samples (and all images) as one U-Net batch, fused ops
  compiled  plus torch.compile of the U-Net (and bf16 autocast on CUDA)
  graph     plus CUDA-graph replay of each sampling step (CUDA only)
Latency is the median over repeats after warm-up, divided by the number of images. FLOPs per
U-Net forward come from torch.utils.flop_counter; the FLOP floor is S * k * FLOPs / peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
from torch.utils.flop_counter import FlopCounterMode

import berdiff_fast as bf
from berdiff_fast import backends, fast


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_flops(model, x) -> int:
    """FLOPs of one U-Net forward on the batch x (counted, not estimated)."""
    y = torch.zeros(x.shape[0], 1, *x.shape[2:], device=x.device)
    t = torch.full((x.shape[0],), model.schedule.T, device=x.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(y, x, t)
    return counter.get_total_flops()


def run_mode(mode, model, x, args, dtype):
    """One sampling call of ``mode``; returns seconds."""
    device = x.device
    kw = dict(steps=args.steps, seed=args.seed, max_batch=args.max_batch)
    _sync(device)
    start = time.perf_counter()
    if mode == "original":
        for j in range(args.k):
            bf.sample(model, x, k=1, fast=False, backend="torch", dtype=torch.float32, **{**kw, "seed": args.seed + j})
    elif mode == "eager":
        bf.sample(model, x, k=args.k, fast=False, dtype=dtype, **kw)
    elif mode == "compiled":
        bf.sample(model, x, k=args.k, fast=True, graph=False if device.type == "cuda" else None, dtype=dtype, **kw)
    elif mode == "graph":
        bf.sample(model, x, k=args.k, fast=True, graph=True, dtype=dtype, **kw)
    _sync(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="lidc (default on CUDA) | brats | tiny (default on CPU)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50; 10 with --quick)")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--device", default=None, help="cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="U-Net dtype of the eager/compiled/graph modes (default bfloat16 on CUDA)")
    p.add_argument("--modes", default=None, help="comma list of original,eager,compiled,graph")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per mode (default 10; 3 with --quick)")
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=800.0, help="bf16 dense peak for the FLOP floor (CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="set torch.backends.cudnn.benchmark (cuDNN times its algorithms at the first call); "
                        "the graph mode does so while capturing in any case")
    p.add_argument("--json", default=None, help="write every number here")
    p.add_argument("--quick", action="store_true", help="CPU, tiny preset, k 16, 10 steps, 3 repeats")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        device = torch.device("cpu") if args.device is None else device
    preset = args.preset or ("lidc" if device.type == "cuda" and not args.quick else "tiny")
    args.steps = args.steps or (10 if args.quick else 50)
    repeats = args.repeats or (3 if args.quick else 10)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = args.modes.split(",") if args.modes else (
        ["original", "eager", "compiled"] + (["graph"] if device.type == "cuda" else []))
    if "graph" in modes and device.type != "cuda":
        p.error("--modes: graph needs CUDA")

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    torch.manual_seed(args.seed)
    model = bf.BerDiff.from_preset(preset).to(device).eval()
    size, ch = model.image_size, model.image_channels
    x = torch.randn(args.batch, ch, size, size, device=device)
    flops_row = unet_flops(model, x[:1])
    flops_image = flops_row * args.k * args.steps

    floor = flops_image / (args.peak_tflops * 1e12) if device.type == "cuda" else None
    results = {}
    report = {
        "benchmark": "latency", "preset": preset, "k": args.k, "steps": args.steps, "batch": args.batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "unet_gflops_per_forward_row": flops_row / 1e9,
        "flop_floor_seconds_per_image": floor, "peak_tflops_assumed": args.peak_tflops if floor else None,
        "backend": backends.default(device), "cudnn_benchmark": args.cudnn_benchmark,
        "compile_mode": os.environ.get("BERDIFF_COMPILE_MODE") or (fast.COMPILE_MODE_CUDA if device.type == "cuda" else "default"),
        "results": results,
        "versions": {"torch": torch.__version__, "berdiff_fast": bf.__version__, "python": platform.python_version(),
                     "triton": _version("triton"), "cuda": torch.version.cuda},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm = run_mode(mode, model, x, args, dtype)  # compiles / captures on the first call
        times = [run_mode(mode, model, x, args, dtype) for _ in range(repeats if mode != "original" else max(1, repeats // 3))]
        per_image = statistics.median(times) / args.batch
        results[mode] = {
            "seconds_per_image": per_image, "first_call_seconds": warm, "repeats": len(times),
            "all_seconds": times, "tflops": flops_image / per_image / 1e12,
            "dtype": "float32" if mode == "original" else str(dtype).replace("torch.", ""),
            "fraction_of_flop_floor": floor / per_image if floor else None,
        }
        if device.type == "cuda":
            results[mode]["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        base = results.get("original", {}).get("seconds_per_image")
        for r in results.values():
            r["speedup_vs_original"] = base / r["seconds_per_image"] if base else None
        print(f"  {mode:9s} {per_image * 1e3:10.1f} ms/image", file=sys.stderr)
        if args.json:  # after every mode: a run cut short still leaves what it measured
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)

    print(f"\nlatency: preset {preset}, k {args.k}, steps {args.steps}, batch {args.batch}, {report['device']}, "
          f"U-Net {flops_row / 1e9:.2f} GFLOP/row, backend {report['backend']}, compile mode {report['compile_mode']}"
          f"{', cudnn.benchmark' if args.cudnn_benchmark else ''}")
    print(f"{'mode':10s} {'ms/image':>10s} {'x original':>11s} {'TFLOP/s':>9s} {'of floor':>9s} {'peak GB':>8s}")
    for mode, r in results.items():
        sp = f"{r['speedup_vs_original']:.2f}" if r["speedup_vs_original"] else "-"
        fr = f"{r['fraction_of_flop_floor']:.2f}" if r["fraction_of_flop_floor"] else "-"
        mem = f"{r['peak_memory_gb']:.2f}" if "peak_memory_gb" in r else "-"
        print(f"{mode:10s} {r['seconds_per_image'] * 1e3:10.1f} {sp:>11s} {r['tflops']:9.3f} {fr:>9s} {mem:>8s}")
    fast.clear_cache()
    return report


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
