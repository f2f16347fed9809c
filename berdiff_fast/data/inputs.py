"""Plain inference inputs: a PNG, a NIfTI volume (slice by slice), or a folder of them.

Images are prepared as the training data are: a PNG is read as matplotlib reads it (8-bit / 255,
16-bit / 65535, the LIDC convention); a NIfTI volume is normalised per channel by a z-score over
its nonzero voxels (the BRATS convention, ``zscore_nonzero``; ``nifti_norm="none"`` keeps the
stored values instead, for volumes already scaled as a model's training images, e.g. to [0, 1]
for a model trained on LIDC's PNG crops) and cut into axial slices (array axis 2), array axes 0
and 1 being H and W. File suffixes are matched ignoring case.

Each NIfTI slice can carry its volume's :class:`VolumeGeometry` (``load_inputs(...,
geometry=True)``), which puts per-slice outputs back onto the input's voxel grid: the centre
crop undone, the input's affine (spacing, orientation, origin) kept, so that they overlay the
input exactly in a viewer.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._common import (DataError, centre_crop, check_crop, check_path, crop_offset, gray01, optional_import,
                      read_png, suffix_of, zscore_nonzero)
from .brats import MODALITIES, NIFTI_SUFFIXES, check_same_grid, find_modality, read_nifti_image

PNG_SUFFIXES = (".png",)
NIFTI_NORMS = ("zscore", "none")


@dataclass
class VolumeGeometry:
    """Where the slices of one NIfTI input came from.

    name: the volume's name (the file stem, or the BRATS case folder); shape: (H, W, D) of the
    stored volume; offset: (top, left) of the centre crop in it ((0, 0) without one); header:
    the source's NIfTI header, whose qform, sform, voxel sizes and units the outputs keep.
    """

    name: str
    shape: tuple[int, int, int]
    offset: tuple[int, int]
    header: object

    def to_nifti(self, arr: np.ndarray):
        """A nibabel Nifti1Image of ``arr`` (h, w, D) or (h, w, D, k), the outputs for this volume's
        (cropped) slices, on the input's grid: padded with 0 back to (H, W, D[, k]) around the
        crop (voxels outside it were not segmented), with the input's qform and sform (codes
        included), voxel sizes and units, so ``.affine`` equals the input's."""
        nib = optional_import("nibabel", "writing NIfTI files")
        h, w, d = self.shape
        top, left = self.offset
        if arr.ndim not in (3, 4) or arr.shape[2] != d or top + arr.shape[0] > h or left + arr.shape[1] > w:
            raise ValueError(f"arr: expected (h, w, {d}) or (h, w, {d}, k) fitting in {h}x{w} at offset "
                             f"{self.offset}, got shape {arr.shape}")
        full = np.zeros((h, w) + arr.shape[2:], dtype=arr.dtype)
        full[top:top + arr.shape[0], left:left + arr.shape[1]] = arr
        # A fresh header, not a copy of the input's: its intensity window (cal_min/max), intent
        # and description belong to the MR image, not to masks or probabilities.
        img = nib.Nifti1Image(full, None)
        src = self.header
        img.header.set_zooms(tuple(src.get_zooms()[:3]) + (1.0,) * (full.ndim - 3))
        img.header.set_xyzt_units(*src.get_xyzt_units())
        qform, qcode = src.get_qform(coded=True)
        sform, scode = src.get_sform(coded=True)
        if qcode:
            img.set_qform(qform, int(qcode))
        if scode:
            img.set_sform(sform, int(scode))
        return img


def _is_nifti(p: Path) -> bool:
    return suffix_of(p, NIFTI_SUFFIXES) is not None


def _is_png(p: Path) -> bool:
    return suffix_of(p, PNG_SUFFIXES) is not None


def _stem(p: Path) -> str:
    suffix = suffix_of(p, NIFTI_SUFFIXES + PNG_SUFFIXES)
    return p.name[: -len(suffix)] if suffix else p.stem


def _check_size(path: Path, image: np.ndarray, crop: int | None) -> None:
    h, w = image.shape[-2:]
    if crop is not None and (h < crop or w < crop):
        raise DataError(f"{path}: image of {h}x{w} is smaller than the crop {crop}x{crop}")


def _png(path: Path, channels: int, crop: int | None):
    arr = read_png(path)
    if channels == 1:
        image = gray01(path, arr)[None]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and channels == 3:
        image = np.moveaxis(arr[..., :3], -1, 0).astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 65535.0)
    else:
        have = 1 if arr.ndim == 2 else arr.shape[-1]
        raise DataError(f"{path}: a PNG with {have} channel(s) cannot give the {channels} input channels expected")
    _check_size(path, image, crop)
    yield _stem(path), np.ascontiguousarray(centre_crop(image, crop), dtype=np.float32), None


def _volume_slices(path: Path, name: str, vols: list[np.ndarray], header, crop: int | None, nifti_norm: str):
    """Normalise each channel volume (H, W, D) and yield its axial slices (C, H, W) with the geometry."""
    norm = np.stack([zscore_nonzero(v) if nifti_norm == "zscore" else v.astype(np.float32)
                     for v in vols])  # (C, H, W, D)
    _check_size(path, norm[..., 0], crop)
    h, w, d = vols[0].shape
    geometry = VolumeGeometry(name, (h, w, d), crop_offset(h, w, crop), header)
    for z in range(d):
        yield f"{name}_z{z:03d}", np.ascontiguousarray(centre_crop(norm[..., z], crop), dtype=np.float32), geometry


def _nifti(path: Path, channels: int, crop: int | None, nifti_norm: str):
    data, img = read_nifti_image(path)
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
    yield from _volume_slices(path, _stem(path), vols, img.header, crop, nifti_norm)


def _brats_case(folder: Path, crop: int | None, nifti_norm: str):
    files = [find_modality(folder, k) for k in MODALITIES]
    vols, imgs = zip(*(read_nifti_image(f) for f in files))
    for f, v in zip(files, vols):
        if v.ndim != 3:
            raise DataError(f"{f}: expected a 3-D volume (H, W, D), got shape {v.shape}")
    check_same_grid(files, [v.shape for v in vols], [img.affine for img in imgs])
    yield from _volume_slices(folder, folder.name, list(vols), imgs[0].header, crop, nifti_norm)


def load_inputs(path, channels: int, *, crop: int | None = None, geometry: bool = False,
                nifti_norm: str = "zscore") -> Iterator[tuple]:
    """Yield (name, image (C, H, W) float32) pairs from ``path``.

    Args:
        path: a PNG, a NIfTI volume (``.nii`` / ``.nii.gz``: 3-D for one channel, 4-D with the
            channels last), or a folder. A folder holding a BRATS case (``*_t1``, ``*_t1ce``,
            ``*_t2``, ``*_flair`` NIfTI files) with ``channels=4`` gives that case's slices with the
            channels in that order (the four must share one voxel grid); any other folder gives
            each PNG and NIfTI file in it (sorted by name, not recursive). Suffixes in any case.
        channels: the model's image channels; inputs with another count are an error.
        crop: optional centre crop to crop x crop (128 for 180 x 180 lidc_crops, 224 for BRATS).
        geometry: yield (name, image, geometry) triples instead, geometry the slice's
            :class:`VolumeGeometry` (one object shared by the slices of a volume) or None for a PNG.
        nifti_norm: how NIfTI voxels become image values: "zscore" (per volume and channel over
            the nonzero voxels, background 0: how BRATS training images are prepared) or "none"
            (the stored values, as float32). PNGs are always scaled to [0, 1].

    Names: the file stem for a PNG, ``<stem>_z<zzz>`` for a NIfTI slice. The path is checked when
    this is called; the files are read lazily, one at a time, as the iterator is consumed.
    """
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels: expected a positive int, got {channels!r}")
    if nifti_norm not in NIFTI_NORMS:
        raise ValueError(f"nifti_norm: expected one of {NIFTI_NORMS}, got {nifti_norm!r}")
    crop = check_crop(crop)
    path = check_path(path)
    if path.is_dir():
        if channels == len(MODALITIES) and all(find_modality(path, k) is not None for k in MODALITIES):
            items = _brats_case(path, crop, nifti_norm)
        else:
            files = sorted(p for p in path.iterdir() if p.is_file() and (_is_png(p) or _is_nifti(p)))
            if not files:
                raise DataError(f"{path}: no PNG or NIfTI (.nii, .nii.gz) files in this folder")
            items = _files(files, channels, crop, nifti_norm)
    elif _is_png(path):
        items = _png(path, channels, crop)
    elif _is_nifti(path):
        items = _nifti(path, channels, crop, nifti_norm)
    else:
        raise DataError(f"{path}: unsupported input (expected a .png, .nii or .nii.gz file, or a folder of them)")
    return items if geometry else ((name, image) for name, image, _ in items)


def _files(files: list[Path], channels: int, crop: int | None, nifti_norm: str):
    for f in files:
        yield from (_png(f, channels, crop) if _is_png(f) else _nifti(f, channels, crop, nifti_norm))
