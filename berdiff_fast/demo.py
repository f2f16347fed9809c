"""``berdiff-fast demo``: train the tiny model on the embedded synthetic lesions, sample, evaluate.

Writes into the output folder: ``metrics.json`` (GED and HM-IoU with k samples, timings,
versions), ``demo.png`` (image, annotations, samples, saliency) and ``model.safetensors``.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from . import __version__, metrics
from .model import BerDiff
from .sampling import sample
from .synthetic import SyntheticLesions
from .train import train


def run_demo(out: str | Path = "demo_out", minutes: float = 7.0, train_size: int = 2000, test_size: int = 32,
             k: int = 16, steps: int = 20, seed: int = 0, batch_size: int = 32, lr: float = 5e-4,
             overwrite: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    targets = [out / n for n in ("metrics.json", "demo.png", "model.safetensors")]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"out: {', '.join(existing)} already exist; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    train_set = SyntheticLesions(train_size, seed=seed, mode="train")
    test_set = SyntheticLesions(test_size, seed=seed + 10_000, mode="eval")
    model = BerDiff.from_preset("tiny")
    hist = train(model, train_set, minutes=minutes, batch_size=batch_size, lr=lr, seed=seed, progress=progress)

    t0 = time.perf_counter()
    res = sample(model, test_set.images, steps=steps, k=k, seed=seed, progress=progress)
    sample_s = time.perf_counter() - t0
    ann = test_set.annotations
    ged = metrics.ged(res.masks, ann)
    hm = metrics.hm_iou(res.masks, ann)
    # Calibration of the saliency map: how closely the fraction of samples marking a pixel
    # follows the fraction of annotators marking it (over pixels either marks at all).
    freq = ann.float().mean(1)
    active = (freq > 0) | (res.saliency > 0)
    calib_mae = (res.saliency - freq).abs()[active].mean().item() if active.any() else 0.0

    result = {
        f"GED{k}": ged.mean().item(),
        f"HM-IoU{k}": hm.mean().item(),
        "saliency_vs_annotator_frequency_mae": calib_mae,
        "k": k, "steps": steps, "sampler": "ddim", "eta": 1.0, "seed": seed,
        "train": {"steps": hist["steps"], "seconds": round(hist["seconds"], 1), "batch_size": batch_size,
                  "lr": lr, "train_size": train_size, "final_loss_bits": _tail_mean(hist["loss"])},
        "sampling_seconds": round(sample_s, 2), "test_size": test_size,
        "data": "berdiff_fast.synthetic (32x32, 4 annotators)",
        "versions": {"berdiff_fast": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
    }
    targets[0].write_text(json.dumps(result, indent=2))
    save_figure(targets[1], test_set.images, ann, res)
    model.save(targets[2])
    return result


def _tail_mean(xs: list[float], n: int = 50) -> float | None:
    return sum(xs[-n:]) / len(xs[-n:]) if xs else None


def save_figure(path: Path, images: torch.Tensor, annotations: torch.Tensor, res, rows: int = 4, shown: int = 6) -> None:
    """Rows of: image | annotations | the first samples | saliency (mean of all k samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, images.shape[0])
    m, shown = annotations.shape[1], min(shown, res.masks.shape[1])
    cols = 1 + m + shown + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
    for r in range(rows):
        panels = [(images[r, 0], "gray", "image")]
        panels += [(annotations[r, a], "gray", f"reader {a + 1}") for a in range(m)]
        panels += [(res.masks[r, j], "gray", f"sample {j + 1}") for j in range(shown)]
        panels += [(res.saliency[r], "magma", f"saliency (k={res.masks.shape[1]})")]
        for c, (img, cmap, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img.float().cpu().numpy(), cmap=cmap, vmin=None if c == 0 else 0, vmax=None if c == 0 else 1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
