"""benchmarks/profile_unet.py: the parts that run without a GPU (kernel categories, FLOP split,
finding Inductor's output module, the no-CUDA error)."""
import os
import sys

import pytest
import torch

import berdiff_fast as bf

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import profile_unet  # noqa: E402


@pytest.mark.parametrize("name, expected", [
    ("triton_poi_fused__to_copy_convolution_native_group_norm_silu_140", "inductor"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),
    ("nvjet_sm90_tst_128x256_64x4_1x2_h_bz_coopA_TNN", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>", "attention"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<float>", "layout"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_kernel_categories(name, expected):
    assert profile_unet.category(name) == expected


def test_flops_split_into_convolutions():
    model = bf.BerDiff.from_preset("tiny").eval()
    y, x, t = torch.zeros(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.full((2,), 5)
    total, conv = profile_unet.counted_flops(model, y, x, t)
    # First convolution alone: 2 * rows * pixels * out_ch * in_ch * 9.
    first = 2 * 2 * 32 * 32 * 32 * 2 * 9
    assert first < conv < total
    assert conv / total > 0.9  # the U-Net's FLOPs are its convolutions (DESIGN §2)


def test_finds_the_inductor_module_defining_the_kernels(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "ab"
    cache.mkdir(parents=True)
    (cache / "kernel_only.py").write_text("def triton_poi_fused_add_0(in_ptr0):\n    pass\n")
    (cache / "wrapper.py").write_text(
        "triton_poi_fused_add_0 = async_compile.triton('triton_poi_fused_add_0', '''\n"
        "def triton_poi_fused_add_0(in_ptr0):\n    pass\n''')\n"
        "def call(args):\n    pass\n")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    out = profile_unet.dump_wrapper(["sm90_conv", "triton_poi_fused_add_0"], str(tmp_path / "out"), "compiled")
    assert out == str(tmp_path / "out" / "inductor_compiled.py")
    assert "def call(" in open(out).read()
    assert profile_unet.dump_wrapper(["triton_poi_fused_mul_9"], str(tmp_path / "out"), "other") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_needs_cuda(capsys):
    with pytest.raises(SystemExit):
        profile_unet.main([])
    assert "needs CUDA" in capsys.readouterr().err


def test_weight_variants_convert_a_copy_and_leave_the_model_alone():
    model = bf.BerDiff.from_preset("tiny").eval()
    before = {k: (v.dtype, v.stride()) for k, v in model.state_dict().items()}
    for variant, dtype, channels_last in [("compiled_cl", torch.float32, True),
                                          ("compiled_bf16w", torch.bfloat16, False),
                                          ("compiled_bf16w_cl", torch.bfloat16, True)]:
        net = profile_unet.build(variant, model, torch.bfloat16)
        assert net._orig_mod is not model.unet
        w = net._orig_mod.input_blocks[0][0].weight  # (32, 2, 3, 3)
        assert w.dtype == dtype and w.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert {k: (v.dtype, v.stride()) for k, v in model.state_dict().items()} == before
