"""Shared pieces of the data sets: errors, optional imports, the split rule, the annotation draw,
centre crops, PNG decoding and the MR normalisation."""
from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")
MODES = ("train", "eval")


class DataError(ValueError):
    """A data file or data set that cannot be used as it is; the message names the file."""


def optional_import(module: str, what: str):
    """Import an optional dependency of the ``data`` extra, or fail saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the '{module.split('.')[0]}' package: "
                          f"pip install 'berdiff-fast[data]'") from e


def check_choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def check_crop(crop) -> int | None:
    if crop is None:
        return None
    if isinstance(crop, bool) or not isinstance(crop, int) or crop < 1:
        raise ValueError(f"crop: expected a positive int (the side of the centre crop) or None, got {crop!r}")
    return crop


def check_fractions(fractions) -> tuple[float, float, float]:
    try:
        f = tuple(float(x) for x in fractions)
    except TypeError:
        raise ValueError(f"fractions: expected three numbers (train, val, test), got {fractions!r}") from None
    if len(f) != 3 or min(f) < 0 or abs(sum(f) - 1.0) > 1e-9:
        raise ValueError(f"fractions: expected three non-negative numbers (train, val, test) summing to 1, "
                         f"got {fractions!r}")
    return f


def check_path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    return p


# --------------------------------------------------------------------------- split rule


def _unit_hash(key: str) -> float:
    """sha256 of the UTF-8 key, first 8 bytes as a big-endian integer, divided by 2**64: in [0, 1)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def assign_split(key: str, fractions: tuple[float, float, float]) -> str:
    """The split of one group (a patient or a case): "train" when u < f_train, "val" when
    u < f_train + f_val, else "test", with u = the sha256 unit hash of ``key``.

    Membership depends on the key alone, so a patient never changes split when the data set
    grows or shrinks, and all images of one patient land in the same split.
    """
    u = _unit_hash(key)
    f_train, f_val, _ = fractions
    if u < f_train:
        return "train"
    if u < f_train + f_val:
        return "val"
    return "test"


def split_rule(group: str, fractions: tuple[float, float, float]) -> str:
    f = fractions
    return (f"{group}-level hash split: u = int.from_bytes(sha256({group}_id.encode())[:8], 'big') / 2**64; "
            f"train if u < {f[0]:g}, val if u < {f[0] + f[1]:g}, else test")


# --------------------------------------------------------------------------- annotation draw


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (sha256 of their decimal text): nearby inputs give unrelated seeds."""
    text = ",".join(str(int(v)) for v in values).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def draw_annotation(seed: int, epoch: int, index: int, count: int) -> int:
    """The annotation drawn for item ``index`` in ``epoch``: uniform over 0..count-1, from a
    torch.Generator seeded with mix_seed(seed, epoch, index). A pure function of its arguments,
    so DataLoader workers, several processes and a resumed run all draw the same annotation."""
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, epoch, index))
    return int(torch.randint(count, (1,), generator=g))


# --------------------------------------------------------------------------- arrays


def crop_offset(h: int, w: int, crop: int | None) -> tuple[int, int]:
    """(top, left) of the centre crop of an h x w image: ((h - crop) // 2, (w - crop) // 2); (0, 0) for no crop."""
    return (0, 0) if crop is None else ((h - crop) // 2, (w - crop) // 2)


def centre_crop(arr: np.ndarray, crop: int | None) -> np.ndarray:
    """Centre crop of the last two axes to crop x crop at ``crop_offset``
    (180 -> 128 is [26:-26], 240 -> 224 is [8:-8])."""
    if crop is None:
        return arr
    top, left = crop_offset(*arr.shape[-2:], crop)
    return arr[..., top:top + crop, left:left + crop]


def suffix_of(path: Path, suffixes: tuple[str, ...]) -> str | None:
    """The first of ``suffixes`` (lower case) that the file name ends with, ignoring case, so that
    IMG.PNG and scan.NII.GZ are recognised; None when it ends with none of them."""
    name = path.name.lower()
    return next((s for s in suffixes if name.endswith(s)), None)


def read_png(path: Path) -> np.ndarray:
    """Decode a PNG to a numpy array, or raise DataError naming the file."""
    image_mod = optional_import("PIL.Image", "reading PNG files")
    try:
        with image_mod.open(path) as im:
            im.load()
            return np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable PNG ({e})") from None


def png_size(path: Path) -> tuple[int, int]:
    """(H, W) from a PNG header only, or raise DataError naming the file."""
    image_mod = optional_import("PIL.Image", "reading PNG files")
    try:
        with image_mod.open(path) as im:
            if im.format != "PNG":
                raise DataError(f"{path}: expected a PNG file, found {im.format}")
            w, h = im.size
            return h, w
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable PNG ({e})") from None


def gray01(path: Path, arr: np.ndarray) -> np.ndarray:
    """A grayscale PNG as float32 in [0, 1]: 8-bit / 255, 16-bit / 65535 (as matplotlib reads it).
    An RGB(A) PNG is accepted when its three colour channels are equal."""
    if arr.ndim == 3:
        if arr.shape[-1] in (3, 4) and np.array_equal(arr[..., 0], arr[..., 1]) \
                and np.array_equal(arr[..., 0], arr[..., 2]):
            arr = arr[..., 0]
        elif arr.shape[-1] == 2:  # grayscale + alpha
            arr = arr[..., 0]
        else:
            raise DataError(f"{path}: expected a grayscale image, got {arr.shape[-1]} differing channels")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.dtype(">u2"), np.int32) and arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.float32) / 65535.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    raise DataError(f"{path}: unsupported PNG pixel type {arr.dtype}")


def binary_mask(path: Path, arr: np.ndarray, where: str = "") -> np.ndarray:
    """A mask as uint8 {0, 1}. Accepted encodings: values within {0, 1}, or within {0, 255}
    (8-bit PNG masks); anything else is a DataError naming the file (and ``where`` inside it)."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and np.array_equal(arr[..., 0], arr[..., 1]) \
            and np.array_equal(arr[..., 0], arr[..., 2]):
        arr = arr[..., 0]
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.number)):
        raise DataError(f"{path}{where}: mask of non-numeric type {arr.dtype}")
    values = np.unique(arr)
    if np.isin(values, (0, 1)).all():
        return (arr != 0).astype(np.uint8)
    if np.isin(values, (0, 255)).all():
        return (arr == 255).astype(np.uint8)
    bad = [v for v in values.tolist() if v not in (0, 1, 255)][:5] or values.tolist()[:5]
    raise DataError(f"{path}{where}: mask values must be 0/1 (or 0/255 in an 8-bit PNG), found {bad}")


def zscore_nonzero(volume: np.ndarray) -> np.ndarray:
    """Per-volume z-score over the nonzero voxels of one MR channel, background kept at 0.

    mu and sigma are the mean and standard deviation of the voxels != 0 (the brain of a
    skull-stripped BraTS volume); those voxels become (v - mu) / sigma, zeros stay 0. Sigma = 0
    (a constant brain) divides by 1; an all-zero channel stays all zero.
    """
    v = volume.astype(np.float32, copy=False)
    brain = v != 0
    out = np.zeros_like(v, dtype=np.float32)
    if brain.any():
        vals = v[brain].astype(np.float64)
        mu, sigma = vals.mean(), vals.std()
        out[brain] = ((vals - mu) / (sigma if sigma > 0 else 1.0)).astype(np.float32)
    return out


# --------------------------------------------------------------------------- dataset base


class AnnotatedSlices(torch.utils.data.Dataset):
    """The item contract shared by LIDC and BraTS.

    ``mode="eval"`` items: ``image`` (C, H, W) float32, ``masks`` (A, H, W) uint8 (every
    annotation), ``name`` (str). ``mode="train"`` items add ``mask`` (1, H, W) float32, the
    annotation ``annotation_index(i)`` drawn for this image in the current epoch: call
    ``set_epoch(epoch)`` at the start of each epoch (as with DistributedSampler) for a fresh draw.
    """

    def __init__(self, mode: str, seed: int):
        self.mode = check_choice("mode", mode, MODES)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.seed = seed
        self.epoch = 0
        self.split_info: dict = {}

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def annotation_index(self, index: int) -> int:
        """Which annotation a mode="train" item ``index`` carries in the current epoch."""
        return draw_annotation(self.seed, self.epoch, index, self.num_annotations)

    num_annotations: int = 1

    def close(self) -> None:
        """Release open file handles (reopened on the next read)."""

    def _check_index(self, index: int) -> int:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} images")
        return index % n

    def _item(self, index: int, image: np.ndarray, masks: np.ndarray, name: str) -> dict:
        item = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.uint8)),
                "name": name}
        if self.mode == "train":
            k = self.annotation_index(index)
            item["mask"] = item["masks"][k:k + 1].float()
        return item
