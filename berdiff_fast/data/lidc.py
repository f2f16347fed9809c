"""LIDC-IDRI 128 x 128 crops with four annotations per image, in its three public forms (DESIGN §5).

``LIDC(path)`` recognises the form from the path:

- **DeepMind lidc_crops PNG folders** (the released BerDiff test script reads these): a root with
  split folders ``<root>/<split>/images/<patient>/z-<z>_c<n>.png`` and
  ``<root>/<split>/gt/<patient>/z-<z>_c<n>_l{0..3}.png``, 180 x 180, centre-cropped [26:-26] to
  128. The patient-level split is the released one (the split folder). Pixels are read as
  matplotlib reads a PNG (8-bit / 255), the released script's input; masks may be 0/1 or 0/255.
- **Probabilistic U-Net PyTorch port pickle** (``data_lidc.pickle``, or a folder of ``.pickle``
  files, merged as the port merges them): a dict keyed ``<patient>_<slice>`` whose values hold
  'image' (128 x 128 in [0, 1]), 'masks' (list of 4 binary 128 x 128) and 'series_uid'. The file
  (over 2 GB) is read in chunks under 2**31 bytes into one buffer before unpickling, and the
  unpickler only accepts numpy arrays and plain containers. The file has no split: patients are
  assigned by ``assign_split`` on the patient id (``LIDC-IDRI-<digits>`` where the key holds one,
  else the key up to its last '_') with fractions 0.70 / 0.15 / 0.15, close to the released PNG
  split (8843 / 1993 / 1980 images).
- **PHiSeg HDF5** (``data_lidc.hdf5``): groups train / val / test, each with 'images' (N, 128, 128)
  holding image - 0.5, 'labels' (N, 128, 128, 4) uint8 and 'uids'. Images are shifted back by
  + 0.5, so every form delivers images in [0, 1]. The split is the released group.

Shapes and annotation counts are checked when the data set is built (before any training);
mask values (and an HDF5 image's range) are checked when a PNG or HDF5 image is read (the pickle
is checked whole at build).
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np

from ._common import (SPLITS, AnnotatedSlices, DataError, assign_split, binary_mask, centre_crop,
                      check_choice, check_crop, check_fractions, check_path, gray01, optional_import,
                      png_size, read_png, split_rule, suffix_of)

PICKLE_FRACTIONS = (0.70, 0.15, 0.15)
PICKLE_READ_CHUNK = 2**30  # bytes per read(): a single read of 2**31 bytes or more fails on some platforms
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
FORMATS = ("lidc_crops_png", "probunet_pickle", "phiseg_hdf5")
PICKLE_SUFFIXES = (".pickle", ".pkl")
HDF5_SUFFIXES = (".hdf5", ".h5")


def _check_unit_range(path, where: str, image: np.ndarray, stored: str = "") -> None:
    """Every form must deliver images in [0, 1]; a file in another convention would otherwise
    train and evaluate on shifted intensities without a word."""
    if not np.isfinite(image).all():
        raise DataError(f"{path}{where}: 'image' holds NaN or inf")
    if image.min() < 0 or image.max() > 1:
        raise DataError(f"{path}{where}: 'image' values must lie in [0, 1]{stored}, found "
                        f"[{float(image.min()):g}, {float(image.max()):g}]")


def detect_format(path: Path) -> tuple[str, Path | list[Path]]:
    """(format, source) for a LIDC path; see the module docstring for the recognised layouts."""
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(8)
        if head == HDF5_SIGNATURE:
            return "phiseg_hdf5", path
        if suffix_of(path, PICKLE_SUFFIXES) or head[:1] == b"\x80":
            return "probunet_pickle", [path]
        raise DataError(f"{path}: not a LIDC file this library reads (expected a .pickle from the "
                        f"Probabilistic U-Net port or a PHiSeg .hdf5)")
    if any((path / s / "images").is_dir() for s in SPLITS):
        return "lidc_crops_png", path
    pickles = sorted(p for p in path.iterdir() if suffix_of(p, PICKLE_SUFFIXES) and p.is_file())
    if pickles:
        return "probunet_pickle", pickles
    hdf5 = sorted(p for p in path.iterdir() if suffix_of(p, HDF5_SUFFIXES) and p.is_file())
    if len(hdf5) == 1:
        return "phiseg_hdf5", hdf5[0]
    if len(hdf5) > 1:
        raise DataError(f"{path}: several HDF5 files ({', '.join(p.name for p in hdf5)}); pass one of them")
    raise DataError(f"{path}: no LIDC data recognised. Expected one of: split folders "
                    f"<path>/<train|val|test>/images/<patient>/*.png with gt/ beside images/ (lidc_crops); "
                    f"a .pickle file or a folder of them (Probabilistic U-Net port); a PHiSeg .hdf5 file")


# --------------------------------------------------------------------------- readers
# Each reader lists its images at construction (checking shapes and annotation counts) and
# returns (image (H, W) float32 in [0, 1], masks (A, H, W) uint8, name) from load(i).


class _PngReader:
    def __init__(self, root: Path, split: str, annotations: int, crop: int | None):
        self.split_dir = root / split
        images_dir, gt_dir = self.split_dir / "images", self.split_dir / "gt"
        if not images_dir.is_dir():
            found = [s for s in SPLITS if (root / s / "images").is_dir()]
            raise FileNotFoundError(f"{images_dir}: no such folder (split {split!r} is missing; "
                                    f"found splits: {', '.join(found) or 'none'})")
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"{gt_dir}: no such folder (the annotations of split {split!r})")
        self.items: list[tuple[Path, list[Path], str]] = []
        patients = sorted(p for p in images_dir.iterdir() if p.is_dir())
        size = None
        pattern = re.compile(r"^(?P<stem>.+)_l(?P<k>\d+)\.png$")
        for patient in patients:
            gt_patient = gt_dir / patient.name
            gt_files: dict[str, dict[int, Path]] = {}
            if gt_patient.is_dir():
                for g in gt_patient.iterdir():
                    m = pattern.match(g.name)
                    if m:
                        gt_files.setdefault(m["stem"], {})[int(m["k"])] = g
            for img in sorted(patient.glob("*.png")):
                have = gt_files.get(img.stem, {})
                for k in range(annotations):
                    if k not in have:
                        raise FileNotFoundError(f"{gt_patient / f'{img.stem}_l{k}.png'}: no such file "
                                                f"(annotation {k} of {img})")
                if len(have) != annotations:
                    raise DataError(f"{img}: {len(have)} annotation files ({', '.join(sorted(p.name for p in have.values()))}), "
                                    f"expected {annotations}")
                masks = [have[k] for k in range(annotations)]
                hw = png_size(img)
                if size is None:
                    size = hw
                    if crop is not None and (hw[0] < crop or hw[1] < crop):
                        raise DataError(f"{img}: image of {hw[0]}x{hw[1]} is smaller than the crop {crop}x{crop}")
                elif hw != size:
                    raise DataError(f"{img}: image of {hw[0]}x{hw[1]}, but the others are {size[0]}x{size[1]}")
                for mpath in masks:
                    if png_size(mpath) != hw:
                        mh, mw = png_size(mpath)
                        raise DataError(f"{mpath}: mask of {mh}x{mw}, but its image is {hw[0]}x{hw[1]}")
                self.items.append((img, masks, f"{patient.name}/{img.stem}"))
        if not self.items:
            raise DataError(f"{images_dir}: no PNG images found (expected <patient>/z-<z>_c<n>.png)")
        self.patients = sorted({name.split("/")[0] for _, _, name in self.items})
        self.rule = f"released patient-level split (the {split}/ folder of lidc_crops)"

    def __len__(self):
        return len(self.items)

    def load(self, i: int):
        img, masks, name = self.items[i]
        image = gray01(img, read_png(img))
        if image.ndim != 2:
            raise DataError(f"{img}: expected a 2-D grayscale image, got shape {image.shape}")
        m = np.stack([binary_mask(p, read_png(p)) for p in masks])
        if m.ndim != 3:
            raise DataError(f"{masks[0]}: expected 2-D masks, got shape {m.shape[1:]}")
        return image, m, name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only: a pickle can run arbitrary code, and a
    data file never needs to."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (only numpy arrays "
                                         f"and plain containers are allowed in a data file)")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def read_pickle_chunked(path, chunk: int = PICKLE_READ_CHUNK):
    """Unpickle a file read into one buffer by read() calls of at most ``chunk`` bytes (2**30 by
    default: a single read of 2**31 bytes or more fails on some platforms). Only numpy arrays and
    plain containers are accepted; a corrupt, truncated or foreign pickle is a DataError naming
    the file."""
    path = Path(path)
    if not 0 < chunk < 2**31:
        raise ValueError(f"chunk: expected a size in 1 .. 2**31 - 1 bytes, got {chunk}")
    size = os.path.getsize(path)
    buf = bytearray(size)
    view = memoryview(buf)
    pos = 0
    with open(path, "rb") as f:
        while pos < size:
            n = f.readinto(view[pos:pos + chunk])
            if not n:
                raise DataError(f"{path}: file shorter than its size ({pos} of {size} bytes read)")
            pos += n
    try:
        # latin1 lets numpy arrays pickled under Python 2 load (numpy's documented setting).
        return _RestrictedUnpickler(_BufferReader(buf), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, ImportError, MemoryError) as e:
        raise DataError(f"{path}: corrupt or unreadable pickle ({type(e).__name__}: {e})") from None


class _BufferReader:
    """A read-only file over one bytearray, so unpickling does not copy the (2 GB) buffer."""

    def __init__(self, buf: bytearray):
        self.buf, self.view, self.pos = buf, memoryview(buf), 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.buf) if n is None or n < 0 else min(self.pos + n, len(self.buf))
        out = bytes(self.view[self.pos:end])
        self.pos = end
        return out

    def readinto(self, b) -> int:
        n = min(len(b), len(self.buf) - self.pos)
        b[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def readline(self) -> bytes:
        end = self.buf.find(b"\n", self.pos)
        return self.read((len(self.buf) if end < 0 else end + 1) - self.pos)


_PATIENT_RE = re.compile(r"LIDC-IDRI-\d+")


def patient_of_key(key: str) -> str:
    """The patient of a pickle key ``<patient>_<slice>``: the ``LIDC-IDRI-<digits>`` it holds, else
    the key up to its last '_'."""
    m = _PATIENT_RE.search(key)
    if m:
        return m.group(0)
    return key.rsplit("_", 1)[0] if "_" in key else key


class _PickleReader:
    def __init__(self, files: list[Path], split: str, annotations: int, crop: int | None,
                 fractions: tuple[float, float, float]):
        data: dict = {}
        origin: dict = {}
        for path in files:
            d = read_pickle_chunked(path)
            if not isinstance(d, dict):
                raise DataError(f"{path}: expected a dict keyed <patient>_<slice>, got {type(d).__name__}")
            for k in d:
                origin[k] = path
            data.update(d)
        if not data:
            raise DataError(f"{', '.join(map(str, files))}: the pickle holds no images")
        self.images, self.masks, self.names, self.series_uids = [], [], [], []
        size = None
        for key in sorted(data, key=str):
            path, where = origin[key], f" [{key!r}]"
            value = data[key]
            if not isinstance(value, dict) or not {"image", "masks"} <= set(value):
                raise DataError(f"{path}{where}: expected a dict with 'image', 'masks' and 'series_uid'")
            image = np.asarray(value["image"])
            if image.ndim != 2 or not np.issubdtype(image.dtype, np.number):
                raise DataError(f"{path}{where}: 'image' must be a 2-D numeric array, got {image.dtype} {image.shape}")
            if size is None:
                size = image.shape
                if crop is not None and (size[0] < crop or size[1] < crop):
                    raise DataError(f"{path}{where}: image of {size[0]}x{size[1]} is smaller than the crop {crop}x{crop}")
            elif image.shape != size:
                raise DataError(f"{path}{where}: image of {image.shape[0]}x{image.shape[1]}, but the others are "
                                f"{size[0]}x{size[1]}")
            _check_unit_range(path, where, image)
            masks = value["masks"]
            if len(masks) != annotations:
                raise DataError(f"{path}{where}: {len(masks)} masks, expected {annotations}")
            masks = np.stack([np.asarray(m) for m in masks]) if isinstance(masks, (list, tuple)) else np.asarray(masks)
            if masks.shape[1:] != size:
                raise DataError(f"{path}{where}: masks of shape {masks.shape[1:]}, but the image is {size}")
            masks = binary_mask(path, masks, where)
            patient = patient_of_key(str(key))
            if assign_split(patient, fractions) != split:
                continue
            self.images.append(image.astype(np.float32))
            self.masks.append(masks)
            self.names.append(str(key))
            self.series_uids.append(str(value.get("series_uid", "")))
        if not self.images:
            raise DataError(f"{', '.join(map(str, files))}: split {split!r} is empty under the rule "
                            f"{split_rule('patient', fractions)!r}")
        self.patients = sorted({patient_of_key(k) for k in self.names})
        self.rule = (split_rule("patient", fractions) + "; patient_id = the 'LIDC-IDRI-<digits>' in the key, "
                     "else the key up to its last '_'")

    def __len__(self):
        return len(self.images)

    def load(self, i: int):
        return self.images[i], self.masks[i], self.names[i]


class _Hdf5Reader:
    STORED = " after the + 0.5 shift (PHiSeg stores image - 0.5, so the file must hold [-0.5, 0.5])"

    def __init__(self, path: Path, split: str, annotations: int, crop: int | None):
        h5py = optional_import("h5py", "reading PHiSeg HDF5 files")
        self.path = path
        self._file = None
        self._pid = None
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
        with f:
            if split not in f:
                raise DataError(f"{path}: no group {split!r} (groups: {', '.join(sorted(f.keys())) or 'none'})")
            g = f[split]
            for name in ("images", "labels"):
                if name not in g:
                    raise DataError(f"{path}: group {split!r} has no dataset {name!r}")
            images, labels = g["images"], g["labels"]
            if images.ndim != 3:
                raise DataError(f"{path}: {split}/images must be (N, H, W), got shape {images.shape}")
            if labels.ndim != 4 or labels.shape[:3] != images.shape:
                raise DataError(f"{path}: {split}/labels must be (N, H, W, A) matching images {images.shape}, "
                                f"got {labels.shape}")
            if labels.shape[3] != annotations:
                raise DataError(f"{path}: {split}/labels holds {labels.shape[3]} annotations per image, "
                                f"expected {annotations}")
            n, h, w = images.shape
            if n == 0:
                raise DataError(f"{path}: split {split!r} is empty")
            if crop is not None and (h < crop or w < crop):
                raise DataError(f"{path}: images of {h}x{w} are smaller than the crop {crop}x{crop}")
            # The first image now (a file in another convention fails before any training);
            # every image again when it is read, at the cost of a min and a max.
            _check_unit_range(path, f" [{split}/images[0]]",
                              np.asarray(images[0], dtype=np.float32) + np.float32(0.5), self.STORED)
            if "uids" in g:
                uids = [u.decode() if isinstance(u, bytes) else str(u) for u in g["uids"][()].tolist()]
                if len(uids) != n:
                    raise DataError(f"{path}: {split}/uids has {len(uids)} entries for {n} images")
            else:
                uids = [f"{split}_{i}" for i in range(n)]
        self.n = n
        self.split = split
        self.names = [f"{i:05d}_{u}" for i, u in enumerate(uids)]
        self.uids = uids
        self.rule = f"released split (the {split!r} group of the PHiSeg HDF5 file)"

    def __len__(self):
        return self.n

    def _group(self):
        # h5py handles do not survive fork or pickling: open once per process, on first use.
        if self._file is None or self._pid != os.getpid():
            import h5py
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[self.split]

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = None
        return state

    def load(self, i: int):
        g = self._group()
        try:
            image = np.asarray(g["images"][i], dtype=np.float32) + np.float32(0.5)  # stored as image - 0.5
            labels = np.asarray(g["labels"][i])
        except OSError as e:
            raise DataError(f"{self.path}: cannot read image {i} of {self.split!r} ({e})") from None
        _check_unit_range(self.path, f" [{self.split}/images[{i}]]", image, self.STORED)
        masks = binary_mask(self.path, np.moveaxis(labels, -1, 0), f" [{self.split}/labels[{i}]]")
        return image, masks, self.names[i]


# --------------------------------------------------------------------------- the data set


class LIDC(AnnotatedSlices):
    """LIDC-IDRI crops with all annotations, from any of the three public forms.

    Args:
        path: a lidc_crops root (holding train/ val/ test/), a Probabilistic U-Net port pickle
            (or a folder of them), or a PHiSeg HDF5 file (or a folder holding one).
        split: "train", "val" or "test".
        mode: "train" (items also carry ``mask``, one annotation drawn per image per epoch) or
            "eval" (``image``, ``masks``, ``name`` only).
        crop: side of the centre crop (128: 180 x 180 lidc_crops become [26:-26]); None keeps the
            stored size. Images smaller than the crop are an error.
        seed: seeds the annotation draw (see ``set_epoch`` and ``annotation_index``).
        annotations: annotations per image the data must hold (4 for LIDC).
        fractions: (train, val, test) fractions of the patient-level hash split, used for the
            pickle form only (the others carry their released split).

    Items: ``image`` (1, crop, crop) float32 in [0, 1]; ``masks`` (A, crop, crop) uint8 {0, 1};
    ``name``; and in mode="train" ``mask`` (1, crop, crop) float32. ``split_info`` describes the
    split for recording with every result.
    """

    def __init__(self, path, split: str = "train", mode: str = "train", crop: int | None = 128, *,
                 seed: int = 0, annotations: int = 4, fractions=PICKLE_FRACTIONS):
        super().__init__(mode, seed)
        self.split = check_choice("split", split, SPLITS)
        self.crop = check_crop(crop)
        if isinstance(annotations, bool) or not isinstance(annotations, int) or annotations < 1:
            raise ValueError(f"annotations: expected a positive int, got {annotations!r}")
        fractions = check_fractions(fractions)
        path = check_path(path)
        self.format, source = detect_format(path)
        if self.format == "lidc_crops_png":
            self._reader = _PngReader(source, split, annotations, self.crop)
            patients = len(self._reader.patients)
        elif self.format == "probunet_pickle":
            self._reader = _PickleReader(source, split, annotations, self.crop, fractions)
            patients = len(self._reader.patients)
        else:
            self._reader = _Hdf5Reader(source, split, annotations, self.crop)
            patients = None
        self.num_annotations = annotations
        self.split_info = {
            "dataset": "LIDC-IDRI",
            "format": self.format,
            "path": str(path.resolve()),
            "split": split,
            "n_images": len(self._reader),
            "n_patients": patients,
            "annotations": annotations,
            "crop": self.crop,
            "rule": self._reader.rule,
        }
        if self.format == "phiseg_hdf5":
            self.split_info["n_uids"] = len(set(self._reader.uids))

    def __len__(self) -> int:
        return len(self._reader)

    def close(self) -> None:
        """Close the HDF5 file handle, if one is open (it reopens on the next read)."""
        if isinstance(self._reader, _Hdf5Reader):
            self._reader.close()

    @property
    def names(self) -> list[str]:
        if isinstance(self._reader, _PngReader):
            return [name for _, _, name in self._reader.items]
        return list(self._reader.names)

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        image, masks, name = self._reader.load(index)
        if image.shape != masks.shape[1:]:
            raise DataError(f"{name}: image of shape {image.shape} but masks of {masks.shape[1:]}")
        image = centre_crop(image, self.crop)[None]
        masks = centre_crop(masks, self.crop)
        return self._item(index, image, masks, name)
