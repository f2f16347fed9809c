"""Plain inference inputs: a PNG, a NIfTI volume (slice by slice), or a folder of them.

Images are prepared as the training data are: a PNG is read as matplotlib reads it (8-bit / 255,
16-bit / 65535, the LIDC convention); a NIfTI volume is normalised per channel by a z-score over
its nonzero voxels (the BRATS convention, ``zscore_nonzero``) and cut into axial slices
(array axis 2), array axes 0 and 1 being H and W.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ._common import DataError, centre_crop, check_crop, check_path, gray01, read_png, zscore_nonzero
from .brats import MODALITIES, NIFTI_SUFFIXES, find_modality, read_nifti


def _is_nifti(p: Path) -> bool:
    return p.name.endswith(NIFTI_SUFFIXES)


def _stem(p: Path) -> str:
    for suffix in NIFTI_SUFFIXES + (".png",):
        if p.name.endswith(suffix):
            return p.name[: -len(suffix)]
    return p.stem


def _check_size(path: Path, image: np.ndarray, crop: int | None) -> None:
    h, w = image.shape[-2:]
    if crop is not None and (h < crop or w < crop):
        raise DataError(f"{path}: image of {h}x{w} is smaller than the crop {crop}x{crop}")


def _png(path: Path, channels: int, crop: int | None) -> Iterator[tuple[str, np.ndarray]]:
    arr = read_png(path)
    if channels == 1:
        image = gray01(path, arr)[None]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and channels == 3:
        image = np.moveaxis(arr[..., :3], -1, 0).astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 65535.0)
    else:
        have = 1 if arr.ndim == 2 else arr.shape[-1]
        raise DataError(f"{path}: a PNG with {have} channel(s) cannot give the {channels} input channels expected")
    _check_size(path, image, crop)
    yield _stem(path), np.ascontiguousarray(centre_crop(image, crop), dtype=np.float32)


def _volume_slices(path: Path, name: str, vols: list[np.ndarray], crop: int | None):
    """Normalise each channel volume (H, W, D) and yield its axial slices (C, H, W)."""
    norm = np.stack([zscore_nonzero(v) for v in vols])  # (C, H, W, D)
    _check_size(path, norm[..., 0], crop)
    for z in range(norm.shape[-1]):
        yield f"{name}_z{z:03d}", np.ascontiguousarray(centre_crop(norm[..., z], crop), dtype=np.float32)


def _nifti(path: Path, channels: int, crop: int | None):
    data = read_nifti(path)
    if not np.issubdtype(data.dtype, np.number) or not np.isfinite(data).all():
        raise DataError(f"{path}: expected finite numeric voxels")
    if data.ndim == 3:
        vols = [data]
    elif data.ndim == 4:
        vols = [data[..., c] for c in range(data.shape[-1])]
    else:
        raise DataError(f"{path}: expected a 3-D (H, W, D) or 4-D (H, W, D, C) volume, got shape {data.shape}")
    if len(vols) != channels:
        raise DataError(f"{path}: a volume with {len(vols)} channel(s) cannot give the {channels} input "
                        f"channels expected")
    yield from _volume_slices(path, _stem(path), vols, crop)


def _brats_case(folder: Path, crop: int | None):
    files = [find_modality(folder, k) for k in MODALITIES]
    vols = [read_nifti(f) for f in files]
    for f, v in zip(files, vols):
        if v.ndim != 3 or v.shape != vols[0].shape:
            raise DataError(f"{f}: shape {v.shape} differs from {files[0].name}'s {vols[0].shape} or is not 3-D")
    yield from _volume_slices(folder, folder.name, vols, crop)


def load_inputs(path, channels: int, *, crop: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, image (C, H, W) float32) pairs from ``path``.

    Args:
        path: a PNG, a NIfTI volume (``.nii`` / ``.nii.gz``: 3-D for one channel, 4-D with the
            channels last), or a folder. A folder holding a BRATS case (``*_t1``, ``*_t1ce``,
            ``*_t2``, ``*_flair`` NIfTI files) with ``channels=4`` gives that case's slices with the
            channels in that order; any other folder gives each PNG and NIfTI file in it (sorted
            by name, not recursive).
        channels: the model's image channels; inputs with another count are an error.
        crop: optional centre crop to crop x crop (128 for 180 x 180 lidc_crops, 224 for BRATS).

    Names: the file stem for a PNG, ``<stem>_z<zzz>`` for a NIfTI slice. The path is checked when
    this is called; the files are read lazily, one at a time, as the iterator is consumed.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels: expected a positive int, got {channels!r}")
    crop = check_crop(crop)
    path = check_path(path)
    if path.is_dir():
        if channels == len(MODALITIES) and all(find_modality(path, k) is not None for k in MODALITIES):
            return _brats_case(path, crop)
        files = sorted(p for p in path.iterdir() if p.is_file() and (p.suffix == ".png" or _is_nifti(p)))
        if not files:
            raise DataError(f"{path}: no PNG or NIfTI (.nii, .nii.gz) files in this folder")
        return _files(files, channels, crop)
    if path.suffix == ".png":
        return _png(path, channels, crop)
    if _is_nifti(path):
        return _nifti(path, channels, crop)
    raise DataError(f"{path}: unsupported input (expected a .png, .nii or .nii.gz file, or a folder of them)")


def _files(files: list[Path], channels: int, crop: int | None):
    for f in files:
        yield from (_png(f, channels, crop) if f.suffix == ".png" else _nifti(f, channels, crop))
