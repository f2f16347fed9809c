import pytest
import torch

from berdiff_fast import BerDiff
from berdiff_fast.synthetic import SyntheticLesions
from berdiff_fast.train import train
from berdiff_fast.unet import num_parameters


def test_lidc_preset_has_the_released_parameter_count():
    assert num_parameters(BerDiff.from_preset("lidc").unet) == 85_599_233


def test_brats_and_tiny_presets():
    brats = BerDiff.from_preset("brats")
    assert brats.image_size == 224 and brats.image_channels == 4
    assert num_parameters(BerDiff.from_preset("tiny")) < 2_000_000


def test_fresh_model_predicts_eps_hat_one_half():
    m = BerDiff.from_preset("tiny")
    logits = m(torch.ones(3, 1, 32, 32), torch.randn(3, 1, 32, 32), torch.tensor([1, 500, 1000]))
    assert logits.shape == (3, 1, 32, 32) and torch.equal(logits, torch.zeros_like(logits))


def test_presets_and_overrides_are_validated():
    with pytest.raises(ValueError, match="preset: unknown 'lidcc'"):
        BerDiff.from_preset("lidcc")
    with pytest.raises(ValueError, match="unknown fields"):
        BerDiff.from_preset("tiny", widht=3)
    with pytest.raises(ValueError, match="image_size"):
        BerDiff.from_preset("tiny", image_size=30)
    with pytest.raises(ValueError, match="schedule: unknown"):
        BerDiff.from_preset("tiny", schedule="sigmoid")
    m = BerDiff.from_preset("tiny", image_size=16, schedule="cosine", T=200)
    assert m.image_size == 16 and m.schedule.name == "cosine" and m.schedule.T == 200


def _perturbed_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = BerDiff.from_preset("tiny", **kw)
    with torch.no_grad():
        for p in m.parameters():  # leave the zero-initialised state so outputs depend on inputs
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_save_load_round_trip(tmp_path):
    m = _perturbed_tiny(schedule="cosine", T=300)
    path = m.save(tmp_path / "sub" / "m.safetensors")
    m2 = BerDiff.load(path)
    assert m2.config == m.config
    for (k, a), (k2, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x, y, t = torch.randn(2, 1, 32, 32), torch.ones(2, 1, 32, 32), torch.tensor([3, 299])
    assert torch.equal(m(y, x, t), m2.eval()(y, x, t))
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["m.safetensors"]  # no temporary left


def test_corrupt_or_foreign_checkpoints_name_the_file(tmp_path):
    m = BerDiff.from_preset("tiny")
    good = m.save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        BerDiff.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        BerDiff.load(garbage)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="foreign.safetensors: .*without berdiff-fast config"):
        BerDiff.load(foreign)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        BerDiff.load(tmp_path / "missing.safetensors")


def test_loading_a_baseline_as_berdiff_is_a_clear_error(tmp_path):
    from berdiff_fast.baseline import DeterministicUNet

    path = DeterministicUNet.from_preset("tiny").save(tmp_path / "baseline.safetensors")
    with pytest.raises(ValueError, match="baseline.safetensors: holds a DeterministicUNet, not a BerDiff"):
        BerDiff.load(path)


def test_training_losses_validates_and_returns_per_sample_bits():
    m = BerDiff.from_preset("tiny")
    x, y0 = torch.randn(4, 1, 32, 32), (torch.rand(4, 1, 32, 32) < 0.3).float()
    out = m.training_losses(x, y0, generator=torch.Generator().manual_seed(0))
    assert out["loss"].shape == (4,) and out["t"].shape == (4,)
    # A fresh model predicts eps_hat = 1/2: BCE = 1 bit exactly, KL >= 0.
    assert (out["loss"] >= 1 - 1e-6).all()
    with pytest.raises(ValueError, match="x: the model takes 1 image channel"):
        m.training_losses(torch.randn(4, 2, 32, 32), y0)
    with pytest.raises(ValueError, match="y0: expected 4 dimensions"):
        m.training_losses(x, y0[:, 0])
    with pytest.raises(ValueError, match="y0: expected a binary mask"):
        m.training_losses(x, y0 * 0.5)
    with pytest.raises(ValueError, match="x: contains NaN"):
        m.training_losses(x * float("nan"), y0)


def _held_out_loss(m, x, y0):
    with torch.no_grad():
        return m.training_losses(x, y0, seed=123, generator=torch.Generator().manual_seed(5))["loss"].mean().item()


def test_tiny_model_loss_falls_over_a_short_training_run():
    torch.manual_seed(0)
    m = BerDiff.from_preset("tiny", image_size=16)
    train_set = SyntheticLesions(128, size=16, seed=0)
    held = SyntheticLesions(64, size=16, seed=99)
    x, y0 = held.images, held.annotations[:, :1].float()
    before = _held_out_loss(m, x, y0)
    hist = train(m, train_set, max_steps=40, batch_size=16, lr=1e-3, progress=False)
    after = _held_out_loss(m, x, y0)
    assert hist["steps"] == 40 and len(hist["loss"]) == 40
    assert after < before - 0.05, (before, after)


def test_a_first_level_wider_than_model_channels_builds_and_runs():
    m = BerDiff.from_preset("tiny", channel_mult=(2, 2), attention_ds=())
    out = m.unet(torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32), torch.tensor([3]))
    assert out.shape == (1, 1, 32, 32)
