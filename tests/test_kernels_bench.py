"""benchmarks/kernels.py on the CPU: a quick run writes real timings for the ops asked, and an
unknown implementation is refused with the known ones named."""
import json
import os
import sys

import pytest
import torch

from berdiff_fast import backends

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import kernels as bench  # noqa: E402


def test_unknown_impl_names_the_choices(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' Triton runs interpreted
    with pytest.raises(SystemExit, match=r"cuda_blocked.*torch, torch\+compile, triton, cuda, cpu"):
        bench.main(["--device", "cpu", "--quick", "--impls", "cuda_blocked"])


@pytest.mark.skipif(not backends.available("cpu", torch.device("cpu")), reason="C++ extension not built")
def test_quick_run_writes_rows(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "kernels.json"
    bench.main(["--device", "cpu", "--quick", "--impls", "cpu", "--ops", "ddim_step", "--repeats", "1",
                "--inner", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert {(r["shape"], r["impl"]) for r in rows} == {(s, i) for s in ("4x1x32x32", "16x1x128x128")
                                                       for i in ("torch", "cpu")}
    assert all(r["op"] == "ddim_step" and r["median_us"] > 0 and r["graph_us"] is None for r in rows)
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["impl"] == "torch")
