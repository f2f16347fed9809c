"""Where one sampling step's U-Net forward spends its GPU time, per kernel category.

    python benchmarks/profile_unet.py                       # lidc, 16 rows, bf16, DEFAULT_VARIANTS
    python benchmarks/profile_unet.py --variants compiled,compiled_autotune --json out.json

The sampler's time is almost all U-Net (DESIGN §2), so issue #5's latency target is a question
of how fast these kernels run. For each variant the forward is captured in a CUDA graph and
replayed (median of repeats, no host overhead), then profiled once with torch.profiler; kernels
are grouped into convolution, GEMM, attention, Inductor-generated (Triton: normalisation,
SiLU, adds, casts, concatenation), layout conversions and other. The convolutions' own TFLOP/s
(their counted FLOPs over their kernel time) says how far cuDNN is from the peak; the rest is
the memory-bound glue between them.

Variants: compiled (Inductor, the sampler's configuration), compiled_cl (weights converted to
channels_last before compiling), compiled_bf16w (weights stored in bf16, so no per-forward
weight casts), compiled_bf16w_cl (both: Inductor then has no weight to cast or transpose at all;
the sampler's compiled U-Net runs 150 such kernels per lidc forward), eager (bf16 autocast, no
compile), compiled_cudnn_bench (torch.backends.cudnn.benchmark on while compiling and warming
up), compiled_cdt (Inductor's coordinate-descent tuning of its Triton kernels' block sizes),
compiled_autotune (mode max-autotune-no-cudagraphs, the library's CUDA default: convolution and
GEMM templates tuned too), compiled_nchw_cat (without the sampler's fast.ChannelsLastConcat
pass: Inductor lays the decoder's concatenations out NCHW). Every compiled variant but that one
compiles with the sampler's options.
The first call's time (compilation, tuning) is reported as compile_seconds, and each variant's
largest logit difference from the first variant's as max_abs_diff_vs_first_variant (the weights
are perturbed from their initialisation, whose zeroed last layers would make every output 0).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import berdiff_fast as bf
from berdiff_fast import fast
from _timing import capture, time_call  # benchmarks/, the script's folder, is on sys.path

VARIANTS = ("compiled", "compiled_cl", "compiled_bf16w", "compiled_bf16w_cl", "eager", "compiled_cudnn_bench",
            "compiled_cdt", "compiled_autotune", "compiled_nchw_cat")
DEFAULT_VARIANTS = ("compiled", "compiled_nchw_cat", "compiled_cudnn_bench", "compiled_bf16w_cl")
CATEGORIES = ("conv", "gemm", "attention", "inductor", "layout", "other")


def category(name: str) -> str:
    n = name.lower()
    if "triton" in n:
        return "inductor"
    if any(s in n for s in ("nchwtonhwc", "nhwctonchw", "transpose", "copy")):
        return "layout"
    if any(s in n for s in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(s in n for s in ("conv", "fprop", "dgrad", "wgrad", "implicit", "cudnn", "xmma_fprop", "nhwc")):
        return "conv"
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas")):
        return "gemm"
    return "other"


def counted_flops(model, y, x, t):
    """Total FLOPs of one forward and those of its convolutions, by torch's FLOP counter."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.unet(y, x, t)
    per_op = counter.get_flop_counts().get("Global", {})
    conv = sum(v for k, v in per_op.items() if "convolution" in str(k))
    return counter.get_total_flops(), conv


def build(variant, model, dtype):
    net = model.unet
    if variant in ("compiled_cl", "compiled_bf16w", "compiled_bf16w_cl"):  # changed in place: copy
        net = copy.deepcopy(net)
    if variant in ("compiled_cl", "compiled_bf16w_cl"):
        net = net.to(memory_format=torch.channels_last)
    if variant in ("compiled_bf16w", "compiled_bf16w_cl"):
        net = net.to(dtype)
    if variant == "eager":
        return net
    options = {} if variant == "compiled_nchw_cat" else fast.inductor_options(
        fast.COMPILE_MODE_CUDA if variant == "compiled_autotune" else None)
    if variant == "compiled_cdt":
        options["coordinate_descent_tuning"] = True
    return torch.compile(net, fullgraph=True, dynamic=False, options=options)


def breakdown(fn, iters=3):
    """GPU kernel time per category and the top kernels, averaged over ``iters`` forwards."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    per_cat, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        per_cat[category(e.name)] += us / iters
        per_kernel[e.name][0] += us / iters
        per_kernel[e.name][1] += 1
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:12]
    return ({c: per_cat.get(c, 0.0) / 1e3 for c in CATEGORIES},
            [{"kernel": k[:110], "ms": v[0] / 1e3, "calls": v[1] // iters, "category": category(k)} for k, v in top])


def dump_wrapper(kernel_names, dest_dir, tag):
    """Copy the Inductor output module (the wrapper with every kernel's Triton source inline)
    that defines the given kernels into ``dest_dir``: to read why a kernel is slow."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        root = cache_dir()
    except ImportError:
        root = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    names = [k for k in kernel_names if k.startswith("triton_")]
    if not names or not os.path.isdir(root):
        return None
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            if not f.endswith(".py") or os.path.getsize(path) > 16 << 20:
                continue
            text = open(path, errors="replace").read()
            if "def call(" in text and all(f"def {n}(" in text or f"'{n}'" in text for n in names[:2]):
                os.makedirs(dest_dir, exist_ok=True)
                out = os.path.join(dest_dir, f"inductor_{tag}.py")
                shutil.copyfile(path, out)
                return out
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lidc")
    p.add_argument("--rows", type=int, default=16, help="U-Net batch: k samples x images")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {','.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--peak-tflops", type=float, default=800.0)
    p.add_argument("--json", default=None)
    p.add_argument("--dump-code", default=None, metavar="DIR",
                   help="copy each compiled variant's Inductor output module here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs CUDA: this benchmark profiles GPU kernels")
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; expected some of {VARIANTS}")

    dev, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    model = bf.BerDiff.from_preset(args.preset).to(dev).eval()
    with torch.no_grad():  # the zero-initialised last layers would make every variant's output 0
        for prm in model.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    n, size, ch = args.rows, model.image_size, model.image_channels
    x = torch.randn(n, ch, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(n, 1, size, size, device=dev) < 0.5).float()
    t = torch.full((n,), 500, device=dev, dtype=torch.long)
    flops, conv_flops = counted_flops(model, y, x, t)
    report = {
        "benchmark": "profile_unet", "preset": args.preset, "rows": n, "dtype": "bfloat16",
        "gflops_per_forward": flops / 1e9, "conv_gflops_per_forward": conv_flops / 1e9,
        "device": torch.cuda.get_device_name(dev), "results": {},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                     "python": platform.python_version(), "berdiff_fast": bf.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    first_out = None
    for variant in variants:
        torch.backends.cudnn.benchmark = variant == "compiled_cudnn_bench"
        net = build(variant, model, dtype)
        xv = x.to(dtype) if variant.startswith("compiled_bf16w") else x

        def fwd(net=net, xv=xv):
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                return net(y, xv, t)

        start = time.perf_counter()
        out = fwd().float()
        torch.cuda.synchronize()
        compile_seconds = time.perf_counter() - start
        first_out = out if first_out is None else first_out
        g = capture(fwd, dev, warmup=3)
        sec = time_call(g.replay, dev, args.repeats, inner=10)
        cats, top = breakdown(fwd)
        conv_ms = cats["conv"]
        r = {"ms_per_forward": sec * 1e3, "compile_seconds": compile_seconds,
             "max_abs_diff_vs_first_variant": (out - first_out).abs().max().item(), "tflops": flops / sec / 1e12,
             "fraction_of_peak": flops / sec / 1e12 / args.peak_tflops,
             "kernel_ms_by_category": cats, "kernel_ms_total": sum(cats.values()),
             "conv_tflops": conv_flops / (conv_ms / 1e3) / 1e12 if conv_ms else None, "top_kernels": top}
        report["results"][variant] = r
        if args.dump_code and variant != "eager":
            r["inductor_code"] = dump_wrapper([k["kernel"] for k in top if k["category"] == "inductor"],
                                              args.dump_code, variant)
        print(f"  {variant:22s} {sec * 1e3:7.2f} ms/forward  {r['tflops']:6.1f} TFLOP/s  "
              f"first call {compile_seconds:.0f} s  logits differ from the first variant's by "
              f"<= {r['max_abs_diff_vs_first_variant']:.3g}", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        del g
        torch.cuda.empty_cache()
    torch.backends.cudnn.benchmark = False

    print(f"\nprofile_unet: {args.preset}, {n} rows, bf16, {report['device']}, {flops / 1e9:.0f} GFLOP/forward "
          f"({100 * conv_flops / flops:.0f}% in convolutions), 50 steps = 50 forwards")
    print(f"{'variant':22s} {'ms/fwd':>7s} {'50 steps s':>10s} {'TFLOP/s':>8s} {'conv TF/s':>9s} "
          + " ".join(f"{c + ' ms':>12s}" for c in CATEGORIES))
    for variant, r in report["results"].items():
        ct = f"{r['conv_tflops']:9.0f}" if r["conv_tflops"] else "        -"
        print(f"{variant:22s} {r['ms_per_forward']:7.2f} {r['ms_per_forward'] * 50 / 1e3:10.3f} {r['tflops']:8.0f} {ct} "
              + " ".join(f"{r['kernel_ms_by_category'][c]:12.2f}" for c in CATEGORIES))
    first = next(iter(report["results"].values()), None)
    if first:
        print(f"\ntop kernels of {next(iter(report['results']))}:")
        for k in first["top_kernels"]:
            print(f"  {k['ms']:7.3f} ms  x{k['calls']:<3d} {k['category']:9s} {k['kernel']}")
    return report


if __name__ == "__main__":
    main()
