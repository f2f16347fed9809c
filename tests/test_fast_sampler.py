"""The fast sampling path (compiled U-Net; CUDA graphs on a GPU) against the reference path."""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import berdiff_fast as bf
from berdiff_fast import fast
from conftest import requires_cuda


def _model(device="cpu", image_size=16):
    torch.manual_seed(0)
    m = bf.BerDiff.from_preset("tiny", image_size=image_size)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval().to(device)


@pytest.fixture(scope="module")
def cpu_model():
    fast.clear_cache()
    yield _model()
    fast.clear_cache()


def test_cpu_fast_path_gives_the_reference_masks_and_reuses_its_compilation(cpu_model):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = bf.sample(cpu_model, x, steps=3, k=3, seed=17, fast=False, backend="torch")
    got = bf.sample(cpu_model, x, steps=3, k=3, seed=17, fast=True, backend="torch")
    assert torch.equal(got.masks, ref.masks)
    assert torch.allclose(got.probs, ref.probs, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    again = bf.sample(cpu_model, x, steps=3, k=3, seed=17, fast=True, backend="torch")
    assert counters["stats"]["unique_graphs"] == graphs  # same shapes: no recompilation
    assert fast.stats["compiles"] >= 1 and len(fast._compiled[cpu_model]) == 1
    assert torch.equal(again.probs, got.probs)


def test_cpu_fast_path_recompiles_for_new_shapes(cpu_model):
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    bf.sample(cpu_model, x, steps=2, k=2, seed=1, fast=True, backend="torch")
    graphs = counters["stats"]["unique_graphs"]
    ref = bf.sample(cpu_model, x, steps=2, k=5, seed=1, fast=False, backend="torch")
    got = bf.sample(cpu_model, x, steps=2, k=5, seed=1, fast=True, backend="torch")
    assert counters["stats"]["unique_graphs"] > graphs
    assert torch.equal(got.masks, ref.masks)


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_environment_switch(monkeypatch, value):
    monkeypatch.setenv("BERDIFF_FAST", value)
    assert not fast.enabled(None)
    assert fast.enabled(True)
    monkeypatch.setenv("BERDIFF_FAST", "1")
    assert fast.enabled(None)
    monkeypatch.delenv("BERDIFF_FAST")
    assert fast.enabled(None) and not fast.enabled(False)


def test_cpu_fast_path_follows_a_replaced_unet(cpu_model):
    model = _model()
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    kw = dict(steps=2, k=2, seed=9, backend="torch")
    before = bf.sample(model, x, fast=True, **kw)
    model.unet = _model().unet  # same initialisation, then perturbed differently
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    got = bf.sample(model, x, fast=True, **kw)
    want = bf.sample(model, x, fast=False, **kw)
    assert not torch.equal(want.probs, before.probs)
    assert torch.allclose(got.probs, want.probs, atol=1e-5) and torch.equal(got.masks, want.masks)
    fast._compiled.pop(model)


def test_recompile_limit_falls_back_to_eager(monkeypatch):
    # Dynamo keeps one compiled U-Net per shape on the forward's code object; past its limit a
    # fullgraph compile fails hard. Sampling must go on (eagerly) with a warning instead.
    fast.clear_cache()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model = _model()
    kw = dict(steps=2, k=1, seed=4, backend="torch")
    bf.sample(model, torch.randn(1, 1, 16, 16), fast=True, **kw)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    with pytest.warns(UserWarning, match="recompile limit"):
        got = bf.sample(model, x, fast=True, **kw)
    want = bf.sample(model, x, fast=False, **kw)
    assert torch.equal(got.probs, want.probs)  # the eager U-Net: the very same computation
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shape is remembered: no second warning
        bf.sample(model, x, fast=True, **kw)
    fast.clear_cache()


def test_compile_mode_choice_and_the_tuning_warning(monkeypatch):
    # torch.compile wraps lazily: no GPU needed to check which mode a CUDA sampler would compile with.
    model = _model()
    monkeypatch.delenv("BERDIFF_COMPILE_MODE", raising=False)
    with pytest.warns(UserWarning, match="tunes its kernels for many minutes"):
        fast.compiled_unet(model, torch.device("cuda"))
    assert list(fast._compiled[model]) == [fast.COMPILE_MODE_CUDA]
    monkeypatch.setenv("BERDIFF_COMPILE_MODE", "default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.compiled_unet(model, torch.device("cuda"))
        fast.compiled_unet(model, torch.device("cpu"), mode="max-autotune")  # CPU: no GPU kernels to tune
    assert list(fast._compiled[model]) == [fast.COMPILE_MODE_CUDA, "default", "max-autotune"]
    fast._compiled.pop(model)


def test_compile_options_are_the_mode_and_the_concatenation_pass():
    opts = fast.inductor_options(fast.COMPILE_MODE_CUDA)
    assert opts["max_autotune"] and opts["coordinate_descent_tuning"]
    assert isinstance(opts["post_grad_custom_post_pass"], fast.ChannelsLastConcat)
    assert set(fast.inductor_options(None)) == {"post_grad_custom_post_pass"}


def test_compiled_unet_keeps_its_concatenations_channels_last():
    # On CUDA Inductor lowers a two-input cat to a pointwise kernel whose layout GroupNorm's
    # reshape used to fix as NCHW (fast.ChannelsLastConcat). The CPU compiler takes the same
    # lowering with force_pointwise_cat, layout optimisation forced and oneDNN off.
    import re

    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    net = bf.BerDiff.from_preset("tiny").eval().unet
    n, s = 2, net.config.image_size
    x = torch.randn(n, 1, s, s).contiguous(memory_format=torch.channels_last)
    y, t = (torch.rand(n, 1, s, s) < 0.5).float(), torch.full((n,), 500)
    compiled = torch.compile(net, fullgraph=True, dynamic=False, options=fast.inductor_options(None))
    torch._dynamo.reset()
    with inductor_config.patch(force_pointwise_cat=True, force_layout_optimization=True), \
            torch.backends.mkldnn.flags(enabled=False), torch.no_grad():
        out, (code, *_) = run_and_get_code(compiled, y, x, t)
        expected = net(y, x, t)
    torch._dynamo.reset()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    layouts = []  # of every 4-D activation buffer with more than one channel and column
    for m in re.finditer(r"empty_strided\w*\(\((\d+), (\d+), (\d+), (\d+)\), \((\d+), (\d+), (\d+), (\d+)\)", code):
        _, c, h, w, _, sc, sh, sw = map(int, m.groups())
        if c > 1 and w > 1 and (h, w) != (3, 3):  # not a 3x3 weight
            layouts.append("nhwc" if (sc, sh, sw) == (1, w * c, c) else "nchw" if (sh, sw) == (w, 1) else "other")
    assert layouts.count("nhwc") >= 10, layouts  # the pattern still finds the buffers
    assert "nchw" not in layouts, layouts


def test_bad_dtype(cpu_model):
    with pytest.raises(ValueError, match="dtype: expected"):
        bf.sample(cpu_model, torch.randn(1, 1, 16, 16), steps=2, k=1, fast=False, dtype=torch.float64)


@pytest.fixture
def no_tf32():
    # TF32 convolutions round logits to ~1e-3, and the compiled and eager paths may pick
    # different algorithms: compare true fp32 so that only draws within fp32 rounding of p differ.
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@requires_cuda
def test_cuda_graph_path_gives_the_reference_masks_in_fp32(no_tf32):
    m = _model("cuda")
    x = torch.randn(2, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    ref = bf.sample(m, x, steps=5, k=4, seed=3, fast=False, dtype=torch.float32)
    benchmark = torch.backends.cudnn.benchmark
    got = bf.sample(m, x, steps=5, k=4, seed=3, fast=True, dtype=torch.float32)
    assert torch.backends.cudnn.benchmark == benchmark  # cuDNN's timing was on only while capturing
    # compiled convolutions may take other fp32 algorithms; allow draws within rounding of p.
    assert (got.masks != ref.masks).float().mean() < 1e-3
    captures = fast.stats["graph_captures"]
    again = bf.sample(m, x, steps=5, k=4, seed=3, fast=True, dtype=torch.float32)
    assert fast.stats["graph_captures"] == captures and torch.equal(again.probs, got.probs)
    other = bf.sample(m, x, steps=5, k=4, seed=4, fast=True, dtype=torch.float32)
    assert not torch.equal(other.probs, got.probs)  # the seed lives on the device: replays see it


@requires_cuda
def test_cuda_graph_path_with_one_step_and_after_a_schedule_change(no_tf32):
    m = _model("cuda")
    x = torch.randn(1, 1, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    kw = dict(k=2, seed=5, dtype=torch.float32)
    one = bf.sample(m, x, steps=1, fast=True, **kw)  # the warm-up must not read a second timestep
    assert (one.masks != bf.sample(m, x, steps=1, fast=False, **kw).masks).float().mean() < 1e-3
    bf.sample(m, x, steps=3, fast=True, **kw)
    m.schedule = bf.NoiseSchedule.from_name("cosine", m.schedule.T)  # same timesteps, other tables
    got = bf.sample(m, x, steps=3, fast=True, **kw)
    want = bf.sample(m, x, steps=3, fast=False, **kw)
    assert (got.masks != want.masks).float().mean() < 1e-3


@requires_cuda
def test_cuda_bf16_step_probabilities_agree_with_fp32():
    m = _model("cuda")
    x = torch.randn(8, 1, 16, 16, device="cuda")
    y = (torch.rand(8, 1, 16, 16, device="cuda") < 0.5).float()
    t = torch.full((8,), 500, device="cuda")
    with torch.no_grad():
        p32 = torch.sigmoid(m(y, x, t))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            p16 = torch.sigmoid(m(y, x, t).float())
    assert (p32 - p16).abs().max() < 2e-2  # the documented bf16 tolerance of y0_hat per step
