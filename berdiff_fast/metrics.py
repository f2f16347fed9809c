"""Evaluation metrics for sets of binary segmentations (DESIGN §6), batched in torch.

Shapes: ``samples`` (B, N, H, W) and ``annotations`` (B, M, H, W), N and M >= 1 and independent
of each other; every metric returns a float64 tensor of shape (B,) on the inputs' device (the
CIMD metrics return a dict of such tensors). The work is batched over images, samples,
annotations and pixels; the only Python loop is the per-image Hungarian assignment of
``hm_iou`` (scipy works on one matrix at a time).

Inputs. Annotations must be binary: bool, or any dtype holding only 0 and 1. Samples may also
be float probability maps with values in [0, 1]; those are thresholded at 0.5 (``p > 0.5``, as
the released BerDiff evaluation does), so a float {0, 1} mask is read unchanged. Anything else
is a ValueError naming the argument.

Distances. d(a, b) = 1 - IoU(a, b), with IoU(empty, empty) = 1 (two empty masks agree
perfectly, so their distance is 0). Dice(empty, empty) = 1 for the same reason.

GED. DESIGN §6 writes the generalised energy distance as a square,

    GED^2 = D^2_GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')],

each expectation over all ordered pairs, self-pairs included (the N^2 estimator). ``ged``
returns GED = sqrt(max(GED^2, 0)) by default and GED^2 with ``squared=True``. The published
LIDC tables, the BerDiff paper's included (GED16 = 0.238), report the value of the D^2 formula
under the name "GED": compare those with ``ged(..., squared=True)``.
"""
from __future__ import annotations

import math

import torch

from . import _checks

__all__ = [
    "pairwise_iou",
    "ged",
    "hm_iou",
    "soft_dice",
    "dice",
    "combined_sensitivity",
    "max_dice_matching",
    "diversity_agreement",
    "collective_insight",
    "SOFT_DICE_THRESHOLDS",
    "SOFT_DICE_SMOOTH",
]

SOFT_DICE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
SOFT_DICE_SMOOTH = 1e-6
SAMPLE_THRESHOLD = 0.5


# --------------------------------------------------------------------------- input checks


def _binary_masks(name: str, x, *, ndim: int, allow_prob: bool) -> torch.Tensor:
    """Validate one mask tensor and return it as bool (thresholding a float probability map)."""
    _checks.tensor(name, x, ndim=ndim)
    if x.dtype == torch.bool:
        return x
    if x.is_complex():
        raise ValueError(f"{name}: expected a bool, integer or float mask, got {x.dtype}")
    if x.is_floating_point() and allow_prob:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: contains NaN or inf")
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"{name}: expected a binary mask or probabilities in [0, 1], "
                             f"got values in [{float(x.min())}, {float(x.max())}]")
        return x > SAMPLE_THRESHOLD
    if not bool(((x == 0) | (x == 1)).all()):
        hint = " (threshold probability maps first, e.g. p > 0.5)" if x.is_floating_point() else ""
        raise ValueError(f"{name}: expected a binary mask (values 0 and 1 only){hint}")
    return x != 0


def _check_sets(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    """Shape and device checks for two (B, K, H, W) sets that are compared with each other."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{a_name} and {b_name}: batch sizes differ, {a.shape[0]} vs {b.shape[0]} "
                         f"(shapes {tuple(a.shape)} and {tuple(b.shape)})")
    if a.shape[2:] != b.shape[2:]:
        raise ValueError(f"{a_name} and {b_name}: spatial sizes differ, {tuple(a.shape[2:])} vs "
                         f"{tuple(b.shape[2:])}")
    for name, x in ((a_name, a), (b_name, b)):
        if x.shape[1] < 1:
            raise ValueError(f"{name}: need at least one mask per image (dimension 1 >= 1), "
                             f"got shape {tuple(x.shape)}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"{name}: empty spatial size, got shape {tuple(x.shape)}")
    _checks.same_device(**{a_name: a, b_name: b})


def _mask_sets(samples, annotations):
    """Check a (B, N, H, W) / (B, M, H, W) pair and return both as bool."""
    s = _binary_masks("samples", samples, ndim=4, allow_prob=True)
    y = _binary_masks("annotations", annotations, ndim=4, allow_prob=False)
    _check_sets("samples", s, "annotations", y)
    return s, y


# --------------------------------------------------------------------------- pair counts


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, K, H, W) bool -> (B, K, P) in a float dtype whose sums of 0/1 products are exact."""
    p = x.shape[-1] * x.shape[-2]
    # Intersections are sums of at most P ones: float32 holds every integer up to 2**24 exactly,
    # so the matmul below is exact for any summation order (TF32 included: 0 and 1 are exact).
    dtype = torch.float32 if p <= 2**24 else torch.float64
    return x.reshape(*x.shape[:2], p).to(dtype)


def _pair_counts(a: torch.Tensor, b: torch.Tensor):
    """|a_i|, |b_j| and |a_i ∩ b_j| for two bool sets (B, N, H, W), (B, M, H, W), as float64.

    Returns (area_a (B, N, 1), area_b (B, 1, M), inter (B, N, M)).
    """
    fa, fb = _flat(a), _flat(b)
    # Autocast would run the bmm in bf16/fp16, whose 8/11-bit mantissa rounds counts above
    # 256/2048: metrics must not change when called inside a mixed-precision region.
    with torch.autocast(fa.device.type, enabled=False):
        inter = torch.bmm(fa, fb.transpose(1, 2)).double()
    return fa.sum(-1, dtype=torch.float64)[:, :, None], fb.sum(-1, dtype=torch.float64)[:, None, :], inter


def _iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a, area_b, inter = _pair_counts(a, b)
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def _dice_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a, area_b, inter = _pair_counts(a, b)
    total = area_a + area_b
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(inter))


def pairwise_iou(a, b) -> torch.Tensor:
    """IoU of every pair: a (B, N, H, W), b (B, M, H, W) binary -> (B, N, M) float64.

    IoU(empty, empty) = 1. Float inputs must already be 0/1 (no thresholding here).
    """
    a = _binary_masks("a", a, ndim=4, allow_prob=False)
    b = _binary_masks("b", b, ndim=4, allow_prob=False)
    _check_sets("a", a, "b", b)
    return _iou_matrix(a, b)


# --------------------------------------------------------------------------- LIDC protocol


def ged(samples, annotations, *, squared: bool = False) -> torch.Tensor:
    """Generalised energy distance between the sample set and the annotation set, per image.

    GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')],  d = 1 - IoU,  IoU(empty, empty) = 1,
    each expectation the mean over all ordered pairs, self-pairs included (N^2 and M^2 terms).

    Args:
        samples: (B, N, H, W) binary masks or probability maps (thresholded at 0.5).
        annotations: (B, M, H, W) binary masks.
        squared: False (default) returns GED = sqrt(max(GED^2, 0)); True returns GED^2, the
            quantity published LIDC tables (and the BerDiff paper, GED16 = 0.238) call "GED".

    Returns:
        (B,) float64.
    """
    s, y = _mask_sets(samples, annotations)
    d_sy = 1 - _iou_matrix(s, y)
    d_ss = 1 - _iou_matrix(s, s)
    d_yy = 1 - _iou_matrix(y, y)
    ged2 = 2 * d_sy.mean((1, 2)) - d_ss.mean((1, 2)) - d_yy.mean((1, 2))
    if squared:
        return ged2
    # GED^2 >= 0 in exact arithmetic (1 - IoU is a metric of negative type); clamp rounding.
    return ged2.clamp_min(0).sqrt()


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # pragma: no cover - exercised only without scipy
        raise ImportError("hm_iou needs scipy (Hungarian matching): pip install 'berdiff-fast[demo]' "
                          "or pip install scipy") from e
    return linear_sum_assignment


def hm_iou(samples, annotations) -> torch.Tensor:
    """Hungarian-matched IoU between the sample set and the replicated annotation set, per image.

    Both sets are replicated to L = lcm(N, M) members (each sample L/N times, each annotation
    L/M times; 16 samples and 4 annotations give the protocol's 16 = 4 x 4), the L x L cost
    1 - IoU is minimised by a one-to-one assignment (scipy's linear_sum_assignment), and the
    result is the mean IoU over the L matched pairs. With N = 1 this is the mean IoU of the
    sample with every annotation.

    Args:
        samples: (B, N, H, W) binary masks or probability maps (thresholded at 0.5).
        annotations: (B, M, H, W) binary masks.

    Returns:
        (B,) float64 in [0, 1].
    """
    linear_sum_assignment = _linear_sum_assignment()
    s, y = _mask_sets(samples, annotations)
    n, m = s.shape[1], y.shape[1]
    big = math.lcm(n, m)
    iou = _iou_matrix(s, y).cpu().numpy()
    out = torch.empty(s.shape[0], dtype=torch.float64)
    for b in range(s.shape[0]):
        rep = iou[b].repeat(big // n, axis=0).repeat(big // m, axis=1)
        rows, cols = linear_sum_assignment(1.0 - rep)
        out[b] = float(rep[rows, cols].mean())
    return out.to(s.device)


def soft_dice(probs, annotations) -> torch.Tensor:
    """Soft-Dice of the mean prediction against the annotators' mean, per image (DESIGN §6).

    With P = mean of the k maps and A = mean of the M annotations,

        soft_dice = mean over t in (0.1, 0.3, 0.5, 0.7, 0.9) of
                    (2 |[P > t] ∩ [A > t]| + 1e-6) / (|[P > t]| + |[A > t]| + 1e-6),

    as the released BerDiff evaluation computes it (strict ``>``; smoothing 1e-6 in numerator
    and denominator, so an empty-empty threshold scores 1).

    Args:
        probs: (B, k, H, W) probability maps in [0, 1] (or binary masks).
        annotations: (B, M, H, W) binary masks.

    Returns:
        (B,) float64.
    """
    _checks.tensor("probs", probs, ndim=4)
    if probs.is_complex():
        raise ValueError(f"probs: expected probabilities or a binary mask, got {probs.dtype}")
    if probs.dtype != torch.bool:
        if probs.is_floating_point() and not bool(torch.isfinite(probs).all()):
            raise ValueError("probs: contains NaN or inf")
        if not bool(((probs >= 0) & (probs <= 1)).all()):
            raise ValueError("probs: expected probabilities in [0, 1]")
    y = _binary_masks("annotations", annotations, ndim=4, allow_prob=False)
    _check_sets("probs", probs, "annotations", y)
    p_mean = probs.double().mean(1)          # (B, H, W)
    a_mean = y.double().mean(1)              # (B, H, W)
    t = torch.tensor(SOFT_DICE_THRESHOLDS, dtype=torch.float64, device=probs.device)[:, None, None, None]
    po = (p_mean[None] > t).flatten(2).double()   # (T, B, P)
    ao = (a_mean[None] > t).flatten(2).double()
    inter = (po * ao).sum(-1)
    d = (2 * inter + SOFT_DICE_SMOOTH) / (po.sum(-1) + ao.sum(-1) + SOFT_DICE_SMOOTH)
    return d.mean(0)


def dice(pred, target) -> torch.Tensor:
    """Dice coefficient 2|P ∩ T| / (|P| + |T|) per image, with Dice(empty, empty) = 1.

    Args:
        pred, target: binary masks, both (B, H, W) or both (B, 1, H, W).

    Returns:
        (B,) float64.
    """
    for name, x in (("pred", pred), ("target", target)):
        _checks.tensor(name, x)
        if x.ndim == 4 and x.shape[1] != 1:
            raise ValueError(f"{name}: expected (B, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
        if x.ndim not in (3, 4):
            raise ValueError(f"{name}: expected 3 or 4 dimensions ((B, H, W) or (B, 1, H, W)), "
                             f"got shape {tuple(x.shape)}")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred and target: shapes must match, got {tuple(pred.shape)} and {tuple(target.shape)}")
    p = _binary_masks("pred", pred.reshape(pred.shape[0], 1, *pred.shape[-2:]), ndim=4, allow_prob=False)
    t = _binary_masks("target", target.reshape(target.shape[0], 1, *target.shape[-2:]), ndim=4, allow_prob=False)
    _checks.same_device(pred=p, target=t)
    return _dice_matrix(p, t)[:, 0, 0]


# --------------------------------------------------------------------------- CIMD (Rahman et al.)
#
# Rahman, Valanarasu, Hacihaliloglu, Patel, "Ambiguous Medical Image Segmentation using Diffusion
# Models", CVPR 2023 (arXiv:2304.04745), Sect. "Collective Insight (CI) score". The paper's
# repository (aimansnigdha/Ambiguous-Medical-Image-Segmentation-using-Diffusion-Models) holds no
# code for these; the definitions below are the paper's as three independent public
# re-implementations agree on them (union sensitivity, best-Dice matching per annotation,
# min/max variance of pairwise differences, CI = 3abc / (a + b + c)). Y_i are the M annotations,
# Ŷ_j the N samples. Where those implementations differ we take: S_c = 1 when no annotation
# marks anything; V over distinct pairs i < j only (a self-pair's variance is 0 and would pin the
# minimum); Var the population variance over pixels.


def combined_sensitivity(samples, annotations) -> torch.Tensor:
    """S_c = TP / (TP + FN) between the unions Ŷ_c = ∪_j Ŷ_j and Y_c = ∪_i Y_i (CIMD).

    S_c = 1 when every annotation is empty (there is nothing to miss). (B,) float64.
    """
    s, y = _mask_sets(samples, annotations)
    y_c = y.any(1).flatten(1)
    s_c = s.any(1).flatten(1)
    tp = (y_c & s_c).sum(1, dtype=torch.float64)
    pos = y_c.sum(1, dtype=torch.float64)
    return torch.where(pos > 0, tp / pos.clamp_min(1), torch.ones_like(tp))


def max_dice_matching(samples, annotations) -> torch.Tensor:
    """D_max = (1/M) sum_i max_j Dice(Y_i, Ŷ_j): each annotation's best-matching sample (CIMD).

    The paper's "maximum Dice matching"; Dice(empty, empty) = 1. (B,) float64.
    """
    s, y = _mask_sets(samples, annotations)
    return _dice_matrix(y, s).amax(2).mean(1)


def _pair_variances(x: torch.Tensor) -> torch.Tensor:
    """Var over pixels of X_i - X_j for every pair of one bool set (B, K, H, W) -> (B, K, K).

    With d = X_i - X_j in {-1, 0, 1} and P pixels: E[d^2] = |X_i xor X_j| / P and
    E[d] = (|X_i| - |X_j|) / P, so Var = E[d^2] - E[d]^2 (population variance, ddof = 0).
    """
    p = x.shape[-1] * x.shape[-2]
    area_a, area_b, inter = _pair_counts(x, x)
    xor = area_a + area_b - 2 * inter
    return (xor / p - ((area_a - area_b) / p) ** 2).clamp_min(0)


def _min_max_pair_variance(x: torch.Tensor):
    """Min and max of Var(X_i - X_j) over the distinct pairs i < j; both 0 for a single mask."""
    k = x.shape[1]
    v = _pair_variances(x)
    if k == 1:
        zero = v.new_zeros(x.shape[0])
        return zero, zero
    iu = torch.triu_indices(k, k, offset=1, device=v.device)
    pairs = v[:, iu[0], iu[1]]
    return pairs.amin(1), pairs.amax(1)


def diversity_agreement(samples, annotations) -> torch.Tensor:
    """D_a = 1 - (ΔV_max + ΔV_min) / 2 (CIMD).

    V(X) = {Var_pixels(X_i - X_j) : i < j}, the variance over pixels of the difference of two
    members of a set; ΔV_max = |max V(Y) - max V(Ŷ)| and ΔV_min = |min V(Y) - min V(Ŷ)|.
    A set with a single member has V = {0} (it shows no diversity). (B,) float64 in [0, 1].
    """
    s, y = _mask_sets(samples, annotations)
    s_min, s_max = _min_max_pair_variance(s)
    y_min, y_max = _min_max_pair_variance(y)
    return 1 - ((y_max - s_max).abs() + (y_min - s_min).abs()) / 2


def collective_insight(samples, annotations) -> dict[str, torch.Tensor]:
    """CIMD's combined sensitivity-diversity metrics, each (B,) float64.

    Returns a dict with
        ``S_c``:   combined sensitivity (``combined_sensitivity``),
        ``D_max``: maximum Dice matching (``max_dice_matching``),
        ``D_a``:   diversity agreement (``diversity_agreement``),
        ``CI``:    the collective insight score 3 S_c D_max D_a / (S_c + D_max + D_a),
                   the formula of the paper and its public implementations (0 when all three are 0).
    """
    s, y = _mask_sets(samples, annotations)
    s_c = combined_sensitivity(s, y)
    d_max = max_dice_matching(s, y)
    d_a = diversity_agreement(s, y)
    total = s_c + d_max + d_a
    ci = torch.where(total > 0, 3 * s_c * d_max * d_a / total.where(total > 0, torch.ones_like(total)),
                     torch.zeros_like(total))
    return {"S_c": s_c, "D_max": d_max, "D_a": d_a, "CI": ci}
