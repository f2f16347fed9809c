"""The deterministic U-Net baseline: same backbone, BCE, trained by the same trainer."""
import pytest
import torch

from berdiff_fast.baseline import DeterministicUNet
from berdiff_fast.evaluate import predict_sets, set_metrics
from berdiff_fast.model import BerDiff
from berdiff_fast.synthetic import SyntheticLesions
from berdiff_fast.trainer import Trainer, TrainConfig, load_model
from berdiff_fast.unet import num_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


def test_same_backbone_and_parameter_count_as_berdiff():
    torch.manual_seed(0)
    base = DeterministicUNet.from_preset("tiny", image_size=16)
    diff = BerDiff.from_preset("tiny", image_size=16)
    assert num_parameters(base) == num_parameters(diff)
    assert base.unet.config == diff.unet.config
    x = torch.randn(3, 1, 16, 16)
    logits = base(x)
    assert logits.shape == (3, 1, 16, 16)
    # A fresh network predicts p = 0.5 everywhere (zero-initialised last convolution), BCE = ln 2.
    assert torch.equal(logits, torch.zeros_like(logits))
    loss = base.training_losses(x, torch.ones(3, 1, 16, 16))["loss"]
    torch.testing.assert_close(loss, torch.full((3,), 0.6931472), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no noise schedule"):
        DeterministicUNet.from_preset("tiny", T=10)
    with pytest.raises(ValueError, match=r"takes \(1, 16, 16\) images"):
        base.training_losses(torch.randn(2, 1, 32, 32), torch.ones(2, 1, 32, 32))


def test_training_with_the_trainer_reduces_the_bce_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = DeterministicUNet.from_preset("tiny", image_size=16)
    data = SyntheticLesions(64, size=16, seed=1, mode="eval")
    cfg = TrainConfig(steps=30, batch_size=16, lr=2e-3, ema_decay=None, log_every=5, ckpt_every=30,
                      tensorboard="off")
    hist = Trainer(model, data, cfg, out=tmp_path / "run", progress=False).fit()
    first, last = hist["loss"][0], sum(hist["loss"][-5:]) / 5
    assert first == pytest.approx(0.6931, abs=1e-3)
    assert last < 0.6 * first, (first, last)

    loaded = load_model(tmp_path / "run" / "model.safetensors")
    assert isinstance(loaded, DeterministicUNet) and loaded.preset == "tiny"
    path = model.save(tmp_path / "b.safetensors")
    again = DeterministicUNet.load(path)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    with pytest.raises(ValueError, match="preset 'tiny', but preset 'lidc'"):
        load_model(path, preset="lidc")

    # One mask per image, repeated for the protocol: every GED count is the same number.
    test = SyntheticLesions(6, size=16, seed=2, mode="eval")
    masks, probs = predict_sets(loaded, test.images, k=16)
    assert masks.shape == (6, 16, 16, 16) and masks.dtype == torch.bool
    assert torch.equal(masks[:, 0], loaded.predict(test.images))
    m = set_metrics(masks, probs, test.annotations)
    torch.testing.assert_close(m["GED16"], m["GED1"])
    assert bool((m["HM-IoU16"] >= 0).all()) and bool((m["HM-IoU16"] <= 1).all())


def test_berdiff_file_is_not_a_baseline(tmp_path):
    torch.manual_seed(0)
    path = BerDiff.from_preset("tiny", image_size=16).save(tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="not the deterministic baseline"):
        DeterministicUNet.load(path)
