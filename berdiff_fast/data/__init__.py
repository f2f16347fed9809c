"""Data sets (DESIGN §5): LIDC-IDRI in its three public forms, BRATS 2021, plain inference inputs.

Each data set item is a dict: ``image`` (C, H, W) float32, ``masks`` (A, H, W) uint8 (all
annotations), ``name``; in ``mode="train"`` also ``mask`` (1, H, W) float32, one annotation drawn
per image per epoch (``set_epoch``). ``dataset.split_info`` describes the split used, to be
recorded with every result. pillow, h5py and nibabel are imported only when a format needs them
(``pip install 'berdiff-fast[data]'``).
"""
from ._common import DataError, assign_split, draw_annotation, zscore_nonzero
from .brats import BraTS
from .inputs import load_inputs
from .lidc import LIDC, detect_format, patient_of_key, read_pickle_chunked

__all__ = ["LIDC", "BraTS", "load_inputs", "DataError", "assign_split", "draw_annotation",
           "zscore_nonzero", "detect_format", "patient_of_key", "read_pickle_chunked"]
