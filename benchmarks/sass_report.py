"""What nvcc and Triton emit for a GPU, read without one: registers, local memory and the width
of every global load and store of each Bernoulli kernel.

    python benchmarks/sass_report.py [--arch 90] [--json PATH]

- CUDA: the float32 kernels of csrc/cuda/berdiff_kernels.cuh, compiled with nvcc to a cubin for
  sm_<arch>, in every instance the launchers choose from: storage dtypes fixed at compile time
  (io "u8/f32": uint8 masks and float32 logits, what benchmarks/kernels.py times by default;
  "f32/bf16": the sampler's float32 masks and bfloat16 logits; ...) and "any", which reads them
  from its arguments (one switch per tile and tensor).
- Triton: the kernels of kernels/ compiled for the same target as the runtime specialises them
  for the benchmarks' tensors (uint8 masks, float32 logits, 16-byte-aligned pointers and element
  counts divisible by 16, i.e. ``tt.divisibility = 16``). Without those hints Triton cannot
  prove alignment and emits one scalar access per element, which is not what runs.

Counts are static (each instruction of the SASS once, whichever branch it is on): the "any"
instances list the accesses of every dtype, the others those of their own dtypes with the scalar
paths of partial and misaligned tiles beside the vector ones; what matters is which widths occur.
Needs nvcc ($CUDA_HOME/bin or PATH) and c++filt; cuobjdump is taken from there or from Triton's
bundled tools.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from datetime import datetime, timezone

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from berdiff_fast import schedule
from berdiff_fast.kernels.loss import _loss_bwd_kernel, _loss_fwd_kernel
from berdiff_fast.kernels.noise import _init_noise_kernel, _q_sample_kernel
from berdiff_fast.kernels.step import _predict_y0_kernel, _step_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The float32 launchers; instantiating them instantiates every kernel instance they launch.
CUDA_SOURCE = """
#include "cuda/berdiff_kernels.cuh"
namespace bc = berdiff::cuda;
using berdiff::OpArgs;
template void bc::launch_q_sample<float>(const OpArgs&, cudaStream_t);
template void bc::launch_step<float>(const OpArgs&, bool, cudaStream_t);
template void bc::launch_predict_y0<float>(const OpArgs&, int64_t, cudaStream_t);
template void bc::launch_loss<float>(const OpArgs&, double*, cudaStream_t);
template void bc::launch_loss_backward<float>(const OpArgs&, cudaStream_t);
void init_noise(const OpArgs& a, int64_t n, cudaStream_t s) { bc::launch_init_noise(a, n, s); }
"""
# csrc/kernel_args.h's Dtype, by value.
DTYPE_NAMES = ("bool", "u8", "f16", "bf16", "f32", "f64")

# Triton argument types at the benchmarks' dtypes, by argument name.
TRITON_TYPES = {
    "logits_ptr": "*fp32", "yt_ptr": "*u8", "y0_ptr": "*u8", "eps_ptr": "*u8", "y_ptr": "*u8",
    "y_out_ptr": "*u8", "y0_out_ptr": "*fp32", "out_ptr": "*fp32", "t_ptr": "*i64", "s_ptr": "*i64",
    "table_ptr": "*fp32", "partial_ptr": "*fp32", "grad_ptr": "*fp32", "dlogits_ptr": "*fp32",
    "seed": "i64", "offset": "*i64", "N": "i32", "numel": "i32", "eta": "fp32", "scale": "fp32",
}
COLUMNS = {"COL_ALPHA": schedule.COL_ALPHA, "COL_BETA_HALF": schedule.COL_BETA_HALF,
           "COL_ALPHA_BAR": schedule.COL_ALPHA_BAR, "COL_FLIP": schedule.COL_FLIP}
# Keys as the sampler's CUDA graph passes them: the seed a scalar, the offset in device memory.
KEY_FLAGS = {"SEED_IN_MEM": False, "OFFSET_IN_MEM": True, "WRITE_Y0": False}
TRITON_KERNELS = {  # report name: (kernel, constexprs beyond COLUMNS, KEY_FLAGS and BLOCK)
    "q_sample": (_q_sample_kernel, {}),
    "init_noise": (_init_noise_kernel, {}),
    "ddim_step": (_step_kernel, {"IS_DDIM": True}),
    "ddpm_step": (_step_kernel, {"IS_DDIM": False}),
    "predict_y0": (_predict_y0_kernel, {}),
    "loss_partial": (_loss_fwd_kernel, {}),
    "loss_backward": (_loss_bwd_kernel, {}),
}
# CUDA kernel (demangled base name) -> report name; step_kernel's last template flag is kDdim.
CUDA_NAMES = {"q_sample_kernel": "q_sample", "init_noise_kernel": "init_noise", "predict_y0_kernel": "predict_y0",
              "loss_partial_kernel": "loss_partial", "loss_backward_kernel": "loss_backward",
              "loss_finish_kernel": "loss_finish"}
# Kernels reading logits: their io label names the logits' dtype too.
READS_LOGITS = {"ddim_step", "ddpm_step", "predict_y0", "loss_partial", "loss_backward"}


def tool(name: str) -> str:
    """``name`` from $CUDA_HOME/bin, PATH or (cuobjdump) Triton's bundled tools."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name), shutil.which(name)]
    if name == "cuobjdump":
        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise SystemExit(f"sass_report: {name} not found (set CUDA_HOME or put it on PATH)")


def functions(cubin: str) -> dict[str, dict]:
    """Per function of a cubin: registers, stack and local bytes, static instruction count and
    global accesses by width."""
    cuobjdump = tool("cuobjdump")
    res = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    out: dict[str, dict] = {}
    for name, usage in re.findall(r"Function (\S+):\s*\n\s*(.*)", res):
        fields = dict(re.findall(r"(\w+):(\d+)", usage))
        out[name] = {"registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
                     "local_bytes": int(fields["LOCAL"]), "instructions": 0, "accesses": collections.Counter()}
    sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = out.get(m.group(1))
            continue
        if current is None or not re.match(r"\s*/\*[0-9a-f]{4,}\*/", line):
            continue
        current["instructions"] += 1
        m = re.search(r"\b(LDG|STG)\.E((?:\.\w+)*)\s", line)
        if m:
            width = next((w for w in (".128", ".64") if w in m.group(2)), "")
            current["accesses"][m.group(1) + width] += 1
    return out


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        raise SystemExit("sass_report: c++filt (binutils) not found on PATH")
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return [n.replace("berdiff::", "").replace("cuda::", "") for n in out.splitlines()]


def cuda_report(arch: int, workdir: str) -> list[dict]:
    src, cubin = os.path.join(workdir, "kernels.cu"), os.path.join(workdir, "kernels_cuda.cubin")
    with open(src, "w") as f:
        f.write(CUDA_SOURCE)
    subprocess.run([tool("nvcc"), "-O3", "-std=c++17", f"-arch=sm_{arch}", "-cubin", "-I", os.path.join(ROOT, "csrc"),
                    src, "-o", cubin], check=True)
    found = functions(cubin)
    rows = []
    for (mangled, info), name in zip(found.items(), demangle(list(found))):
        # void step_kernel<Tile<128, 8>, float, Io<DtypeTag<(Dtype)1>, ...>, true>(OpArgs); loss_finish_kernel(...)
        m = re.match(r"(?:void )?(\w+)(?:<Tile<(\d+), (\d+)>, (?:\w+, )?Io<(.*?) ?>(?:, (true|false))? ?>)?\(", name)
        if m is None or m.group(1) not in CUDA_NAMES and m.group(1) != "step_kernel":
            continue
        base, block, elems, io, ddim = m.groups()
        kernel = CUDA_NAMES.get(base) or ("ddim_step" if ddim == "true" else "ddpm_step")
        if io is None:
            label = "-"
        elif "AnyDtype" in io:
            label = "any"
        else:
            mask, logits, _ = (DTYPE_NAMES[int(v)] for v in re.findall(r"\(Dtype\)(\d)", io))
            label = f"{mask}/{logits}" if kernel in READS_LOGITS else mask
        rows.append({"impl": "cuda", "io": label, "kernel": kernel, "tile": f"{block}x{elems}" if block else "-", **info})
    return rows


def triton_report(arch: int) -> list[dict]:
    target = GPUTarget("cuda", arch, 32)
    rows = []
    for name, (fn, extra) in TRITON_KERNELS.items():
        constexprs = {**COLUMNS, **KEY_FLAGS, **extra, "BLOCK": 1024}
        constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
        unknown = [a for a in fn.arg_names if a not in constexprs and a not in TRITON_TYPES]
        if unknown:
            raise SystemExit(f"sass_report: no type for {fn.__name__} argument(s) {unknown}: extend TRITON_TYPES")
        signature = {a: "constexpr" if a in constexprs else TRITON_TYPES[a] for a in fn.arg_names}
        # What the runtime's specialisation proves for torch tensors and 16-divisible sizes.
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if a not in constexprs and (signature[a].startswith("*") or a in ("N", "numel"))}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                  target=target, options={"num_warps": 4})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            (info,) = functions(f.name).values()
        rows.append({"impl": "triton", "io": "u8/f32" if name in READS_LOGITS else "u8", "kernel": name,
                     "tile": "128x8", **info})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for an H100 (default)")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sass_report: TRITON_INTERPRET=1 turns the kernels into interpreted functions; unset it")
    with tempfile.TemporaryDirectory() as workdir:
        rows = cuda_report(args.arch, workdir) + triton_report(args.arch)
    rows.sort(key=lambda r: (r["kernel"], r["impl"], r["io"]))
    print(f"{'kernel':<14} {'impl':<7} {'io':<9} {'tile':>7} {'regs':>5} {'stack':>6} {'instr':>6}  global accesses (static)")
    for r in rows:
        acc = ", ".join(f"{k} x{v}" for k, v in sorted(r["accesses"].items()))
        print(f"{r['kernel']:<14} {r['impl']:<7} {r['io']:<9} {r['tile']:>7} {r['registers']:>5} {r['stack_bytes']:>6} "
              f"{r['instructions']:>6}  {acc}")
    nvcc_version = subprocess.run([tool("nvcc"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    result = {"arch": args.arch, "nvcc": nvcc_version, "triton": triton.__version__, "python": platform.python_version(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "results": [{**r, "accesses": dict(r["accesses"])} for r in rows]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
