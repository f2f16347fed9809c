"""Each fused Bernoulli op on every available backend, against the eager and the compiled reference.

    python benchmarks/kernels.py [--quick] [--device cuda] [--json results.json]

For each op and shape it times: ``torch`` (the eager reference backend), ``torch+compile``
(the same mathematics through torch.compile, uniforms drawn eagerly: see CompiledReference) and
every fused backend that runs here (``triton`` and ``cuda`` on a GPU, ``cpu`` on CPU), each
through its backend module (the functional API's argument checks, which synchronise, are left
out; ``--validate`` times the functional API instead). Times are medians over ``--repeats`` measurements of ``--inner`` back-to-back calls.

On CUDA it also measures the device-to-device copy bandwidth in the same run and reports each
op's effective bandwidth (the bytes it must read and write, divided by its time) as a fraction
of it; and, per op, the time of one call replayed from a CUDA graph (``graph_us``: the GPU time
without the Python launch overhead, the figure a CUDA-graph sampler sees).
Shapes: 16x1x128x128 (one LIDC image, k = 16 samples) and 64x1x512x512; ``--quick`` uses small
shapes for a CPU check. The Triton interpreter is not a benchmark: do not set TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Callable

import torch

from berdiff_fast import backends, reference, rng
from berdiff_fast import functional as F
from berdiff_fast.backends import torch_ref
from berdiff_fast.schedule import COL_ALPHA, COL_ALPHA_BAR, COL_BETA_HALF, COL_FLIP, NoiseSchedule
from _timing import capture, time_call  # benchmarks/, the script's folder, is on sys.path

SHAPES = [(16, 1, 128, 128), (64, 1, 512, 512)]
QUICK_SHAPES = [(4, 1, 32, 32), (16, 1, 128, 128)]
FUSED = ("triton", "cuda", "cpu")
DTYPES = {"uint8": torch.uint8, "bool": torch.bool, "float32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED = 1234


# --- the workload ----------------------------------------------------------------------------

def make_inputs(shape, device, mask_dtype, logit_dtype):
    gen = torch.Generator().manual_seed(0)
    batch = shape[0]
    return {
        "y0": (torch.rand(shape, generator=gen) < 0.3).to(mask_dtype).to(device),
        "y_t": (torch.rand(shape, generator=gen) < 0.5).to(mask_dtype).to(device),
        "logits": (torch.randn(shape, generator=gen) * 3).to(logit_dtype).to(device),
        "t": torch.randint(1, 1001, (batch,), generator=gen).to(device),
        "s": torch.zeros(batch, dtype=torch.long).to(device),
    }


def op_calls(mod, x, sched, device) -> dict[str, Callable[[], object]]:
    """One zero-argument call per op for backend module ``mod`` (the backend contract)."""
    shape, mdt = tuple(x["y_t"].shape), x["y_t"].dtype
    t_ddim = torch.full_like(x["t"], 1000)
    s_ddim = torch.full_like(x["s"], 900)
    logits_g = x["logits"].detach().clone().requires_grad_()

    def loss_fwd_bwd():
        logits_g.grad = None
        mod.loss(logits_g, x["y_t"], x["y0"], x["t"], sched).sum().backward()

    return {
        "q_sample": lambda: mod.q_sample(x["y0"], x["t"], sched, SEED, 0),
        "init_noise": lambda: mod.init_noise(shape, SEED, 0, device, mdt),
        "ddpm_step": lambda: mod.ddpm_step(x["logits"], x["y_t"], x["t"], sched, SEED, 0, False),
        "ddim_step": lambda: mod.ddim_step(x["logits"], x["y_t"], t_ddim, s_ddim, sched, SEED, 0, 1.0, False),
        "ddim_last_step": lambda: mod.ddim_step(x["logits"], x["y_t"], x["t"], x["s"], sched, SEED, 0, 1.0, True),
        "predict_y0": lambda: mod.predict_y0(x["logits"], x["y_t"]),
        "loss": lambda: mod.loss(x["logits"], x["y_t"], x["y0"], x["t"], sched),
        "loss_fwd_bwd": loss_fwd_bwd,
    }


def functional_calls(backend, x, sched, device) -> dict[str, Callable[[], object]]:
    """The same calls through the public functional API (with its argument checks)."""
    shape, mdt = tuple(x["y_t"].shape), x["y_t"].dtype
    t_ddim, s_ddim = torch.full_like(x["t"], 1000), torch.full_like(x["s"], 900)
    logits_g = x["logits"].detach().clone().requires_grad_()

    def loss_fwd_bwd():
        logits_g.grad = None
        F.loss(logits_g, x["y_t"], x["y0"], x["t"], sched, backend=backend).sum().backward()

    kw = {"backend": backend}
    return {
        "q_sample": lambda: F.q_sample(x["y0"], x["t"], sched, SEED, 0, **kw),
        "init_noise": lambda: F.init_noise(shape, SEED, 0, device=device, dtype=mdt, **kw),
        "ddpm_step": lambda: F.ddpm_step(x["logits"], x["y_t"], x["t"], sched, SEED, 0, **kw),
        "ddim_step": lambda: F.ddim_step(x["logits"], x["y_t"], t_ddim, s_ddim, sched, SEED, 0, 1.0, **kw),
        "ddim_last_step": lambda: F.ddim_step(x["logits"], x["y_t"], x["t"], x["s"], sched, SEED, 0, 1.0,
                                              return_y0=True, **kw),
        "predict_y0": lambda: F.predict_y0(x["logits"], x["y_t"], **kw),
        "loss": lambda: F.loss(x["logits"], x["y_t"], x["y0"], x["t"], sched, **kw),
        "loss_fwd_bwd": loss_fwd_bwd,
    }


# Inductor does not finish compiling the Philox stream of berdiff_fast.rng (its pointwise
# lowering re-expands the shared subexpressions of the ten rounds: over 10 minutes for 4096
# elements on CPU, torch 2.13), so the compiled reference draws its uniforms eagerly
# (torch.compiler.disable) and compiles the mathematics around them.
_uniform_like = torch.compiler.disable(rng.uniform_like)
_uniform = torch.compiler.disable(rng.uniform)


class CompiledReference:
    """The torch backend's functions (same contract) with the mathematics torch.compile'd."""

    def __init__(self):
        self.predict_y0 = torch.compile(torch_ref.predict_y0, dynamic=False)
        self.loss = torch.compile(torch_ref.loss, dynamic=False)
        self._q_sample = torch.compile(self._q_sample_math, dynamic=False)
        self._ddpm = torch.compile(self._ddpm_math, dynamic=False)
        self._ddim = torch.compile(self._ddim_math, dynamic=False)

    @staticmethod
    def _q_sample_math(y0, t, table, u):
        flip_t = table[t, COL_FLIP].view(-1, *([1] * (y0.ndim - 1)))
        y_t, eps = reference.q_sample(y0.float(), flip_t, u)
        return y_t.to(y0.dtype), eps.to(y0.dtype)

    @staticmethod
    def _ddpm_math(logits, y_t, t, table, u):
        shape = (-1,) + (1,) * (y_t.ndim - 1)
        a_t, bh_t = table[t, COL_ALPHA].view(shape), table[t, COL_BETA_HALF].view(shape)
        ab_p, flip_p = table[t - 1, COL_ALPHA_BAR].view(shape), table[t - 1, COL_FLIP].view(shape)
        y = reference.ddpm_step(logits.float(), y_t.float(), a_t, bh_t, ab_p, flip_p, u)
        return y.to(y_t.dtype)

    @staticmethod
    def _ddim_math(logits, y_t, t, s, table, eta, u):
        shape = (-1,) + (1,) * (y_t.ndim - 1)
        ab_t, flip_t = table[t, COL_ALPHA_BAR].view(shape), table[t, COL_FLIP].view(shape)
        ab_s, flip_s = table[s, COL_ALPHA_BAR].view(shape), table[s, COL_FLIP].view(shape)
        l, yt = logits.float(), y_t.float()
        y = reference.ddim_step(l, yt, ab_t, flip_t, ab_s, flip_s, eta, u).to(y_t.dtype)
        return y, reference.predict_y0_from_logits(yt, l)[0]

    def q_sample(self, y0, t, sched, seed, offset):
        return self._q_sample(y0, t, sched.table(y0.device), _uniform_like(y0, seed, offset))

    def init_noise(self, shape, seed, offset, device, dtype):
        n = 1
        for d in shape:
            n *= d
        return (_uniform(seed, offset, n, device) < 0.5).view(shape).to(dtype)

    def ddpm_step(self, logits, y_t, t, sched, seed, offset, return_y0):
        y = self._ddpm(logits, y_t, t, sched.table(y_t.device), _uniform_like(y_t, seed, offset))
        return (y, self.predict_y0(logits, y_t)) if return_y0 else y

    def ddim_step(self, logits, y_t, t, s, sched, seed, offset, eta, return_y0):
        y, y0_hat = self._ddim(logits, y_t, t, s, sched.table(y_t.device), eta, _uniform_like(y_t, seed, offset))
        return (y, y0_hat) if return_y0 else y


def compiled_reference_calls(x, sched, device) -> dict[str, Callable[[], object]]:
    """The reference mathematics through torch.compile (compiled on first call)."""
    return op_calls(CompiledReference(), x, sched, device)


def bytes_moved(op: str, x) -> int:
    """The bytes an op must read and write at minimum (per-sample t and the table are negligible)."""
    n = x["y_t"].numel()
    m, f = x["y_t"].element_size(), x["logits"].element_size()
    y0_hat = 4  # float32 probability map
    return n * {
        "q_sample": m + 2 * m,  # y0 -> y_t, eps
        "init_noise": m,
        "ddpm_step": f + m + m,  # logits, y_t -> y
        "ddim_step": f + m + m,
        "ddim_last_step": f + m + m + y0_hat,
        "predict_y0": f + m + y0_hat,
        "loss": f + 2 * m,  # logits, y_t, y0 -> per-sample sums
        "loss_fwd_bwd": (f + 2 * m) + (f + 2 * m + f),  # forward, then recompute and write dlogits
    }[op]


# --- timing ------------------------------------------------------------------------------------

def time_graph(fn, device, repeats: int, inner: int) -> float | None:
    """Median seconds per call of ``inner`` calls captured in one CUDA graph; None if the calls
    cannot be captured (e.g. a host-to-device copy inside)."""
    try:
        graph = capture(fn, device, warmup=1, calls=inner)
    except Exception:  # noqa: BLE001 - any capture failure just means "not capturable"
        return None
    return time_call(graph.replay, device, repeats, 1) / inner


def copy_bandwidth(device, repeats: int, nbytes: int = 512 * 2**20) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_call(lambda: dst.copy_(src), device, repeats, 10)


# --- the run -------------------------------------------------------------------------------------

def run(args) -> dict:
    device = torch.device(args.device)
    sched = NoiseSchedule.from_name("linear", 1000)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shape:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shape]
    fused = [b for b in FUSED if backends.available(b, device)]
    impls = ["torch", "torch+compile"] + fused
    if args.impls:
        unknown = set(args.impls) - {"torch", "torch+compile", *FUSED}
        if unknown:
            raise SystemExit(f"--impls: unknown {sorted(unknown)}; expected among torch, torch+compile, "
                             f"{', '.join(FUSED)}")
        impls = ["torch"] + [i for i in impls[1:] if i in args.impls]  # torch: the baseline of every ratio
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": sys.version.split()[0], "threads": torch.get_num_threads(),
        "mask_dtype": args.mask_dtype, "logit_dtype": args.logit_dtype, "validate": args.validate,
    }
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    copy_bw = copy_bandwidth(device, args.repeats) if device.type == "cuda" else None
    meta["copy_GBps"] = copy_bw / 1e9 if copy_bw else None
    print_header(meta)

    rows = []
    for shape in shapes:
        x = make_inputs(shape, device, DTYPES[args.mask_dtype], DTYPES[args.logit_dtype])
        calls = {}
        for impl in impls:
            if impl == "torch+compile":
                calls[impl] = compiled_reference_calls(x, sched, device)
            elif args.validate:
                calls[impl] = functional_calls(impl, x, sched, device)
            else:
                calls[impl] = op_calls(backends.resolve(impl, device), x, sched, device)
        for op in calls["torch"]:
            if args.ops and op not in args.ops:
                continue
            base = None
            for impl in impls:
                inner = args.inner if x["y_t"].numel() <= 2**20 else max(1, args.inner // 10)
                sec = time_call(calls[impl][op], device, args.repeats, inner)
                graph = (time_graph(calls[impl][op], device, args.repeats, inner)
                         if device.type == "cuda" and impl != "torch+compile" and op != "loss_fwd_bwd" else None)
                base = sec if impl == "torch" else base
                nbytes = bytes_moved(op, x)
                row = {"op": op, "shape": "x".join(map(str, shape)), "impl": impl, "median_us": sec * 1e6,
                       "graph_us": graph * 1e6 if graph else None, "speedup_vs_eager": base / sec,
                       "bytes": nbytes, "GBps": nbytes / sec / 1e9,
                       "frac_copy": nbytes / sec / copy_bw if copy_bw else None}
                rows.append(row)
                print_row(row)
                if args.json:  # after every row: a run cut short still leaves what it measured
                    with open(args.json, "w") as fh:
                        json.dump({"meta": meta, "results": rows}, fh, indent=2)
    return {"meta": meta, "results": rows}


def print_header(meta):
    print(f"# {meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"masks {meta['mask_dtype']}, logits {meta['logit_dtype']}"
          + (f" | copy {meta['copy_GBps']:.0f} GB/s" if meta.get("copy_GBps") else ""))
    print(f"{'op':<15} {'shape':<15} {'impl':<14} {'median us':>11} {'graph us':>9} {'x eager':>8} "
          f"{'GB/s':>8} {'% copy':>7}")


def print_row(r):
    graph = f"{r['graph_us']:9.1f}" if r["graph_us"] else f"{'-':>9}"
    frac = f"{100 * r['frac_copy']:6.1f}%" if r["frac_copy"] else f"{'-':>7}"
    print(f"{r['op']:<15} {r['shape']:<15} {r['impl']:<14} {r['median_us']:11.1f} {graph} "
          f"{r['speedup_vs_eager']:8.2f} {r['GBps']:8.2f} {frac}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small shapes (a CPU check)")
    p.add_argument("--shape", action="append", help="a shape like 16x1x128x128 (repeatable; overrides the defaults)")
    p.add_argument("--ops", nargs="*", help="only these ops")
    p.add_argument("--impls", nargs="*", help="only these implementations (the eager torch baseline always runs)")
    p.add_argument("--mask-dtype", default="uint8", choices=sorted(DTYPES))
    p.add_argument("--logit-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=20, help="calls per measurement (a tenth at large shapes)")
    p.add_argument("--validate", action="store_true", help="time through the functional API with its checks")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("TRITON_INTERPRET=1 is set: the Triton interpreter is not a benchmark; unset it")
    run(args)
    if args.json:
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
