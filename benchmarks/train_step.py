"""Training steps per second: the fused Bernoulli ops against the reference ops, and compiled.

    python benchmarks/train_step.py [--quick] [--device cpu|cuda] [--json results.json]

One training step is the trainer's full step (``Trainer.train_step``): Algorithm 1's noising
(``q_sample``), the U-Net forward and backward, the KL + BCE loss, gradient clipping, AdamW and
the EMA update; the batch is fixed and already on the device (data loading is not measured).
Variants, each a fresh model from the same initialisation:

    reference   backend "torch": the pure-PyTorch reference ops (the Philox stream in torch)
    fused       the automatic fused backend for the device: "cpu" (C++ kernels) on CPU,
                "triton" or "cuda" on a GPU; reported as unavailable when it is not built
    compiled    the fused backend with the U-Net under torch.compile

Each row also gives the time of the step's Bernoulli ops alone (q_sample + loss forward and
backward, ``bernoulli_ops_ms``): what the fused backend can save at most.

Defaults: the tiny preset (32x32) on CPU and the lidc preset (128x128, bf16 autocast) on CUDA,
batch 32 (the paper's). Steps/s is the median over ``--repeats`` measurements of ``--inner``
steps; the variants are measured round-robin so that a machine slowing down affects all alike.
The target of issue 6: fused >= 1.2x reference steps/s for tiny on CPU.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from berdiff_fast import backends
from berdiff_fast.model import BerDiff
from berdiff_fast.trainer import Trainer, TrainConfig

TARGET = 1.2


class _FixedBatch(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "mask": self.y[i]}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_variant(name, backend, compile_, preset, batch, device, x, y):
    torch.manual_seed(0)
    model = BerDiff.from_preset(preset)
    cfg = TrainConfig(steps=10**9, batch_size=batch, lr=1e-4, backend=backend, compile=compile_,
                      tensorboard="off", ema_decay=0.9999)
    trainer = Trainer(model, _FixedBatch(x, y), cfg, out=None, progress=False, device=device)
    return {"name": name, "backend": backend, "compiled": compile_, "trainer": trainer, "times": []}


def time_ops(backend, sched, y, repeats, device):
    """Median ms of the step's Bernoulli ops alone: q_sample, then the loss forward and backward."""
    from berdiff_fast import functional as F

    g = torch.Generator().manual_seed(1)
    t = torch.randint(1, sched.T + 1, (y.shape[0],), generator=g).to(device)
    logits = torch.randn(y.shape, generator=g).to(device).requires_grad_()
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        y_t, _ = F.q_sample(y, t, sched, 7, 0, backend=backend)
        F.loss(logits, y_t, y, t, sched, backend=backend).mean().backward()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[1:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", help="tiny on CPU, lidc on CUDA by default")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=3, help="steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compilation happens here)")
    p.add_argument("--variants", default="reference,fused,compiled", help="comma-separated subset")
    p.add_argument("--quick", action="store_true", help="3 repeats of 2 steps, no compiled variant")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    preset = args.preset or ("lidc" if device.type == "cuda" else "tiny")
    if args.quick:
        args.repeats, args.inner, args.warmup = 3, 2, 1
        if args.variants == "reference,fused,compiled":
            args.variants = "reference,fused"
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(wanted) - {"reference", "fused", "compiled"}
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; expected reference, fused, compiled")

    probe = BerDiff.from_preset(preset)
    size, ch = probe.image_size, probe.image_channels
    del probe
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, ch, size, size, generator=g)
    y = (torch.rand(args.batch, 1, size, size, generator=g) < 0.3).float()

    fused_name = next((n for n in (("triton", "cuda") if device.type == "cuda" else ("cpu",))
                       if backends.available(n, device)), None)
    notes, variants = [], []
    for name in wanted:
        if name == "reference":
            variants.append(make_variant(name, "torch", False, preset, args.batch, device, x, y))
        elif fused_name is None:
            notes.append(f"{name}: not measured - no fused backend is available on {device.type} here "
                         f"(available: {[n for n in backends.BACKENDS if backends.available(n, device)]}); "
                         f"build the C++ extension (pip install --no-build-isolation -e .)")
        else:
            variants.append(make_variant(name, fused_name, name == "compiled", preset, args.batch, device, x, y))

    batch = {"image": x, "mask": y}
    for v in list(variants):
        try:
            for _ in range(args.warmup):
                v["trainer"].train_step(batch)
            _sync(device)
        except Exception as e:  # a compile failure is a result to report, not a crash
            notes.append(f"{v['name']}: failed during warm-up: {type(e).__name__}: {e}")
            variants.remove(v)
    for _ in range(args.repeats):
        for v in variants:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.inner):
                v["trainer"].train_step(batch)
            _sync(device)
            v["times"].append((time.perf_counter() - t0) / args.inner)

    ref = next((v for v in variants if v["name"] == "reference"), None)
    rows = []
    yd = y.to(device)
    for v in variants:
        med = statistics.median(v["times"])
        sched = v["trainer"].model.schedule
        rows.append({"variant": v["name"], "backend": v["backend"], "compiled": v["compiled"],
                     "steps_per_s": 1 / med, "ms_per_step": 1e3 * med,
                     "bernoulli_ops_ms": time_ops(v["backend"], sched, yd, max(args.repeats, 5), device),
                     "ms_per_step_all": [round(1e3 * t, 2) for t in v["times"]],
                     "speedup_vs_reference": statistics.median(ref["times"]) / med if ref else None})
    fused = next((r for r in rows if r["variant"] == "fused"), None)
    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "preset": preset, "image_size": size, "batch": args.batch, "amp": "bf16" if device.type == "cuda" else "off",
        "threads": torch.get_num_threads(), "repeats": args.repeats, "inner": args.inner,
        "torch": torch.__version__, "python": platform.python_version(),
        "results": rows, "notes": notes,
        "target": {"what": "fused >= 1.2x reference steps/s (tiny preset, CPU)", "ratio":
                   fused["speedup_vs_reference"] if fused and ref else None,
                   "met": (fused["speedup_vs_reference"] >= TARGET) if fused and ref else None},
    }
    print(f"train step, preset {preset} ({size}x{size}), batch {args.batch}, {result['device']}, "
          f"{result['threads']} threads; median of {args.repeats} x {args.inner} steps")
    print(f"{'variant':<10} {'backend':<8} {'steps/s':>9} {'ms/step':>9} {'vs ref':>7} {'ops ms':>8}")
    for r in rows:
        sp = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-"
        print(f"{r['variant']:<10} {r['backend']:<8} {r['steps_per_s']:>9.3f} {r['ms_per_step']:>9.1f} {sp:>7} "
              f"{r['bernoulli_ops_ms']:>8.2f}")
    print("(ops ms: the step's Bernoulli ops alone - q_sample + loss forward and backward; the rest is the "
          "U-Net, AdamW and EMA)")
    for n in notes:
        print(f"note: {n}")
    if result["target"]["ratio"] is not None:
        print(f"target fused/reference >= {TARGET}: {result['target']['ratio']:.2f}x "
              f"({'met' if result['target']['met'] else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
