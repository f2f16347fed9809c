"""The paper's evaluation protocol (DESIGN §6) for a BerDiff model or the deterministic baseline.

LIDC (and any multi-annotator set, the synthetic one included): k = 16 samples per image;
GED with the first 16, 8, 4 and 1 of them, HM-IoU16, Soft-Dice16, and CIMD's S_c, D_max, D_a
and CI with all 16. **GED{n} is the squared form**: D^2_GED = 2E[d(S,Y)] - E[d(S,S')] -
E[d(Y,Y')] (``metrics.ged(..., squared=True)``), the quantity the paper (GED16 = 0.238) and the
published LIDC tables report under the name "GED".
BRATS: Dice of the majority vote of the k samples (saliency > 0.5) against the whole-tumour
mask, and Dice of a single sample ("Dice1"), in percent as the paper reports 89.7, each averaged
two ways. ``Dice`` / ``Dice1``: over every slice, a tumour-free slice scoring 100 when nothing is
predicted on it (Dice(empty, empty) = 1), so a model that never predicts tumour still scores
high on a set with many tumour-free slices. ``Dice_nonempty`` / ``Dice1_nonempty``: over the
slices whose target holds tumour only; ``n_empty_target`` counts the others. The paper does not
say which it reports; its 3,991 test images from 125 patients are fewer than the 125 x 49 slices
its slice range keeps (its 55,174 training images are exactly 1,126 x 49), which suggests - an
inference, not a statement of the paper - that it dropped the tumour-free test slices, as
``Dice_nonempty`` does.

The deterministic baseline gives one mask per image; it stands for all k samples (repeated),
so its GED is the same for every n, and its "probability maps" are its sigmoid outputs.
"""
from __future__ import annotations

import platform
import time

import torch

from . import __version__, metrics
from .baseline import DeterministicUNet
from .data._common import mix_seed
from .model import BerDiff
from .sampling import resolve_steps, sample

GED_FORM = ("squared: GED{n} = D^2_GED = 2E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')], d = 1 - IoU "
            "(metrics.ged(..., squared=True)), the quantity the paper and published LIDC tables call GED")
GED_COUNTS = (16, 8, 4, 1)
PROTOCOLS = ("auto", "lidc", "brats")
DICE_FORM = ("percent; Dice = majority vote of the k samples, Dice1 = the first sample. Dice, Dice1: mean over all "
             "slices, a slice with an empty target and an empty prediction scoring 100 (Dice(empty, empty) = 1). "
             "Dice_nonempty, Dice1_nonempty: mean over the slices with a non-empty target only (n_images - "
             "n_empty_target of them; null when there are none). The paper's 3,991 test images from 125 patients, "
             "fewer than 125 x 49, suggest (an inference) that it dropped tumour-free slices: compare with "
             "Dice_nonempty")


def predict_sets(model, images: torch.Tensor, *, k: int = 16, steps: int | None = None, seed: int = 0,
                 eta: float = 1.0, sampler: str = "ddim", max_batch: int = 256, backend: str | None = None,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (B,k,H,W) bool, probs (B,k,H,W) float32) for images (B,C,H,W) on the model's device."""
    images = images.to(model.device)
    if isinstance(model, DeterministicUNet):
        p = model.predict_proba(images).cpu()
        probs = p[:, None].expand(-1, k, -1, -1).contiguous()
        return probs > 0.5, probs
    if not isinstance(model, BerDiff):
        raise ValueError(f"model: expected a BerDiff or DeterministicUNet, got {type(model).__name__}")
    res = sample(model, images, steps=steps, k=k, seed=seed, eta=eta, sampler=sampler, max_batch=max_batch,
                 backend=backend, progress=progress)
    return res.masks.cpu(), res.probs.cpu()


def set_metrics(masks: torch.Tensor, probs: torch.Tensor, annotations: torch.Tensor) -> dict[str, torch.Tensor]:
    """The LIDC protocol's per-image metrics (each (B,) float64) for k samples against M annotations."""
    k = masks.shape[1]
    out = {}
    for n in GED_COUNTS:
        if n <= k:
            out[f"GED{n}"] = metrics.ged(masks[:, :n], annotations, squared=True)
    if k not in GED_COUNTS:
        out[f"GED{k}"] = metrics.ged(masks, annotations, squared=True)
    out[f"HM-IoU{k}"] = metrics.hm_iou(masks, annotations)
    out[f"Soft-Dice{k}"] = metrics.soft_dice(probs, annotations)
    for name, v in metrics.collective_insight(masks, annotations).items():
        out[f"{name}{k}"] = v
    return out


def brats_metrics(masks: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Dice (%) of the majority vote of the k samples and of the first sample, per image."""
    vote = masks.float().mean(1) > 0.5
    t = target[:, 0].bool()
    return {"Dice": 100 * metrics.dice(vote, t), "Dice1": 100 * metrics.dice(masks[:, 0], t)}


def calibration(pred: torch.Tensor, freq: torch.Tensor, bins: int = 10) -> dict:
    """How well a per-pixel foreground probability ``pred`` (B,H,W) follows the annotators'
    per-pixel frequency ``freq`` (B,H,W) (the fraction of annotators marking the pixel).

    Returns ``mae_active`` (mean |pred - freq| over the pixels that either marks), ``ece`` and
    ``ece_active`` (expected calibration error over all / active pixels: pixels grouped by
    pred into the bin {0} and ``bins`` equal bins of (0, 1], the count-weighted mean of
    |mean pred - mean freq| per bin), ``pearson_active`` and the reliability table ``bins``.
    """
    pred, freq = pred.double().flatten(), freq.double().flatten()
    active = (pred > 0) | (freq > 0)
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    idx = torch.where(pred <= 0, torch.zeros_like(pred, dtype=torch.long),
                      torch.bucketize(pred, edges[1:], right=False) + 1).clamp_max(bins)
    table, ece, ece_active = [], 0.0, 0.0
    n, n_active = pred.numel(), int(active.sum())
    for b in range(bins + 1):
        sel = idx == b
        count = int(sel.sum())
        if not count:
            continue
        mp, mf = pred[sel].mean().item(), freq[sel].mean().item()
        lo, hi = (0.0, 0.0) if b == 0 else (edges[b - 1].item(), edges[b].item())
        table.append({"range": [round(lo, 3), round(hi, 3)], "pixels": count, "mean_pred": mp, "mean_freq": mf})
        ece += count / n * abs(mp - mf)
        sel_a = sel & active
        if sel_a.any():
            ece_active += int(sel_a.sum()) / n_active * abs(pred[sel_a].mean().item() - freq[sel_a].mean().item())
    pa, fa = pred[active], freq[active]
    pearson = float(torch.corrcoef(torch.stack([pa, fa]))[0, 1]) if n_active > 1 and pa.std() > 0 and fa.std() > 0 \
        else None
    return {"mae_active": (pa - fa).abs().mean().item() if n_active else 0.0, "ece": ece,
            "ece_active": ece_active if n_active else 0.0, "pearson_active": pearson,
            "active_pixels": n_active, "bins": table}


def _protocol(dataset, protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: unknown {protocol!r}; expected one of {PROTOCOLS}")
    if protocol != "auto":
        return protocol
    info = getattr(dataset, "split_info", {}) or {}
    return "brats" if str(info.get("dataset", "")).upper().startswith("BRATS") else "lidc"


def evaluate(model, dataset, *, protocol: str = "auto", k: int = 16, steps: int | None = None, seed: int = 0,
             eta: float = 1.0, sampler: str = "ddim", batch: int = 8, limit: int | None = None,
             max_batch: int = 256, backend: str | None = None, per_image: bool = False,
             progress: bool = True) -> dict:
    """Run the protocol over ``dataset`` (items with ``image`` and ``masks``); returns a JSON-ready dict.

    Images are processed ``batch`` at a time; chunk c samples with seed mix_seed(seed, c), so the
    result does not depend on the device or backend (the shared Philox stream) but does on ``batch``.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch: expected a positive int, got {batch!r}")
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n == 0:
        raise ValueError("dataset: is empty (nothing to evaluate)")
    proto = _protocol(dataset, protocol)
    per: dict[str, list[torch.Tensor]] = {}
    names: list[str] = []
    calib_pred, calib_freq, empty_target = [], [], []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n, desc="evaluating", unit="image")
    for c, lo in enumerate(range(0, n, batch)):
        items = [dataset[i] for i in range(lo, min(lo + batch, n))]
        images = torch.stack([it["image"] for it in items])
        ann = torch.stack([it["masks"] for it in items]).bool()
        names += [str(it.get("name", lo + j)) for j, it in enumerate(items)]
        masks, probs = predict_sets(model, images, k=k, steps=steps, seed=mix_seed(seed, c), eta=eta,
                                    sampler=sampler, max_batch=max_batch, backend=backend)
        m = brats_metrics(masks, ann) if proto == "brats" else set_metrics(masks, probs, ann)
        for key, v in m.items():
            per.setdefault(key, []).append(v.cpu())
        calib_pred.append(masks.float().mean(1) if isinstance(model, BerDiff) else probs[:, 0])
        calib_freq.append(ann.float().mean(1))
        empty_target.append(~ann.flatten(1).any(1))
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()
    per_t = {key: torch.cat(v) for key, v in per.items()}
    result = {
        "protocol": proto,
        "metrics": {key: v.mean().item() for key, v in per_t.items()},
        "std": {key: v.std().item() if len(v) > 1 else 0.0 for key, v in per_t.items()},
        "n_images": n,
        "k": k,
        "sampler": {"name": sampler, "steps": resolve_steps(steps, sampler, model.schedule.T), "eta": eta,
                    "seed": seed, "batch": batch}
        if isinstance(model, BerDiff) else "deterministic (one mask per image, repeated k times)",
        "model": model.config,
        "split_info": getattr(dataset, "split_info", {}) or {},
        "seconds": round(time.perf_counter() - t0, 2),
        "versions": {"berdiff_fast": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    if proto == "lidc":
        result["ged_form"] = GED_FORM
        result["calibration"] = calibration(torch.cat(calib_pred), torch.cat(calib_freq))
        result["calibration"]["of"] = ("saliency (mean of the k sample masks)" if isinstance(model, BerDiff)
                                       else "sigmoid probability map") + " vs the annotators' per-pixel frequency"
    else:
        empty = torch.cat(empty_target)
        for key in ("Dice", "Dice1"):
            v = per_t[key][~empty]
            result["metrics"][f"{key}_nonempty"] = v.mean().item() if len(v) else None
            result["std"][f"{key}_nonempty"] = v.std().item() if len(v) > 1 else 0.0
        result["n_empty_target"] = int(empty.sum())
        result["dice_form"] = DICE_FORM
    if per_image:
        result["per_image"] = [{"name": nm, **{key: v[i].item() for key, v in per_t.items()}}
                               for i, nm in enumerate(names)]
        if proto == "brats":
            for entry, e in zip(result["per_image"], empty.tolist()):
                entry["target_empty"] = e
    return result
