"""berdiff_fast.evaluate: the BRATS Dice conventions on a tiny hand-made case."""
import pytest
import torch

from berdiff_fast.baseline import DeterministicUNet
from berdiff_fast.evaluate import evaluate


class _Slices:
    """A BRATS-like data set of 16 x 16 slices: two tumour-free, one with a tumour."""

    split_info = {"dataset": "BRATS2021", "split": "test"}

    def __init__(self):
        tumour = torch.zeros(1, 16, 16, dtype=torch.uint8)
        tumour[0, 4:8, 4:8] = 1
        self.masks = [torch.zeros(1, 16, 16, dtype=torch.uint8), tumour, torch.zeros(1, 16, 16, dtype=torch.uint8)]

    def __len__(self):
        return len(self.masks)

    def __getitem__(self, i):
        return {"image": torch.zeros(4, 16, 16), "masks": self.masks[i], "name": f"case_z{i:03d}"}


def test_brats_dice_reports_tumour_slices_apart_from_tumour_free_ones(one_thread):
    # A fresh baseline predicts p = 0.5 < threshold everywhere: an empty mask on every slice.
    torch.manual_seed(0)
    model = DeterministicUNet.from_preset("tiny", image_channels=4, image_size=16)
    r = evaluate(model, _Slices(), k=2, batch=2, per_image=True, progress=False)
    m = r["metrics"]
    # Over all slices the two tumour-free ones score 100 (Dice(empty, empty) = 1) ...
    assert m["Dice"] == pytest.approx(200 / 3) and m["Dice1"] == pytest.approx(200 / 3)
    # ... over the slice with a tumour, predicting nothing scores 0.
    assert m["Dice_nonempty"] == 0 and m["Dice1_nonempty"] == 0
    assert r["n_empty_target"] == 2 and r["n_images"] == 3
    assert [p["target_empty"] for p in r["per_image"]] == [True, False, True]
    assert "Dice_nonempty" in r["dice_form"] and "inference" in r["dice_form"]
    # No slice with a tumour: nothing to average, reported as null rather than a made-up number.
    r = evaluate(model, _Slices(), k=2, limit=1, progress=False)
    assert r["metrics"]["Dice"] == 100 and r["metrics"]["Dice_nonempty"] is None and r["n_empty_target"] == 1
