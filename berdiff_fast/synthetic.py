"""The embedded default data: synthetic ambiguous lesions with disagreeing annotators.

Each image holds one lesion whose intensity fades out over a boundary zone of random width,
on a smooth textured background with noise. Annotators disagree the way radiologists do on
LIDC nodules: each draws the boundary at a personal level of the fading profile (one
conservative, two moderate, one liberal reader, each with per-image jitter), and faint lesions
are missed altogether by some readers. Wide, faint boundaries make the annotations disagree a
lot; sharp, bright ones make them agree. Everything is a deterministic function of the seed.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

# Boundary level of each annotator on the lesion profile (0 = everything, 1 = only the core).
READER_LEVELS = (0.7, 0.55, 0.45, 0.3)


def _smooth_field(n: int, size: int, g: torch.Generator, scale: int = 4) -> torch.Tensor:
    coarse = torch.randn(n, 1, scale, scale, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def make_synthetic(n: int, size: int = 32, annotators: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, 1, size, size) float32 and their annotations (n, annotators, size, size) bool."""
    if n < 1 or size < 8 or annotators < 1:
        raise ValueError(f"make_synthetic: need n >= 1, size >= 8, annotators >= 1; got {n}, {size}, {annotators}")
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731

    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centre = size * (0.3 + 0.4 * u(n, 2))
    radius = size * (0.08 + 0.14 * u(n, 1, 1))
    width = 0.6 + 2.4 * u(n, 1, 1)  # boundary fuzziness in pixels
    contrast = 0.35 + 0.9 * u(n, 1, 1)
    # Irregular outline: radius modulated by low harmonics of the polar angle.
    dy, dx = yy - centre[:, 0, None, None], xx - centre[:, 1, None, None]
    dist, angle = torch.sqrt(dy ** 2 + dx ** 2), torch.atan2(dy, dx)
    harm = 0.18 * u(n, 3, 1, 1) * torch.cos(torch.arange(2, 5)[None, :, None, None] * angle[:, None]
                                           + 2 * math.pi * u(n, 3, 1, 1))
    r_eff = radius * (1 + harm.sum(1))
    profile = torch.sigmoid((r_eff - dist) / width)  # 1 inside, fading to 0 outside

    background = 0.25 * _smooth_field(n, size, g)[:, 0] + 0.1 * _smooth_field(n, size, g, scale=8)[:, 0]
    noise = 0.12 * torch.randn(n, size, size, generator=g)
    images = (background + contrast * profile + noise).unsqueeze(1).float()

    levels = torch.tensor([READER_LEVELS[a % len(READER_LEVELS)] for a in range(annotators)])
    levels = (levels[None, :] + 0.12 * (u(n, annotators) - 0.5)).clamp(0.05, 0.95)
    masks = profile[:, None] > levels[:, :, None, None]
    # Faint lesions are missed by some readers: the fainter, the likelier.
    p_miss = (0.8 - contrast.view(n, 1)).clamp(0.0, 0.5)
    missed = u(n, annotators) < p_miss
    # Never let every reader skip a lesion: reader 0 keeps it when the others all do. That is not
    # a guarantee of a mark: a reader's level can lie above a small, fuzzy lesion's peak
    # profile, so an image can still have four empty annotations (2 of the 2000 training images of
    # `berdiff-fast demo`). Left as it is: forcing a mark would change the demo's data.
    missed[:, 0] &= ~missed[:, 1:].all(1)
    masks &= ~missed[:, :, None, None]
    return images, masks


class SyntheticLesions(Dataset):
    """A data set of synthetic ambiguous lesions, items shaped like the LIDC/BRATS loaders'.

    mode "eval": {"image": (1,H,W) float32, "masks": (A,H,W) uint8}
    mode "train": also "mask": (1,H,W) float32, one annotation drawn at random per access.
    """

    def __init__(self, n: int, size: int = 32, annotators: int = 4, seed: int = 0, mode: str = "train"):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode: expected 'train' or 'eval', got {mode!r}")
        self.images, self.annotations = make_synthetic(n, size, annotators, seed)
        self.mode = mode
        self._g = torch.Generator().manual_seed(seed + 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"image": self.images[i], "masks": self.annotations[i].to(torch.uint8)}
        if self.mode == "train":
            a = int(torch.randint(0, self.annotations.shape[1], (1,), generator=self._g))
            item["mask"] = self.annotations[i, a : a + 1].float()
        return item
