"""benchmarks/sass_report.py without a GPU: every kernel compiles for sm_90 in every
implementation, and the report shows what each tile layout is for (vector accesses where the
layout promises them, none where it does not)."""
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
def test_report_covers_every_kernel_and_layout(tmp_path):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    subprocess.run([sys.executable, SCRIPT, "--json", str(out)], check=True, env=env, capture_output=True)
    rows = json.loads(out.read_text())["results"]
    by = {(r["kernel"], r["impl"]): r for r in rows}
    for impl in ("cuda_strided", "cuda_contiguous", "triton"):
        assert {k for k, i in by if i == impl} == KERNELS, impl
    assert ("loss_finish", "cuda") in by
    for kernel in KERNELS:
        strided, contiguous = by[(kernel, "cuda_strided")], by[(kernel, "cuda_contiguous")]
        assert not any(".128" in a for a in strided["accesses"]), kernel  # one scalar access per element
        assert strided["tile"] == ("512x4" if kernel == "loss_partial" else "256x4")
        assert all(r["registers"] > 0 and r["local_bytes"] == 0 for r in (strided, contiguous))
    # 8 float32 elements per thread are two 16-byte accesses: the contiguous layout and Triton
    # (given the runtime's alignment hints) load logits that way.
    for impl in ("cuda_contiguous", "triton"):
        assert by[("ddim_step", impl)]["accesses"].get("LDG.128", 0) >= 2, impl
    assert by[("q_sample", "triton")]["accesses"].get("STG.64", 0) >= 1  # 8 uint8 masks, one store


def test_interpreter_is_refused(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "TRITON_INTERPRET" in r.stderr
