"""berdiff_fast.data: small files in the public layouts, built here, read back and checked."""
from __future__ import annotations

import collections
import json
import pickle

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")
nib = pytest.importorskip("nibabel")
Image = pytest.importorskip("PIL.Image")

from berdiff_fast.data import (BraTS, DataError, LIDC, assign_split, draw_annotation,  # noqa: E402
                               load_inputs, read_pickle_chunked, zscore_nonzero)
from berdiff_fast.data.brats import find_modality  # noqa: E402
from berdiff_fast.data.inputs import VolumeGeometry  # noqa: E402

LIDC_FRACTIONS = (0.70, 0.15, 0.15)
BRATS_FRACTIONS = (0.8, 0.1, 0.1)


def _names_in(split: str, fmt: str, fractions, count: int, start: int = 0) -> list[str]:
    """The first ``count`` ids of the form ``fmt.format(i)`` that the split rule puts in ``split``."""
    out, i = [], start
    while len(out) < count:
        name = fmt.format(i)
        if assign_split(name, fractions) == split:
            out.append(name)
        i += 1
    return out


# --------------------------------------------------------------------------- lidc_crops PNG


def _save_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _lidc_png_image(seed: int):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (180, 180), dtype=np.uint8)
    masks = np.zeros((4, 180, 180), np.uint8)
    for k in range(4):  # annotators disagree on the extent of one lesion
        masks[k, 80 - 3 * k:100 + 2 * k, 70:110 - k] = 1
    return img, masks


def make_lidc_png(root, layout=None, mask_scale=255):
    """lidc_crops layout: {split: {patient: n_images}}; returns {(split, name): (img, masks)}."""
    layout = layout or {"train": {"LIDC-IDRI-0001": 2, "LIDC-IDRI-0002": 1}, "test": {"LIDC-IDRI-0003": 1}}
    made, seed = {}, 0
    for split, patients in layout.items():
        for patient, n in patients.items():
            for j in range(n):
                stem = f"z-{100.0 + j}_c0"
                img, masks = _lidc_png_image(seed)
                seed += 1
                _save_png(root / split / "images" / patient / f"{stem}.png", img)
                for k in range(4):
                    _save_png(root / split / "gt" / patient / f"{stem}_l{k}.png", masks[k] * np.uint8(mask_scale))
                made[(split, f"{patient}/{stem}")] = (img, masks)
    return made


@pytest.mark.parametrize("mask_scale", [255, 1])
def test_lidc_png_read_back_with_crop(tmp_path, mask_scale):
    made = make_lidc_png(tmp_path, mask_scale=mask_scale)
    ds = LIDC(tmp_path, split="train", mode="eval")
    assert ds.format == "lidc_crops_png" and len(ds) == 3
    assert ds.names == ["LIDC-IDRI-0001/z-100.0_c0", "LIDC-IDRI-0001/z-101.0_c0", "LIDC-IDRI-0002/z-100.0_c0"]
    for i in range(len(ds)):
        item = ds[i]
        img, masks = made[("train", item["name"])]
        assert set(item) == {"image", "masks", "name"}
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 128, 128)
        assert item["masks"].dtype == torch.uint8 and item["masks"].shape == (4, 128, 128)
        np.testing.assert_array_equal(item["image"][0].numpy(), img[26:-26, 26:-26].astype(np.float32) / 255)
        np.testing.assert_array_equal(item["masks"].numpy(), masks[:, 26:-26, 26:-26])
    info = ds.split_info
    assert info["format"] == "lidc_crops_png" and info["split"] == "train"
    assert info["n_images"] == 3 and info["n_patients"] == 2 and info["annotations"] == 4 and info["crop"] == 128
    assert "released" in info["rule"]
    assert len(LIDC(tmp_path, split="test", mode="eval")) == 1


def test_lidc_png_no_crop_keeps_180(tmp_path):
    made = make_lidc_png(tmp_path)
    ds = LIDC(tmp_path, split="test", mode="eval", crop=None)
    item = ds[0]
    assert item["image"].shape == (1, 180, 180)
    np.testing.assert_array_equal(item["masks"].numpy(), made[("test", item["name"])][1])


def test_lidc_png_errors(tmp_path):
    make_lidc_png(tmp_path)
    gt = tmp_path / "train" / "gt" / "LIDC-IDRI-0002" / "z-100.0_c0_l2.png"
    gt.unlink()
    with pytest.raises(FileNotFoundError, match="z-100.0_c0_l2.png"):
        LIDC(tmp_path, split="train")
    _save_png(gt, np.zeros((180, 180), np.uint8))
    _save_png(gt.with_name("z-100.0_c0_l4.png"), np.zeros((180, 180), np.uint8))
    with pytest.raises(DataError, match=r"z-100.0_c0.png: 5 annotation files.*expected 4"):
        LIDC(tmp_path, split="train")
    gt.with_name("z-100.0_c0_l4.png").unlink()
    # a mask of the wrong size, caught at construction
    _save_png(gt, np.zeros((170, 180), np.uint8))
    with pytest.raises(DataError, match=r"z-100.0_c0_l2.png: mask of 170x180"):
        LIDC(tmp_path, split="train")
    _save_png(gt, np.zeros((180, 180), np.uint8))
    # an image of another size than the others
    img = tmp_path / "train" / "images" / "LIDC-IDRI-0002" / "z-100.0_c0.png"
    _save_png(img, np.zeros((176, 176), np.uint8))
    with pytest.raises(DataError, match=r"LIDC-IDRI-0002/z-100.0_c0.png: image of 176x176"):
        LIDC(tmp_path, split="train")
    _save_png(img, np.zeros((180, 180), np.uint8))
    # a corrupt PNG
    img.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"z-100.0_c0.png: not a readable PNG"):
        LIDC(tmp_path, split="train")
    _save_png(img, np.zeros((180, 180), np.uint8))
    # a non-binary mask: an error naming the file when the image is read
    _save_png(gt, np.full((180, 180), 128, np.uint8))
    ds = LIDC(tmp_path, split="train", mode="eval")
    with pytest.raises(DataError, match=r"z-100.0_c0_l2.png: mask values must be 0/1.*128"):
        ds[ds.names.index("LIDC-IDRI-0002/z-100.0_c0")]
    # a missing split, smaller-than-crop images, a missing path, bad arguments
    with pytest.raises(FileNotFoundError, match=r"val.*found splits: train, test"):
        LIDC(tmp_path, split="val")
    with pytest.raises(DataError, match="smaller than the crop 200x200"):
        LIDC(tmp_path, split="test", crop=200)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        LIDC(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"split: expected one of 'train', 'val', 'test'"):
        LIDC(tmp_path, split="training")
    with pytest.raises(ValueError, match=r"mode: expected one of 'train', 'eval'"):
        LIDC(tmp_path, mode="sample")
    with pytest.raises(ValueError, match="crop: expected a positive int"):
        LIDC(tmp_path, crop=0)


def test_lidc_png_empty_split_is_an_error(tmp_path):
    (tmp_path / "val" / "images" / "LIDC-IDRI-0009").mkdir(parents=True)
    (tmp_path / "val" / "gt").mkdir(parents=True)
    with pytest.raises(DataError, match="no PNG images found"):
        LIDC(tmp_path, split="val")


def test_unrecognised_path_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no LIDC data recognised"):
        LIDC(tmp_path)
    with pytest.raises(DataError, match="notes.txt: not a LIDC file"):
        LIDC(tmp_path / "notes.txt")


# --------------------------------------------------------------------------- annotation draw


def test_training_mode_draws_one_annotation_per_image_per_epoch(tmp_path):
    make_lidc_png(tmp_path)
    ds = LIDC(tmp_path, split="train", mode="train", seed=3)
    counts = collections.Counter()
    per_epoch = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        draws = []
        for i in range(len(ds)):
            item = ds[i] if epoch < 3 else None
            k = ds.annotation_index(i)
            assert k == draw_annotation(3, epoch, i, 4)
            if item is not None:
                assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 128, 128)
                torch.testing.assert_close(item["mask"], item["masks"][k:k + 1].float(), rtol=0, atol=0)
            draws.append(k)
            counts[k] += 1
        per_epoch.append(tuple(draws))
    assert set(counts) == {0, 1, 2, 3}            # every annotation is drawn
    assert min(counts.values()) >= 15             # 120 draws: ~30 each (P[any < 15] < 1e-3)
    assert len(set(per_epoch)) > 20               # the draw changes with the epoch
    again = LIDC(tmp_path, split="train", mode="train", seed=3)
    again.set_epoch(5)
    ds.set_epoch(5)
    assert [again.annotation_index(i) for i in range(3)] == [ds.annotation_index(i) for i in range(3)]
    other = [[draw_annotation(4, e, i, 4) for i in range(3)] for e in range(40)]
    assert other != [list(p) for p in per_epoch]  # another seed, another sequence
    with pytest.raises(ValueError, match="epoch: expected a non-negative int"):
        ds.set_epoch(-1)


# --------------------------------------------------------------------------- pickle


def _pickle_data(patients: list[str], slices: int = 2, rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    data = {}
    for p in patients:
        for s in range(slices):
            data[f"{p}_slice_{s}"] = {
                "image": rng.random((128, 128)).astype(np.float32),
                "masks": [(rng.random((128, 128)) < 0.3).astype(np.uint8) for _ in range(4)],
                "series_uid": f"1.3.6.1.{p}",
            }
    return data


def _lidc_patients():
    return (_names_in("train", "LIDC-IDRI-{:04d}", LIDC_FRACTIONS, 3)
            + _names_in("val", "LIDC-IDRI-{:04d}", LIDC_FRACTIONS, 1)
            + _names_in("test", "LIDC-IDRI-{:04d}", LIDC_FRACTIONS, 2))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_lidc_pickle_read_back_and_patient_split(tmp_path, protocol):
    patients = _lidc_patients()
    data = _pickle_data(patients)
    path = tmp_path / "data_lidc.pickle"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    seen = {}
    for split in ("train", "val", "test"):
        ds = LIDC(path, split=split, mode="eval")
        assert ds.format == "probunet_pickle"
        want_patients = sorted(p for p in patients if assign_split(p, LIDC_FRACTIONS) == split)
        assert ds.split_info["n_patients"] == len(want_patients)
        assert ds.split_info["n_images"] == len(ds) == 2 * len(want_patients)
        assert "sha256" in ds.split_info["rule"] and "0.7" in ds.split_info["rule"]
        for i in range(len(ds)):
            item = ds[i]
            value = data[item["name"]]
            assert item["name"].split("_slice_")[0] in want_patients
            np.testing.assert_array_equal(item["image"][0].numpy(), value["image"])
            np.testing.assert_array_equal(item["masks"].numpy(), np.stack(value["masks"]))
            seen[item["name"]] = split
    assert set(seen) == set(data)  # every image in exactly one split
    # split_info is recorded with results: it must serialise
    assert json.loads(json.dumps(ds.split_info)) == ds.split_info
    # items batch with the default collate
    ds = LIDC(path, split="train", mode="train")
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 1, 128, 128) and batch["masks"].shape == (4, 4, 128, 128)
    assert batch["mask"].shape == (4, 1, 128, 128) and len(batch["name"]) == 4


def test_pickle_is_read_in_chunks(tmp_path):
    data = _pickle_data(["LIDC-IDRI-0001"], slices=3)
    path = tmp_path / "x.pickle"
    path.write_bytes(pickle.dumps(data, protocol=4))
    assert path.stat().st_size > 10 * 4096
    back = read_pickle_chunked(path, chunk=4096)  # many read() calls into one buffer
    assert back.keys() == data.keys()
    for k in data:
        np.testing.assert_array_equal(back[k]["image"], data[k]["image"])
        np.testing.assert_array_equal(np.stack(back[k]["masks"]), np.stack(data[k]["masks"]))


def test_pickle_folder_is_merged(tmp_path):
    patients = _lidc_patients()
    data = _pickle_data(patients)
    keys = sorted(data)
    (tmp_path / "a.pickle").write_bytes(pickle.dumps({k: data[k] for k in keys[:5]}))
    (tmp_path / "b.pickle").write_bytes(pickle.dumps({k: data[k] for k in keys[5:]}))
    total = sum(len(LIDC(tmp_path, split=s, mode="eval")) for s in ("train", "val", "test"))
    assert total == len(data)


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_pickle_errors(tmp_path):
    patients = _lidc_patients()
    path = tmp_path / "data_lidc.pickle"
    blob = pickle.dumps(_pickle_data(patients), protocol=4)
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"data_lidc.pickle: corrupt or unreadable pickle"):
        LIDC(path)
    path.write_bytes(pickle.dumps({"LIDC-IDRI-0001_slice_0": _Exploit()}))
    with pytest.raises(DataError, match=r"data_lidc.pickle: .*refusing to load global"):
        LIDC(path)

    def write(mutate):
        data = _pickle_data(patients)
        mutate(data[sorted(data)[0]])
        path.write_bytes(pickle.dumps(data))

    first = sorted(_pickle_data(patients))[0]
    write(lambda v: v.update(masks=v["masks"][:3]))
    with pytest.raises(DataError, match=rf"data_lidc.pickle \['{first}'\]: 3 masks, expected 4"):
        LIDC(path)
    write(lambda v: v["masks"][1].__setitem__((0, 0), 2))
    with pytest.raises(DataError, match=rf"data_lidc.pickle \['{first}'\]: mask values must be 0/1"):
        LIDC(path)
    write(lambda v: v.update(image=v["image"] * 3))
    with pytest.raises(DataError, match=r"'image' values must lie in \[0, 1\]"):
        LIDC(path)
    write(lambda v: v.update(image=np.zeros((100, 100), np.float32)))
    with pytest.raises(DataError, match="smaller than the crop|but the others are"):
        LIDC(path)
    path.write_bytes(pickle.dumps({}))
    with pytest.raises(DataError, match="holds no images"):
        LIDC(path)
    # a split the rule leaves empty
    train_only = _names_in("train", "LIDC-IDRI-{:04d}", LIDC_FRACTIONS, 1)
    path.write_bytes(pickle.dumps(_pickle_data(train_only)))
    with pytest.raises(DataError, match="split 'test' is empty"):
        LIDC(path, split="test")


# --------------------------------------------------------------------------- PHiSeg HDF5


def make_phiseg(path, sizes=None, annotations=4):
    sizes = sizes or {"train": 3, "val": 2, "test": 2}
    rng = np.random.default_rng(1)
    made = {}
    with h5py.File(path, "w") as f:
        for split, n in sizes.items():
            img = rng.random((n, 128, 128)).astype(np.float32)
            labels = (rng.random((n, 128, 128, annotations)) < 0.3).astype(np.uint8)
            g = f.create_group(split)
            g.create_dataset("images", data=img - 0.5)
            g.create_dataset("labels", data=labels)
            g.create_dataset("uids", data=np.array([f"uid{split}{i}".encode() for i in range(n)]))
            made[split] = (img, labels)
    return made


def test_phiseg_hdf5_read_back(tmp_path):
    path = tmp_path / "data_lidc.hdf5"
    made = make_phiseg(path)
    for split in ("train", "val", "test"):
        ds = LIDC(path, split=split, mode="eval")
        img, labels = made[split]
        assert ds.format == "phiseg_hdf5" and len(ds) == len(img)
        assert ds.split_info["split"] == split and ds.split_info["n_uids"] == len(img)
        for i in range(len(ds)):
            item = ds[i]
            np.testing.assert_allclose(item["image"][0].numpy(), img[i], rtol=0, atol=1e-7)  # (x - 0.5) + 0.5
            np.testing.assert_array_equal(item["masks"].numpy(), np.moveaxis(labels[i], -1, 0))
            assert item["name"].endswith(f"uid{split}{i}")
    # a folder holding the one HDF5 file is recognised too, and the data set survives pickling
    # (DataLoader workers) after its file handle was opened
    ds = LIDC(tmp_path, split="train", mode="train")
    first = ds[0]["image"]
    clone = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(clone[0]["image"], first)


def test_phiseg_hdf5_errors(tmp_path):
    path = tmp_path / "data_lidc.hdf5"
    make_phiseg(path, sizes={"train": 2})
    with pytest.raises(DataError, match=r"data_lidc.hdf5: no group 'test' \(groups: train\)"):
        LIDC(path, split="test")
    make_phiseg(path, annotations=3)
    with pytest.raises(DataError, match=r"data_lidc.hdf5: train/labels holds 3 annotations per image, expected 4"):
        LIDC(path)
    make_phiseg(path, sizes={"train": 0})
    with pytest.raises(DataError, match="split 'train' is empty"):
        LIDC(path)
    make_phiseg(path)
    with h5py.File(path, "r+") as f:
        f["train/labels"][1, 5, 5, 2] = 7
    ds = LIDC(path, mode="eval")
    ds[0]
    with pytest.raises(DataError, match=r"data_lidc.hdf5 \[train/labels\[1\]\]: mask values must be 0/1.*7"):
        ds[1]
    ds.close()  # HDF5 locks a file open for reading against writers
    with h5py.File(path, "w") as f:
        g = f.create_group("train")
        g.create_dataset("images", data=np.zeros((2, 128, 128), np.float32))
        g.create_dataset("labels", data=np.zeros((2, 128, 120, 4), np.uint8))
    with pytest.raises(DataError, match=r"train/labels must be \(N, H, W, A\)"):
        LIDC(path)
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(DataError, match=r"data_lidc.hdf5: not a readable HDF5 file"):
        LIDC(path)


def test_phiseg_hdf5_image_range_is_checked(tmp_path):
    # A file holding images in [0, 1] (not image - 0.5) would be read as [0.5, 1.5] without a word.
    path = tmp_path / "unshifted.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        g = f.create_group("train")
        g.create_dataset("images", data=rng.random((2, 128, 128)).astype(np.float32))
        g.create_dataset("labels", data=np.zeros((2, 128, 128, 4), np.uint8))
    with pytest.raises(DataError, match=r"unshifted.hdf5 \[train/images\[0\]\]: 'image' values must lie in "
                                        r"\[0, 1\] after the \+ 0.5 shift.*\[-0.5, 0.5\]\), found \[0.5"):
        LIDC(path, mode="eval")
    # one bad image among good ones: refused when it is read, naming it
    path = tmp_path / "one_bad.hdf5"
    make_phiseg(path, sizes={"train": 3})
    with h5py.File(path, "r+") as f:
        f["train/images"][1, 7, 7] = 0.9
    ds = LIDC(path, mode="eval")
    ds[0]
    with pytest.raises(DataError, match=r"one_bad.hdf5 \[train/images\[1\]\]: 'image' values must lie in \[0, 1\]"):
        ds[1]
    ds.close()


# --------------------------------------------------------------------------- BRATS


def _brats_volumes(shape, seed):
    """Four modality volumes (a 'brain' box of nonzero voxels on a zero background) and a seg.
    The intensities are a low-entropy pattern, so the gzip writes stay fast at 240 x 240."""
    h, w, d = shape
    mh, mw = h // 8, w // 8
    i, j, z = (np.arange(n, dtype=np.int32) for n in shape)
    i, j, z = i[:, None, None], j[None, :, None], z[None, None, :]
    vols = []
    for c in range(4):
        v = np.zeros(shape, np.int16)
        pattern = ((3 * i + 5 * j + 7 * z + 11 * seed + c) % 251 + 1) * (c + 1)
        v[mh:h - mh, mw:w - mw] = np.broadcast_to(pattern, shape)[mh:h - mh, mw:w - mw]
        vols.append(v)
    seg = np.zeros(shape, np.uint8)
    for k in range(d):  # a tumour whose size encodes the slice, labels 1, 2 and 4
        r = 2 + k % 5
        seg[h // 2 - r: h // 2 + r, w // 2 - r: w // 2 + r, k] = (1, 2, 4)[k % 3]
    return vols, seg


def make_brats_case(root, case, shape, seed=0, skip=(), seg_override=None, affines=None):
    """``affines``: {key: 4 x 4} for the files that should not have the identity affine."""
    folder = root / case
    folder.mkdir(parents=True)
    vols, seg = _brats_volumes(shape, seed)
    if seg_override is not None:
        seg = seg_override
    for key, v in zip(("t1", "t1ce", "t2", "flair", "seg"), vols + [seg]):
        if key not in skip:
            affine = (affines or {}).get(key, np.eye(4))
            nib.save(nib.Nifti1Image(v, affine), str(folder / f"{case}_{key}.nii.gz"))
    return vols, seg


def test_brats_full_size_case_slices_crop_and_normalisation(tmp_path):
    case = _names_in("train", "BraTS2021_{:05d}", BRATS_FRACTIONS, 1)[0]
    vols, seg = make_brats_case(tmp_path, case, (240, 240, 80 + 26 + 3))
    ds = BraTS(tmp_path, split="train", mode="eval")
    assert len(ds) == 3  # 109 slices minus the bottom 80 and the top 26
    assert [ds[i]["name"] for i in range(3)] == [f"{case}_z080", f"{case}_z081", f"{case}_z082"]
    want = []  # z-score over the nonzero voxels of the whole volume, per channel, cropped [8:-8]
    for v in vols:
        brain = v[v != 0].astype(np.float64)
        norm = np.where(v != 0, (v - brain.mean()) / brain.std(), 0.0)
        want.append(norm[8:-8, 8:-8, 80:83])
    for i, z in enumerate((80, 81, 82)):
        item = ds[i]
        assert item["image"].shape == (4, 224, 224) and item["image"].dtype == torch.float32
        assert item["masks"].shape == (1, 224, 224) and item["masks"].dtype == torch.uint8
        np.testing.assert_array_equal(item["masks"][0].numpy(), (seg[8:-8, 8:-8, z] > 0))
        for c in range(4):
            np.testing.assert_allclose(item["image"][c].numpy(), want[c][..., i], rtol=1e-5, atol=1e-5)
    info = ds.split_info
    assert info["n_images"] == 3 and info["cases"] == [case] and info["channels"] == ["t1", "t1ce", "t2", "flair"]
    assert "sha256" in info["rule"] and "z-score" in info["normalisation"]
    assert json.loads(json.dumps(info)) == info


def test_zscore_nonzero_statistics():
    v = np.zeros((6, 6, 4), np.float32)
    v[1:5, 1:5] = np.arange(64, dtype=np.float32).reshape(4, 4, 4) + 10
    out = zscore_nonzero(v)
    brain = out[v != 0]
    assert abs(brain.mean()) < 1e-6 and abs(brain.std() - 1) < 1e-6
    assert (out[v == 0] == 0).all()
    assert (zscore_nonzero(np.zeros((3, 3, 3))) == 0).all()


def _small_brats(root, per_split=2, shape=(20, 20, 9)):
    cases = {s: _names_in(s, "BraTS2021_{:05d}", BRATS_FRACTIONS, per_split) for s in ("train", "val", "test")}
    for i, c in enumerate(sorted(sum(cases.values(), []))):
        make_brats_case(root, c, shape, seed=i)
    return cases


SMALL = dict(crop=16, drop_bottom=3, drop_top=2)


def test_brats_case_split_and_cache(tmp_path):
    cases = _small_brats(tmp_path)
    seen = set()
    for split in ("train", "val", "test"):
        ds = BraTS(tmp_path, split=split, mode="train", cache_size=1, **SMALL)
        assert ds.split_info["cases"] == sorted(cases[split])
        assert len(ds) == 2 * (9 - 3 - 2)
        names = set()
        for i in range(len(ds)):
            item = ds[i]
            assert item["image"].shape == (4, 16, 16) and item["mask"].shape == (1, 16, 16)
            torch.testing.assert_close(item["mask"], item["masks"].float(), rtol=0, atol=0)
            names.add(item["name"].rsplit("_z", 1)[0])
            assert len(ds._cache) <= 1  # memory stays bounded
        assert names == set(cases[split])
        assert not (names & seen)
        seen |= names
    assert seen == set(sum(cases.values(), []))


def test_brats_modality_names_ignore_case(tmp_path):
    train = _names_in("train", "BraTS2021_{:05d}", BRATS_FRACTIONS, 1)
    vols, seg = make_brats_case(tmp_path, train[0], (20, 20, 9))
    folder = tmp_path / train[0]
    for key, new in (("flair", "FLAIR.nii.gz"), ("t1", "T1.NII.GZ"), ("seg", "Seg.nii.gz")):
        (folder / f"{train[0]}_{key}.nii.gz").rename(folder / f"{train[0]}_{new}")
    assert find_modality(folder, "t1").name == f"{train[0]}_T1.NII.GZ"  # not the t1ce file
    item = BraTS(tmp_path, **SMALL)[0]
    z = int(item["name"][-3:])
    np.testing.assert_array_equal(item["masks"][0].numpy(), seg[2:-2, 2:-2, z] > 0)
    got = list(load_inputs(folder, channels=4))
    np.testing.assert_allclose(got[3][1][3], zscore_nonzero(vols[3])[:, :, 3], rtol=1e-6)
    (folder / f"{train[0]}_flair.nii").write_bytes(b"")  # a second flair file, its name in lower case
    with pytest.raises(DataError, match="several files for 'flair'"):
        find_modality(folder, "flair")
    # a case whose file names are all upper case is found as a case too
    upper, ref = tmp_path / "upper", tmp_path / "ref"
    for root in (upper, ref):
        make_brats_case(root, train[0], (20, 20, 9))
    for f in (upper / train[0]).iterdir():
        f.rename(f.with_name(f.name.upper()))
    assert len(BraTS(upper, **SMALL)) == len(BraTS(ref, **SMALL)) > 0


def test_brats_errors(tmp_path):
    train = _names_in("train", "BraTS2021_{:05d}", BRATS_FRACTIONS, 3)
    # a missing modality
    make_brats_case(tmp_path / "a", train[0], (20, 20, 9), skip=("flair",))
    with pytest.raises(FileNotFoundError, match=rf"{train[0]}_flair.nii.gz"):
        BraTS(tmp_path / "a", **SMALL)
    # modalities of different shapes
    make_brats_case(tmp_path / "b", train[0], (20, 20, 9))
    nib.save(nib.Nifti1Image(np.ones((20, 18, 9), np.int16), np.eye(4)),
             str(tmp_path / "b" / train[0] / f"{train[0]}_t2.nii.gz"))
    with pytest.raises(DataError, match=rf"{train[0]}_t2.nii.gz: shape \(20, 18, 9\) differs"):
        BraTS(tmp_path / "b", **SMALL)
    # too few slices for the drops
    make_brats_case(tmp_path / "c", train[0], (20, 20, 5))
    with pytest.raises(DataError, match="5 axial slices"):
        BraTS(tmp_path / "c", **SMALL)
    # a seg label other than 0, 1, 2, 4: an error naming the file when the case is read
    seg = np.zeros((20, 20, 9), np.uint8)
    seg[5, 5, 4] = 3
    make_brats_case(tmp_path / "d", train[0], (20, 20, 9), seg_override=seg)
    ds = BraTS(tmp_path / "d", **SMALL)
    with pytest.raises(DataError, match=rf"{train[0]}_seg.nii.gz: labels must be within \(0, 1, 2, 4\), found \[3\]"):
        ds[0]
    # a corrupt volume: its header cannot be read
    make_brats_case(tmp_path / "e", train[0], (20, 20, 9))
    bad = tmp_path / "e" / train[0] / f"{train[0]}_t1ce.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    with pytest.raises(DataError, match=rf"{train[0]}_t1ce.nii.gz: not a readable NIfTI file"):
        BraTS(tmp_path / "e", **SMALL)
    # slices smaller than the crop, no cases, an empty split
    make_brats_case(tmp_path / "f", train[0], (20, 20, 9))
    with pytest.raises(DataError, match="smaller than the crop 224x224"):
        BraTS(tmp_path / "f", drop_bottom=3, drop_top=2)
    (tmp_path / "g").mkdir()
    with pytest.raises(DataError, match="no BRATS case folders"):
        BraTS(tmp_path / "g")
    with pytest.raises(DataError, match="split 'test' is empty"):
        BraTS(tmp_path / "f", split="test", **SMALL)
    with pytest.raises(ValueError, match="fractions: expected three non-negative numbers"):
        BraTS(tmp_path / "f", fractions=(0.5, 0.5, 0.5))


def test_brats_files_of_a_case_must_share_one_grid(tmp_path):
    train = _names_in("train", "BraTS2021_{:05d}", BRATS_FRACTIONS, 1)[0]
    flipped = np.diag([-1.0, 1, 1, 1])  # the flair flipped left-right: a misregistered channel
    make_brats_case(tmp_path / "a", train, (20, 20, 9), affines={"flair": flipped})
    with pytest.raises(DataError, match=rf"{train}_flair.nii.gz: voxel-to-world affine .* differs from "
                                        rf"{train}_t1.nii.gz's"):
        BraTS(tmp_path / "a", **SMALL)
    # the same check for plain inference on the case folder
    with pytest.raises(DataError, match=rf"{train}_flair.nii.gz: voxel-to-world affine"):
        list(load_inputs(tmp_path / "a" / train, channels=4, crop=16))
    coarse = np.diag([2.0, 2, 2, 1])  # the segmentation at another spacing
    make_brats_case(tmp_path / "b", train, (20, 20, 9), affines={"seg": coarse})
    with pytest.raises(DataError, match=rf"{train}_seg.nii.gz: voxel-to-world affine"):
        BraTS(tmp_path / "b", **SMALL)
    # one shared non-identity affine, up to float32 header rounding, is fine
    shared = np.array([[0, -1.0, 0, 120.3], [1.0, 0, 0, -90.1], [0, 0, 1.0, 17.7], [0, 0, 0, 1]])
    make_brats_case(tmp_path / "c", train, (20, 20, 9),
                    affines={k: shared for k in ("t1", "t1ce", "t2", "flair", "seg")})
    assert len(BraTS(tmp_path / "c", **SMALL)) == 4


# --------------------------------------------------------------------------- inference inputs


def test_load_inputs_png_nifti_and_folders(tmp_path):
    gray = np.arange(180 * 180, dtype=np.uint32).reshape(180, 180) % 256
    _save_png(tmp_path / "pngs" / "b.png", gray.astype(np.uint8))
    wide = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 13 % 65536).astype(np.uint16)
    _save_png(tmp_path / "pngs" / "a16.png", wide)
    out = list(load_inputs(tmp_path / "pngs" / "b.png", channels=1, crop=128))
    assert [n for n, _ in out] == ["b"]
    np.testing.assert_array_equal(out[0][1], gray[None, 26:-26, 26:-26].astype(np.float32) / 255)
    a16 = list(load_inputs(tmp_path / "pngs" / "a16.png", channels=1))[0][1]
    np.testing.assert_allclose(a16[0], wide / 65535.0, rtol=1e-6)
    rgb = np.stack([gray, gray // 2, gray // 3], -1).astype(np.uint8)
    _save_png(tmp_path / "rgb.png", rgb)
    got = list(load_inputs(tmp_path / "rgb.png", channels=3))[0][1]
    np.testing.assert_array_equal(got, np.moveaxis(rgb, -1, 0) / np.float32(255))
    # a NIfTI volume, slice by slice, and a 4-D one with the channels last
    vol = np.zeros((10, 12, 3), np.float32)
    vol[2:8, 2:10] = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6, 8, 3) + 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "vol.nii.gz"))
    slices = list(load_inputs(tmp_path / "vol.nii.gz", channels=1))
    assert [n for n, _ in slices] == ["vol_z000", "vol_z001", "vol_z002"]
    norm = zscore_nonzero(vol)
    for z, (_, img) in enumerate(slices):
        assert img.shape == (1, 10, 12) and img.dtype == np.float32
        np.testing.assert_array_equal(img[0], norm[:, :, z])
    nib.save(nib.Nifti1Image(np.stack([vol, 2 * vol], -1), np.eye(4)), str(tmp_path / "vol4.nii"))
    two = list(load_inputs(tmp_path / "vol4.nii", channels=2))
    assert len(two) == 3 and two[0][1].shape == (2, 10, 12)
    np.testing.assert_allclose(two[1][1][1], norm[:, :, 1], rtol=1e-6, atol=1e-6)  # z-score is scale-free
    raw = list(load_inputs(tmp_path / "vol4.nii", channels=2, nifti_norm="none"))  # the stored values
    np.testing.assert_array_equal(raw[2][1], np.stack([vol, 2 * vol])[:, :, :, 2])
    # a folder of files, in name order
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "pngs" / "c.nii.gz"))
    names = [n for n, _ in load_inputs(tmp_path / "pngs", channels=1)]
    assert names == ["a16", "b", "c_z000", "c_z001", "c_z002"]
    # a BRATS case folder with channels=4
    case = "BraTS2021_99999"
    vols, _ = make_brats_case(tmp_path / "cases", case, (16, 16, 4))
    case_slices = list(load_inputs(tmp_path / "cases" / case, channels=4, crop=8))
    assert [n for n, _ in case_slices] == [f"{case}_z{z:03d}" for z in range(4)]
    np.testing.assert_allclose(case_slices[2][1][3], zscore_nonzero(vols[3])[4:12, 4:12, 2], rtol=1e-6)


def test_load_inputs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_inputs(tmp_path / "missing.png", channels=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG or NIfTI"):
        load_inputs(tmp_path / "empty", channels=1)
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(DataError, match="x.txt: unsupported input"):
        load_inputs(tmp_path / "x.txt", channels=1)
    _save_png(tmp_path / "g.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"g.png: a PNG with 1 channel\(s\) cannot give the 4"):
        list(load_inputs(tmp_path / "g.png", channels=4))
    with pytest.raises(DataError, match="smaller than the crop"):
        list(load_inputs(tmp_path / "g.png", channels=1, crop=16))
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 junk")
    with pytest.raises(DataError, match="bad.nii.gz: corrupt or unreadable NIfTI"):
        list(load_inputs(tmp_path / "bad.nii.gz", channels=1))
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(tmp_path / "v.nii.gz"))
    with pytest.raises(DataError, match=r"v.nii.gz: a volume with 1 channel\(s\) cannot give the 4"):
        list(load_inputs(tmp_path / "v.nii.gz", channels=4))
    with pytest.raises(ValueError, match="channels: expected a positive int"):
        load_inputs(tmp_path / "v.nii.gz", channels=0)
    with pytest.raises(ValueError, match=r"nifti_norm: expected one of \('zscore', 'none'\), got 'minmax'"):
        load_inputs(tmp_path / "v.nii.gz", channels=1, nifti_norm="minmax")


def test_load_inputs_suffixes_ignore_case(tmp_path):
    _save_png(tmp_path / "in" / "IMG.PNG", np.full((8, 8), 51, np.uint8))
    vol = np.arange(8 * 8 * 2, dtype=np.float32).reshape(8, 8, 2) + 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "in" / "Scan.NII.GZ"))
    names = [n for n, _ in load_inputs(tmp_path / "in", channels=1)]
    assert names == ["IMG", "Scan_z000", "Scan_z001"]
    (name, img), = load_inputs(tmp_path / "in" / "IMG.PNG", channels=1)
    assert name == "IMG" and np.allclose(img, 51 / 255)
    assert [n for n, _ in load_inputs(tmp_path / "in" / "Scan.NII.GZ", channels=1)] == ["Scan_z000", "Scan_z001"]


def _scan_affine():
    """A non-identity voxel-to-world matrix: axes swapped and flipped, anisotropic, off-origin."""
    return np.array([[0.0, -0.8, 0.0, 100.0], [-0.9, 0.0, 0.0, 120.0], [0.0, 0.0, 2.5, -60.0], [0, 0, 0, 1]])


def test_load_inputs_geometry_puts_outputs_back_on_the_input_grid(tmp_path):
    h, w, d, crop = 41, 38, 3, 16
    affine = _scan_affine()
    src = nib.Nifti1Image(np.random.default_rng(0).random((h, w, d)).astype(np.float32) + 1, affine)
    src.set_qform(affine, 1)  # scanner qform and aligned sform, as a converter writes them
    src.header.set_xyzt_units("mm", "sec")
    nib.save(src, str(tmp_path / "scan.nii.gz"))
    items = list(load_inputs(tmp_path / "scan.nii.gz", channels=1, crop=crop, geometry=True))
    assert [n for n, _, _ in items] == ["scan_z000", "scan_z001", "scan_z002"]
    geo = items[0][2]
    assert isinstance(geo, VolumeGeometry) and all(g is geo for _, _, g in items)
    top, left = (h - crop) // 2, (w - crop) // 2
    assert geo.name == "scan" and geo.shape == (h, w, d) and geo.offset == (top, left) == (12, 11)
    # one marked voxel at (i, j, z) of the cropped slices lands at (top + i, left + j, z)
    i, j, z = 3, 5, 2
    cropped = np.zeros((crop, crop, d, 2), np.uint8)
    cropped[i, j, z, 1] = 1
    out = geo.to_nifti(cropped)
    nib.save(out, str(tmp_path / "out.nii.gz"))
    back, orig = nib.load(str(tmp_path / "out.nii.gz")), nib.load(str(tmp_path / "scan.nii.gz"))
    assert back.shape == (h, w, d, 2)
    np.testing.assert_array_equal(back.affine, orig.affine)
    assert back.header.get_qform(coded=True)[1] == 1 and back.header.get_sform(coded=True)[1] == 2
    assert back.header.get_zooms()[:3] == orig.header.get_zooms() and back.header.get_xyzt_units() == ("mm", "sec")
    data = np.asanyarray(back.dataobj)
    assert list(zip(*np.nonzero(data))) == [(top + i, left + j, z, 1)]
    # the same world position as the input voxel the model saw there
    np.testing.assert_allclose(back.affine @ [top + i, left + j, z, 1], orig.affine @ [top + i, left + j, z, 1])
    assert np.isclose(items[z][1][0, i, j], zscore_nonzero(orig.get_fdata())[top + i, left + j, z])
    with pytest.raises(ValueError, match=r"arr: expected \(h, w, 3\)"):
        geo.to_nifti(np.zeros((crop, crop, 2), np.uint8))
    # PNG inputs carry no geometry; without geometry=True the items stay (name, image) pairs
    _save_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    assert list(load_inputs(tmp_path / "a.png", channels=1, geometry=True))[0][2] is None
    assert all(len(it) == 2 for it in load_inputs(tmp_path / "scan.nii.gz", channels=1))
