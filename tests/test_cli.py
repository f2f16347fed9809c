"""The berdiff-fast command line end to end on tiny models and small files in the public layouts."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from berdiff_fast.cli import main
from berdiff_fast.trainer import checkpoint_info, load_model

nib = pytest.importorskip("nibabel")
Image = pytest.importorskip("PIL.Image")

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _train(out, *extra, steps=3):
    return main(["train", "--synthetic", "--synthetic-size", "32", "--image-size", "16", "--batch-size", "8",
                 "--steps", str(steps), "--tensorboard", "off", "--no-progress", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cli") / "run"
    assert _train(out) == 0
    torch.set_num_threads(before)
    return out


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize("command", [[], ["train"], ["sample"], ["evaluate"], ["demo"], ["bench"]])
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage: berdiff-fast" in text
    if command == ["train"]:
        assert "--resume" in text and "--ckpt-every" in text and "5e-5" in text
    if command == ["evaluate"]:
        assert "squared form" in text


def test_console_entry_point_help():
    exe = shutil.which("berdiff-fast")
    cmd = [exe] if exe else [sys.executable, "-m", "berdiff_fast.cli"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "sample", "evaluate", "demo", "bench"))


# --------------------------------------------------------------------------- train


def test_train_writes_a_resumable_run(trained):
    info = checkpoint_info(trained / "checkpoint.safetensors")
    assert info["step"] == 3 and info["train_config"]["lr"] == 5e-4  # the synthetic default
    assert info["split_info"]["dataset"] == "synthetic"
    assert (trained / "metrics.csv").is_file()
    model = load_model(trained / "model.safetensors")
    assert model.preset == "tiny" and model.image_size == 16


def test_train_errors_and_overwrite_protection(trained, tmp_path, capsys):
    assert _train(trained) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "a")]) == 2
    assert "give a data set path or --synthetic" in capsys.readouterr().err
    missing = tmp_path / "no_such_data"
    assert main(["train", str(missing), "--steps", "1", "--out", str(tmp_path / "b")]) == 2
    assert f"{missing}: no such file or directory" in capsys.readouterr().err
    assert main(["train", "--synthetic", "--out", str(tmp_path / "c")]) == 2
    assert "--steps/--minutes" in capsys.readouterr().err
    assert _train(trained, "--resume", "--preset", "lidc", steps=4) == 2
    assert "a checkpoint of preset 'tiny', but preset 'lidc'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--synthetic", "--steps", "0", "--out", str(tmp_path / "d")])
    assert e.value.code == 2
    assert "--steps: expected a positive integer" in capsys.readouterr().err


def test_train_and_evaluate_on_lidc_crops(tmp_path, capsys):
    from test_data import make_lidc_png

    root = tmp_path / "lidc"
    make_lidc_png(root, layout={"train": {"LIDC-IDRI-0001": 2, "LIDC-IDRI-0002": 2}, "test": {"LIDC-IDRI-0003": 2}})
    out = tmp_path / "run"
    assert main(["train", str(root), "--preset", "tiny", "--image-size", "16", "--crop", "16", "--batch-size", "2",
                 "--steps", "2", "--tensorboard", "off", "--no-progress", "--out", str(out)]) == 0
    info = checkpoint_info(out / "checkpoint.safetensors")
    assert info["train_config"]["lr"] == 5e-5  # the paper's LIDC learning rate
    assert info["split_info"]["format"] == "lidc_crops_png" and info["split_info"]["split"] == "train"
    res = tmp_path / "lidc.json"
    assert main(["evaluate", str(out / "checkpoint.safetensors"), str(root), "--crop", "16", "--k", "4",
                 "--steps", "2", "--no-progress", "--out", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["protocol"] == "lidc" and r["n_images"] == 2
    assert set(r["metrics"]) >= {"GED4", "GED1", "HM-IoU4", "Soft-Dice4", "CI4", "S_c4", "D_max4", "D_a4"}
    assert r["split_info"]["split"] == "test" and r["split_info"]["format"] == "lidc_crops_png"
    assert "squared" in r["ged_form"]


def test_train_and_evaluate_on_brats(tmp_path):
    from test_data import _small_brats

    root = tmp_path / "brats"
    _small_brats(root, per_split=1, shape=(20, 20, 80 + 26 + 2))
    out = tmp_path / "run"
    assert main(["train", str(root), "--preset", "tiny", "--image-size", "16", "--image-channels", "4", "--crop", "16",
                 "--batch-size", "2", "--steps", "1", "--tensorboard", "off", "--no-progress", "--out", str(out)]) == 0
    assert checkpoint_info(out / "checkpoint.safetensors")["train_config"]["lr"] == 1e-4  # the paper's BRATS lr
    res = tmp_path / "brats.json"
    assert main(["evaluate", str(out / "model.safetensors"), str(root), "--crop", "16", "--k", "3", "--steps", "2",
                 "--no-progress", "--out", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["protocol"] == "brats" and r["n_images"] == 2
    assert set(r["metrics"]) == {"Dice", "Dice1", "Dice_nonempty", "Dice1_nonempty"}
    assert 0 <= r["metrics"]["Dice"] <= 100 and r["split_info"]["dataset"] == "BRATS2021"


# --------------------------------------------------------------------------- sample


def test_sample_png_folder_outputs_and_overwrite(trained, tmp_path, capsys):
    inputs = tmp_path / "in"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _png(inputs / f"{name}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    out = tmp_path / "out"
    args = ["sample", str(trained / "model.safetensors"), str(inputs), "--out", str(out), "--k", "3", "--steps", "2",
            "--no-progress"]
    assert main(args) == 0
    for name in ("a", "b"):
        d = out / name
        masks = np.stack([np.asarray(Image.open(d / f"mask_{j:02d}.png")) for j in range(3)])
        assert masks.shape == (3, 16, 16) and set(np.unique(masks)) <= {0, 255}
        sal = np.asarray(Image.open(d / "saliency.png")).astype(np.float64) / 65535
        np.testing.assert_allclose(sal, (masks == 255).mean(0), atol=1e-4)
        assert np.asarray(Image.open(d / "prob_00.png")).dtype == np.uint16
        assert (d / "uncertainty.png").is_file() and (d / "overlay.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == ["a", "b"] and summary["k"] == 3
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_sample_nifti_volume_gives_volumes(trained, tmp_path):
    vol = np.random.default_rng(1).normal(size=(16, 16, 3)).astype(np.float32) + 5
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "scan.nii.gz"))
    out = tmp_path / "out"
    assert main(["sample", str(trained / "checkpoint.safetensors"), str(tmp_path / "scan.nii.gz"), "--out", str(out),
                 "--k", "2", "--steps", "2", "--no-progress", "--no-figure"]) == 0
    masks = nib.load(str(out / "scan_masks.nii.gz")).get_fdata()
    sal = nib.load(str(out / "scan_saliency.nii.gz")).get_fdata()
    assert masks.shape == (16, 16, 3, 2) and sal.shape == (16, 16, 3)
    np.testing.assert_allclose(sal, masks.mean(-1), atol=1e-6)
    assert (out / "scan_z000" / "mask_00.png").is_file()  # auto format: PNG as well
    assert json.loads((out / "summary.json").read_text())["nifti_norm"] == "zscore"
    # --nifti-norm none: the stored voxel values reach the model, and the summary says so
    raw = tmp_path / "raw"
    assert main(["sample", str(trained / "checkpoint.safetensors"), str(tmp_path / "scan.nii.gz"), "--out", str(raw),
                 "--k", "2", "--steps", "2", "--no-progress", "--no-figure", "--nifti-norm", "none"]) == 0
    assert json.loads((raw / "summary.json").read_text())["nifti_norm"] == "none"
    probs = [nib.load(str(d / "scan_probs.nii.gz")).get_fdata() for d in (out, raw)]
    assert not np.allclose(probs[0], probs[1])  # same seed, other inputs


def test_sample_nifti_outputs_overlay_the_input(trained, tmp_path):
    # A scan with a non-identity affine (swapped and flipped axes, anisotropic voxels, an origin),
    # cropped to the model's 16 x 16: the outputs must lie on the input's grid, as a viewer shows it.
    h, w, d, k = 21, 19, 2, 2
    affine = np.array([[0.0, -0.8, 0.0, 100.0], [-0.9, 0.0, 0.0, 120.0], [0.0, 0.0, 2.5, -60.0], [0, 0, 0, 1]])
    vol = np.random.default_rng(2).normal(size=(h, w, d)).astype(np.float32) + 5
    src = nib.Nifti1Image(vol, affine)
    src.set_qform(affine, 1)
    nib.save(src, str(tmp_path / "scan.nii.gz"))
    out = tmp_path / "out"
    assert main(["sample", str(trained / "model.safetensors"), str(tmp_path / "scan.nii.gz"), "--crop", "16",
                 "--out", str(out), "--k", str(k), "--steps", "2", "--no-progress", "--no-figure"]) == 0
    orig = nib.load(str(tmp_path / "scan.nii.gz"))
    top, left = (h - 16) // 2, (w - 16) // 2
    for what, shape in (("masks", (h, w, d, k)), ("probs", (h, w, d, k)), ("saliency", (h, w, d))):
        img = nib.load(str(out / f"scan_{what}.nii.gz"))
        assert img.shape == shape, what
        np.testing.assert_array_equal(img.affine, orig.affine)
        assert img.header.get_zooms()[:3] == orig.header.get_zooms()
    masks = np.asanyarray(nib.load(str(out / "scan_masks.nii.gz")).dataobj)
    inside = np.zeros((h, w), bool)
    inside[top:top + 16, left:left + 16] = True
    assert not masks[~inside].any()  # nothing outside the crop
    for z in range(d):  # the PNG outputs (crop coordinates) sit at the crop's offset in the volume
        for j in range(k):
            png = np.asarray(Image.open(out / f"scan_z{z:03d}" / f"mask_{j:02d}.png")) // 255
            np.testing.assert_array_equal(masks[top:top + 16, left:left + 16, z, j], png)
    assert masks.any()  # the check above compared something
    summary = json.loads((out / "summary.json").read_text())
    assert "input volume's grid" in summary["nifti"] and summary["crop"] == 16


def test_sample_bad_inputs_name_the_problem(trained, tmp_path, capsys):
    _png(tmp_path / "big.png", np.zeros((32, 32), np.uint8))
    ckpt = str(trained / "model.safetensors")
    assert main(["sample", ckpt, str(tmp_path / "big.png"), "--out", str(tmp_path / "o1"), "--no-progress"]) == 2
    assert "is 32x32, but the model takes 16x16; pass --crop 16" in capsys.readouterr().err
    assert main(["sample", ckpt, str(tmp_path / "big.png"), "--crop", "16", "--k", "2", "--steps", "2",
                 "--no-figure", "--out", str(tmp_path / "o2"), "--no-progress"]) == 0
    missing = tmp_path / "nope.safetensors"
    assert main(["sample", str(missing), str(tmp_path / "big.png"), "--out", str(tmp_path / "o3")]) == 2
    assert f"{missing}: no such checkpoint file" in capsys.readouterr().err
    assert main(["sample", ckpt, str(tmp_path / "none.png"), "--out", str(tmp_path / "o4")]) == 2
    assert "none.png: no such file or directory" in capsys.readouterr().err
    assert main(["sample", ckpt, str(tmp_path / "big.png"), "--preset", "lidc", "--out", str(tmp_path / "o5")]) == 2
    assert "preset 'tiny', but preset 'lidc'" in capsys.readouterr().err
    bad = tmp_path / "junk.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["sample", str(bad), str(tmp_path / "big.png"), "--out", str(tmp_path / "o6")]) == 2
    assert "junk.safetensors: not a readable safetensors checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- evaluate, demo, bench


def test_evaluate_synthetic_protocol_json(trained, tmp_path, capsys):
    out = tmp_path / "res.json"
    args = ["evaluate", str(trained / "model.safetensors"), "--synthetic", "--synthetic-size", "3", "--steps", "2",
            "--per-image", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert set(r["metrics"]) >= {"GED16", "GED8", "GED4", "GED1", "HM-IoU16", "Soft-Dice16", "CI16"}
    assert r["k"] == 16 and r["n_images"] == 3 and len(r["per_image"]) == 3
    assert r["ged_form"].startswith("squared") and r["split_info"]["dataset"] == "synthetic"
    assert 0 <= r["calibration"]["mae_active"] <= 1
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["evaluate", str(trained / "model.safetensors"), "--out", str(tmp_path / "x.json")]) == 2
    assert "give a data set path or --synthetic" in capsys.readouterr().err


def test_evaluate_synthetic_test_set_does_not_follow_the_sampling_seed(trained, tmp_path, capsys):
    # The sampling --seed must not pick the test images: `train --synthetic --seed 10000` used to
    # train on the very images `evaluate --synthetic --seed 0` scored.
    infos = []
    for seed in ("0", "7"):
        out = tmp_path / f"res{seed}.json"
        assert main(["evaluate", str(trained / "model.safetensors"), "--synthetic", "--synthetic-size", "1", "--k", "1",
                     "--steps", "1", "--seed", seed, "--no-progress", "--out", str(out)]) == 0
        infos.append(json.loads(out.read_text())["split_info"])
    assert infos[0] == infos[1] and infos[0]["seed"] == 10_000
    assert _train(tmp_path / "leak", "--seed", "10000") == 2
    assert "--seed: 10000 is the data seed of the synthetic test set" in capsys.readouterr().err
    assert not (tmp_path / "leak").exists()


def test_sample_weights_raw_on_a_weights_file_is_an_error(trained, tmp_path, capsys):
    _png(tmp_path / "a.png", np.zeros((16, 16), np.uint8))
    assert main(["sample", str(trained / "model.safetensors"), str(tmp_path / "a.png"), "--weights", "raw",
                 "--out", str(tmp_path / "o")]) == 2
    assert "weights: 'raw' chooses between the raw and EMA weights" in capsys.readouterr().err


def test_demo_small_budget_writes_the_comparison(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--minutes", "0.05", "--train-size", "64", "--test-size", "3", "--k", "4",
            "--steps", "2", "--batch-size", "8", "--no-progress"]
    assert main(args) == 0
    r = json.loads((out / "metrics.json").read_text())
    c = r["comparison"]
    assert c["GED4_berdiff"] == r["berdiff"]["GED4"] and c["GED4_baseline"] == r["baseline"]["GED4"]
    assert c["same_budget"]["steps"][0] == r["train"]["steps"] >= 1
    cal = r["calibration"]["saliency_vs_annotator_frequency"]
    assert 0 <= cal["mae_active"] <= 1 and 0 <= cal["ece"] <= 1 and cal["bins"]
    assert "squared" in r["ged_form"]
    for name in ("demo.png", "model.safetensors", "baseline.safetensors"):
        assert (out / name).stat().st_size > 0
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bench_passes_arguments_through(tmp_path):
    r = subprocess.run([sys.executable, "-m", "berdiff_fast.cli", "bench", "--which", "train_step", "--", "--help"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "--variants" in r.stdout and "--json" in r.stdout
