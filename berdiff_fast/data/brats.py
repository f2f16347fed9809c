"""BRATS 2021 axial slices from the per-case NIfTI folders (DESIGN §5).

Layout: ``<root>/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (``.nii`` also read), volumes of
240 x 240 x 155. Per case:

- channels in the order (t1, t1ce, t2, flair), each normalised per volume by a z-score over its
  nonzero voxels (``zscore_nonzero``): MR intensities are in arbitrary, scanner- and
  protocol-dependent units, so only statistics of the volume itself make channels comparable;
  restricting them to the brain (BraTS volumes are skull-stripped, background exactly 0) keeps
  the background from dominating; unlike min-max, a few bright voxels cannot squash the range;
  the background stays exactly 0. (nnU-Net's MRI normalisation is the same.)
- axial slices z = drop_bottom .. D - drop_top - 1 (155 - 80 - 26 = 49 per case; the paper's
  1,126 training cases give its 55,174 training images), centre-cropped 240 -> 224 ([8:-8]);
  array axes 0 and 1 of the NIfTI data are H and W, as stored.
- mask = seg > 0 (whole tumour); seg labels other than 0, 1, 2, 4 are an error naming the file.

Split: by case with ``assign_split`` on the case folder name, fractions (0.8, 0.1, 0.1) by default:
the paper holds out about 10% of the cases for testing (125 of 1,251); the validation cases come
out of its training share.

Memory: the index holds (case, z) pairs only; a volume is read when one of its slices is first
needed and the last ``cache_size`` cases are kept (cropped to the kept slices, about 40 MB each).
Headers are checked at construction: the five files must share one voxel grid (shape and
affine); voxel data (labels, corruption) when read.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from ._common import (SPLITS, AnnotatedSlices, DataError, assign_split, centre_crop, check_choice,
                      check_crop, check_fractions, check_path, optional_import, split_rule, zscore_nonzero)

MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS_FRACTIONS = (0.8, 0.1, 0.1)
SEG_LABELS = (0, 1, 2, 4)
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def _nibabel():
    return optional_import("nibabel", "reading NIfTI files")


def _modality_files(folder: Path, key: str) -> list[Path]:
    """The files ``*_<key>.nii.gz`` (or ``.nii``) of a case folder, their names matched ignoring
    case (``*_FLAIR.nii.gz`` and ``*_t1.NII.GZ`` occur in converted releases), sorted."""
    ends = tuple(f"_{key}{suffix}" for suffix in NIFTI_SUFFIXES)
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith(ends) and p.is_file())


def find_modality(folder: Path, key: str) -> Path | None:
    """The one file ``*_<key>.nii.gz`` (or ``.nii``) in a case folder, matched ignoring case;
    None when absent."""
    hits = _modality_files(folder, key)
    if len(hits) > 1:
        raise DataError(f"{folder}: several files for {key!r}: {', '.join(p.name for p in hits)}")
    return hits[0] if hits else None


def nifti_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """(data shape, 4 x 4 voxel-to-world affine) from a NIfTI header alone, or a DataError naming the file."""
    nib = _nibabel()
    try:
        img = nib.load(str(path))
        return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:  # nibabel raises many types (ImageFileError, OSError, EOFError, zlib.error)
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None


def read_nifti_image(path: Path):
    """(voxel data as a numpy array, the nibabel image: header, affine) of a NIfTI file, or a
    DataError naming the file."""
    nib = _nibabel()
    try:
        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), img
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except Exception as e:
        raise DataError(f"{path}: corrupt or unreadable NIfTI data ({type(e).__name__}: {e})") from None


def read_nifti(path: Path) -> np.ndarray:
    """The voxel data of a NIfTI file as a numpy array, or a DataError naming the file."""
    return read_nifti_image(path)[0]


# Affines of one case may differ by float32 header rounding (a qform quaternion against an sform
# matrix); a flip, a swapped axis or a shifted origin differs by far more than 1e-3 mm.
AFFINE_ATOL = 1e-3


def check_same_grid(files: list[Path], shapes: list[tuple[int, ...]], affines: list[np.ndarray]) -> None:
    """Every volume of one case must lie on the first one's voxel grid (same shape, same affine),
    or its voxels would be paired with another place in the head; a DataError names the file."""
    for f, shape, affine in zip(files[1:], shapes[1:], affines[1:]):
        if shape != shapes[0]:
            raise DataError(f"{f}: shape {shape} differs from {files[0].name}'s {shapes[0]}")
        if not np.allclose(affine, affines[0], rtol=0, atol=AFFINE_ATOL):
            show = lambda a: np.round(np.asarray(a, dtype=np.float64)[:3], 4).tolist()  # noqa: E731
            raise DataError(f"{f}: voxel-to-world affine {show(affine)} differs from {files[0].name}'s "
                            f"{show(affines[0])}: the volumes are not on one grid (flipped or not co-registered); "
                            f"resample them onto one grid first")


def case_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` holding at least one ``*_seg`` or modality NIfTI file (names in any
    case, as find_modality), sorted."""
    out = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and any(_modality_files(p, k) for k in MODALITIES + ("seg",)):
            out.append(p)
    return out


class BraTS(AnnotatedSlices):
    """BRATS 2021 axial slices with 4 normalised MR channels and the whole-tumour mask.

    Args:
        root: folder of case folders (``BraTS2021_00000/`` ...).
        split: "train", "val" or "test" (case-level hash split, see the module docstring).
        mode: "train" (items also carry ``mask``) or "eval".
        crop: side of the centre crop (224); None keeps 240.
        drop_bottom, drop_top: axial slices dropped at each end (80 and 26).
        fractions: (train, val, test) case fractions of the split.
        cache_size: decoded cases kept in memory (>= 1).
        seed: seeds the annotation draw (a single annotation here, so the draw is trivial).

    Items: ``image`` (4, crop, crop) float32, ``masks`` (1, crop, crop) uint8, ``name``
    (``<case>_z<zzz>``), and in mode="train" ``mask`` (1, crop, crop) float32.
    """

    num_annotations = 1

    def __init__(self, root, split: str = "train", mode: str = "train", crop: int | None = 224, *,
                 drop_bottom: int = 80, drop_top: int = 26, fractions=BRATS_FRACTIONS,
                 cache_size: int = 2, seed: int = 0):
        super().__init__(mode, seed)
        self.split = check_choice("split", split, SPLITS)
        self.crop = check_crop(crop)
        fractions = check_fractions(fractions)
        for name, v in (("drop_bottom", drop_bottom), ("drop_top", drop_top)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 1:
            raise ValueError(f"cache_size: expected a positive int, got {cache_size!r}")
        self.drop_bottom, self.drop_top, self.cache_size = drop_bottom, drop_top, cache_size
        root = check_path(root)
        if not root.is_dir():
            raise DataError(f"{root}: expected a folder of BRATS case folders")
        _nibabel()
        cases = case_folders(root)
        if not cases:
            raise DataError(f"{root}: no BRATS case folders found (expected <case>/<case>_t1.nii.gz, "
                            f"_t1ce, _t2, _flair and _seg)")
        self.cases: list[tuple[str, list[Path], Path]] = []
        self.index: list[tuple[int, int]] = []
        for folder in cases:
            if assign_split(folder.name, fractions) != split:
                continue
            files = []
            for key in MODALITIES + ("seg",):
                f = find_modality(folder, key)
                if f is None:
                    raise FileNotFoundError(f"{folder / (folder.name + '_' + key + '.nii.gz')}: no such file "
                                            f"(case {folder.name} needs t1, t1ce, t2, flair and seg)")
                files.append(f)
            shapes, affines = zip(*(nifti_geometry(f) for f in files))
            for f, s in zip(files, shapes):
                if len(s) != 3:
                    raise DataError(f"{f}: expected a 3-D volume (H, W, D), got shape {s}")
            check_same_grid(files, shapes, affines)
            h, w, d = shapes[0]
            if d <= drop_bottom + drop_top:
                raise DataError(f"{files[0]}: {d} axial slices, fewer than the {drop_bottom} + {drop_top} + 1 "
                                f"needed to keep any after dropping")
            if self.crop is not None and (h < self.crop or w < self.crop):
                raise DataError(f"{files[0]}: slices of {h}x{w} are smaller than the crop {self.crop}x{self.crop}")
            case_id = len(self.cases)
            self.cases.append((folder.name, files[:4], files[4]))
            self.index.extend((case_id, z) for z in range(drop_bottom, d - drop_top))
        if not self.index:
            raise DataError(f"{root}: split {split!r} is empty ({len(cases)} cases in all) under the rule "
                            f"{split_rule('case', fractions)!r}")
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.split_info = {
            "dataset": "BRATS2021",
            "format": "brats_nifti_cases",
            "path": str(root.resolve()),
            "split": split,
            "n_images": len(self.index),
            "n_cases": len(self.cases),
            "cases": [c[0] for c in self.cases],
            "channels": list(MODALITIES),
            "normalisation": "per volume and channel: z-score over nonzero voxels, background 0",
            "slices": f"z in [{drop_bottom}, D - {drop_top})",
            "crop": self.crop,
            "rule": split_rule("case", fractions) + "; case_id = the case folder name",
        }

    def __len__(self) -> int:
        return len(self.index)

    def _load_case(self, case_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (4, H', W', Z) float32, mask (H', W', Z) uint8) of the kept, cropped slices."""
        if case_id in self._cache:
            self._cache.move_to_end(case_id)
            return self._cache[case_id]
        name, files, seg_file = self.cases[case_id]
        seg = read_nifti(seg_file)
        if not np.issubdtype(seg.dtype, np.number) or not np.isfinite(seg).all():
            raise DataError(f"{seg_file}: segmentation must hold finite numbers, got {seg.dtype}")
        labels = np.unique(seg)
        bad = [v for v in labels.tolist() if v not in SEG_LABELS]
        if bad:
            raise DataError(f"{seg_file}: labels must be within {SEG_LABELS}, found {bad[:5]}")
        d = seg.shape[2]
        keep = slice(self.drop_bottom, d - self.drop_top)
        mask = centre_crop(np.moveaxis((seg > 0)[:, :, keep], -1, 0), self.crop).astype(np.uint8)
        channels = []
        for f in files:
            vol = read_nifti(f)
            if vol.shape != seg.shape:
                raise DataError(f"{f}: data of shape {vol.shape} differs from the segmentation's {seg.shape}")
            if not np.issubdtype(vol.dtype, np.number) or not np.isfinite(vol).all():
                raise DataError(f"{f}: expected finite numeric voxels, got {vol.dtype} with NaN/inf or non-numbers")
            norm = zscore_nonzero(vol)
            channels.append(centre_crop(np.moveaxis(norm[:, :, keep], -1, 0), self.crop))
        entry = (np.ascontiguousarray(np.stack(channels)), np.ascontiguousarray(mask))  # (4, Z, H', W'), (Z, H', W')
        self._cache[case_id] = entry
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return entry

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        case_id, z = self.index[index]
        image, mask = self._load_case(case_id)
        k = z - self.drop_bottom
        return self._item(index, image[:, k], mask[k][None], f"{self.cases[case_id][0]}_z{z:03d}")
