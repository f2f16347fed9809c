"""benchmarks/sass_report.py without a GPU: every kernel compiles for sm_90 in every
implementation and instance, and the report shows what the fixed-dtype instances are for: 16-byte
accesses, and a fraction of the code of the instance that switches over dtypes per tile."""
import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "sass_report.py")
NVCC = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
has_nvcc = os.access(NVCC, os.X_OK) or shutil.which("nvcc") is not None
KERNELS = {"q_sample", "init_noise", "ddim_step", "ddpm_step", "predict_y0", "loss_partial", "loss_backward"}


@pytest.mark.skipif(not has_nvcc, reason="needs nvcc")
def test_report_covers_every_kernel_and_instance(tmp_path):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    subprocess.run([sys.executable, SCRIPT, "--json", str(out)], check=True, env=env, capture_output=True)
    rows = json.loads(out.read_text())["results"]
    by = {(r["kernel"], r["impl"], r["io"]): r for r in rows}
    assert {k for k, impl, _ in by if impl == "triton"} == KERNELS
    assert ("loss_finish", "cuda", "-") in by
    for kernel in KERNELS:
        mask_only = kernel in ("q_sample", "init_noise")
        ios = ("any", "u8", "f32") if mask_only else ("any", "u8/f32", "u8/bf16", "f32/f32", "f32/bf16")
        assert {io for k, impl, io in by if k == kernel and impl == "cuda"} == set(ios), kernel
        rs = [by[(kernel, "cuda", io)] for io in ios]
        assert all(r["registers"] > 0 and r["local_bytes"] == 0 and r["tile"] in ("128x8", "256x8") for r in rs)
        fixed = by[(kernel, "cuda", "u8" if mask_only else "u8/f32")]
        assert fixed["instructions"] < 0.7 * by[(kernel, "cuda", "any")]["instructions"], kernel
    # 8 float32 elements per thread are two 16-byte accesses: the CUDA kernels and Triton (given
    # the runtime's alignment hints) load logits that way; 8 uint8 masks are one 8-byte store.
    for impl in ("cuda", "triton"):
        assert by[("ddim_step", impl, "u8/f32")]["accesses"].get("LDG.128", 0) >= 2, impl
        assert by[("q_sample", impl, "u8")]["accesses"].get("STG.64", 0) >= 1, impl


def test_interpreter_is_refused(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "TRITON_INTERPRET" in r.stderr
