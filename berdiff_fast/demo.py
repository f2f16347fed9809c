"""``berdiff-fast demo``: BerDiff against a deterministic U-Net on the embedded synthetic lesions.

Both models are the tiny preset's U-Net, trained by the same trainer with the same optimiser,
batch size and learning rate, for the same number of steps: BerDiff trains for half of the time
budget ``minutes``, and the deterministic baseline (``berdiff_fast.baseline``) then takes exactly
as many steps (with a time cap of the other half plus 10%, in case the machine slows down; a
capped run is reported as such, ``comparison.same_budget.baseline_capped``). BerDiff draws k
masks per held-out image; the baseline gives one. Both are scored with the LIDC protocol (``berdiff_fast.evaluate``).

Writes into the output folder: ``metrics.json`` (BerDiff's and the baseline's GED16 - the squared
form, as the paper reports it - HM-IoU16, Soft-Dice16, CIMD scores, the saliency map's
calibration against the annotators' per-pixel frequency, timings, versions), ``demo.png``
(image, annotations, samples, saliency, the baseline's mask), ``model.safetensors`` and
``baseline.safetensors``.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from . import __version__
from .baseline import DeterministicUNet
from .evaluate import GED_FORM, calibration, predict_sets, set_metrics
from .model import BerDiff
from .sampling import sample
from .synthetic import SyntheticLesions
from .train import train

OUTPUTS = ("metrics.json", "demo.png", "model.safetensors", "baseline.safetensors")


def run_demo(out: str | Path = "demo_out", minutes: float = 7.0, train_size: int = 2000, test_size: int = 32,
             k: int = 16, steps: int = 10, seed: int = 0, batch_size: int = 32, lr: float = 5e-4,
             ema_decay: float | None = 0.999, overwrite: bool = False, progress: bool = True) -> dict:
    """Train BerDiff and the baseline within ``minutes`` of training time, evaluate, write the outputs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    targets = [out / n for n in OUTPUTS]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"out: {', '.join(existing)} already exist; pass --overwrite or choose another --out")
    if not minutes > 0:
        raise ValueError(f"minutes: expected a positive training budget, got {minutes!r}")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    # Eval-mode items carry all annotations; the trainer draws one per image per epoch.
    train_set = SyntheticLesions(train_size, seed=seed, mode="eval")
    test_set = SyntheticLesions(test_size, seed=seed + 10_000, mode="eval")
    common = dict(batch_size=batch_size, lr=lr, seed=seed, progress=progress, ema_decay=ema_decay)

    model = BerDiff.from_preset("tiny")
    hist = train(model, train_set, minutes=minutes / 2, **common)
    base = DeterministicUNet.from_preset("tiny")
    base_hist = train(base, train_set, max_steps=hist["steps"], minutes=0.55 * minutes, **common)

    t0 = time.perf_counter()
    # Training may have moved the model to a GPU; the annotations stay on the CPU.
    res = sample(model, test_set.images.to(model.device), steps=steps, k=k, seed=seed, progress=progress).to("cpu")
    sample_s = time.perf_counter() - t0
    base_masks, base_probs = predict_sets(base, test_set.images, k=k)  # its one mask, repeated k times
    base_prob = base_probs[:, 0]

    ann = test_set.annotations
    freq = ann.float().mean(1)
    ours = {key: v.mean().item() for key, v in set_metrics(res.masks, res.probs, ann).items()}
    theirs = {key: v.mean().item() for key, v in set_metrics(base_masks, base_probs, ann).items()}
    ged_key = f"GED{k}"
    calib = calibration(res.saliency, freq)
    result = {
        ged_key: ours[ged_key],
        f"HM-IoU{k}": ours[f"HM-IoU{k}"],
        "ged_form": GED_FORM,
        "berdiff": ours,
        "baseline": theirs,
        "comparison": {
            f"{ged_key}_berdiff": ours[ged_key], f"{ged_key}_baseline": theirs[ged_key],
            "berdiff_lower_ged": ours[ged_key] < theirs[ged_key],
            "same_budget": {"steps": [hist["steps"], base_hist["steps"]],
                            "seconds": [round(hist["seconds"], 1), round(base_hist["seconds"], 1)],
                            "baseline_capped": base_hist["steps"] < hist["steps"]},
        },
        "calibration": {
            "saliency_vs_annotator_frequency": calib,
            "baseline_probability_vs_annotator_frequency": calibration(base_prob, freq),
            "note": "saliency = fraction of the k BerDiff samples marking a pixel; frequency = fraction of "
                    "the 4 annotators marking it; mae/ece over 'active' pixels (marked by either)",
        },
        "saliency_vs_annotator_frequency_mae": calib["mae_active"],
        "k": k, "steps": steps, "sampler": "ddim", "eta": 1.0, "seed": seed,
        "train": {"steps": hist["steps"], "seconds": round(hist["seconds"], 1), "batch_size": batch_size,
                  "lr": lr, "ema_decay": ema_decay, "train_size": train_size,
                  "final_loss_bits": _tail_mean(hist["loss"]),
                  "baseline_steps": base_hist["steps"], "baseline_seconds": round(base_hist["seconds"], 1),
                  "baseline_final_bce_nats": _tail_mean(base_hist["loss"]), "budget_minutes": minutes},
        "sampling_seconds": round(sample_s, 2), "test_size": test_size,
        "data": "berdiff_fast.synthetic (32x32, 4 annotators)",
        "versions": {"berdiff_fast": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "threads": torch.get_num_threads(),
    }
    targets[0].write_text(json.dumps(result, indent=2))
    save_figure(targets[1], test_set.images, ann, res, base_prob > 0.5)
    model.save(targets[2])
    base.save(targets[3])
    return result


def _tail_mean(xs: list[float], n: int = 50) -> float | None:
    return sum(xs[-n:]) / len(xs[-n:]) if xs else None


def save_figure(path: Path, images: torch.Tensor, annotations: torch.Tensor, res, baseline=None,
                rows: int = 4, shown: int = 6) -> None:
    """Rows of: image | annotations | the first samples | saliency (mean of all k samples) | baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = min(rows, images.shape[0])
    m, shown = annotations.shape[1], min(shown, res.masks.shape[1])
    cols = 1 + m + shown + 1 + (baseline is not None)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
    for r in range(rows):
        panels = [(images[r, 0], "gray", "image")]
        panels += [(annotations[r, a], "gray", f"reader {a + 1}") for a in range(m)]
        panels += [(res.masks[r, j], "gray", f"sample {j + 1}") for j in range(shown)]
        panels += [(res.saliency[r], "magma", f"saliency (k={res.masks.shape[1]})")]
        if baseline is not None:
            panels += [(baseline[r], "gray", "deterministic")]
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
