"""berdiff_fast.metrics against slow brute-force implementations written here with Python loops."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from berdiff_fast import metrics

# --------------------------------------------------------------------------- brute force


def bf_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = union = 0
    for u, v in zip(a.ravel().tolist(), b.ravel().tolist()):
        inter += u and v
        union += u or v
    return 1.0 if union == 0 else inter / union


def bf_dice(a: np.ndarray, b: np.ndarray) -> float:
    inter = total = 0
    for u, v in zip(a.ravel().tolist(), b.ravel().tolist()):
        inter += u and v
        total += u + v
    return 1.0 if total == 0 else 2 * inter / total


def bf_ged2(s: np.ndarray, y: np.ndarray) -> float:
    def mean_d(xs, ys):
        return sum(1 - bf_iou(a, b) for a in xs for b in ys) / (len(xs) * len(ys))
    return 2 * mean_d(s, y) - mean_d(s, s) - mean_d(y, y)


def bf_hm_iou(s: np.ndarray, y: np.ndarray) -> float:
    n, m = len(s), len(y)
    big = n * m // math.gcd(n, m)
    ss = [s[i // (big // n)] for i in range(big)]
    yy = [y[j // (big // m)] for j in range(big)]
    iou = [[bf_iou(a, b) for b in yy] for a in ss]
    return max(sum(iou[i][p[i]] for i in range(big)) / big for p in itertools.permutations(range(big)))


def bf_soft_dice(probs: np.ndarray, y: np.ndarray) -> float:
    k, h, w = probs.shape
    m = len(y)
    scores = []
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        inter = po = ao = 0
        for i in range(h):
            for j in range(w):
                p = sum(float(probs[n, i, j]) for n in range(k)) / k
                a = sum(float(y[n, i, j]) for n in range(m)) / m
                inter += (p > t) and (a > t)
                po += p > t
                ao += a > t
        scores.append((2 * inter + 1e-6) / (po + ao + 1e-6))
    return sum(scores) / len(scores)


def bf_cimd(s: np.ndarray, y: np.ndarray) -> dict[str, float]:
    y_c = np.zeros(y.shape[1:], bool)
    s_c = np.zeros(s.shape[1:], bool)
    for a in y:
        y_c |= a
    for a in s:
        s_c |= a
    tp = fn = 0
    for u, v in zip(y_c.ravel().tolist(), s_c.ravel().tolist()):
        tp += u and v
        fn += u and not v
    sens = 1.0 if tp + fn == 0 else tp / (tp + fn)
    d_max = sum(max(bf_dice(a, b) for b in s) for a in y) / len(y)

    def variances(xs):
        out = [float(np.var(xs[i].astype(float) - xs[j].astype(float)))
               for i in range(len(xs)) for j in range(i + 1, len(xs))]
        return out or [0.0]
    vy, vs = variances(y), variances(s)
    d_a = 1 - (abs(max(vy) - max(vs)) + abs(min(vy) - min(vs))) / 2
    total = sens + d_max + d_a
    ci = 0.0 if total == 0 else 3 * sens * d_max * d_a / total
    return {"S_c": sens, "D_max": d_max, "D_a": d_a, "CI": ci}


# --------------------------------------------------------------------------- strategies


@st.composite
def mask_sets(draw, max_n=4, max_m=4, max_hw=6):
    """(samples, annotations) bool arrays; densities include 0 (all empty) and 1 (all full)."""
    b = draw(st.integers(1, 3))
    n = draw(st.integers(1, max_n))
    m = draw(st.integers(1, max_m))
    h = draw(st.integers(1, max_hw))
    w = draw(st.integers(1, max_hw))
    seed = draw(st.integers(0, 2**32 - 1))
    dens = st.sampled_from([0.0, 0.0, 0.2, 0.5, 0.8, 1.0])
    rng = np.random.default_rng(seed)
    s = rng.random((b, n, h, w)) < np.array([draw(dens) for _ in range(b * n)]).reshape(b, n, 1, 1)
    y = rng.random((b, m, h, w)) < np.array([draw(dens) for _ in range(b * m)]).reshape(b, m, 1, 1)
    if draw(st.booleans()):
        s[:] = False  # all-empty samples
    if draw(st.booleans()):
        y[:] = False  # all-empty annotations
    return s, y


def per_image(fn, s, y):
    return np.array([fn(s[b], y[b]) for b in range(len(s))])


# --------------------------------------------------------------------------- against brute force


@given(mask_sets())
def test_ged_matches_brute_force(sy):
    s, y = sy
    got2 = metrics.ged(torch.from_numpy(s), torch.from_numpy(y), squared=True)
    want2 = per_image(bf_ged2, s, y)
    assert got2.dtype == torch.float64 and got2.shape == (len(s),)
    np.testing.assert_allclose(got2.numpy(), want2, rtol=0, atol=1e-12)
    got = metrics.ged(torch.from_numpy(s), torch.from_numpy(y))
    np.testing.assert_allclose(got.numpy(), np.sqrt(np.maximum(want2, 0)), rtol=0, atol=1e-7)


@given(mask_sets(max_n=3, max_m=3))
def test_hm_iou_matches_permutation_brute_force(sy):
    s, y = sy
    got = metrics.hm_iou(torch.from_numpy(s), torch.from_numpy(y))
    assert got.dtype == torch.float64 and got.shape == (len(s),)
    np.testing.assert_allclose(got.numpy(), per_image(bf_hm_iou, s, y), rtol=0, atol=1e-12)


@given(mask_sets(), st.integers(0, 2**32 - 1))
def test_soft_dice_matches_brute_force(sy, seed):
    _, y = sy
    b, _, h, w = y.shape
    k = np.random.default_rng(seed).integers(1, 5)
    # Probabilities on a dyadic grid (multiples of 1/8): the means are exact in both
    # implementations, so values lying on a threshold compare the same way.
    probs = np.random.default_rng(seed + 1).integers(0, 9, size=(b, k, h, w)) / 8.0
    got = metrics.soft_dice(torch.from_numpy(probs), torch.from_numpy(y))
    assert got.dtype == torch.float64 and got.shape == (b,)
    np.testing.assert_allclose(got.numpy(), per_image(bf_soft_dice, probs, y), rtol=1e-12, atol=1e-12)


@given(mask_sets(max_n=1, max_m=1))
def test_dice_matches_brute_force(sy):
    s, y = sy
    want = np.array([bf_dice(s[b, 0], y[b, 0]) for b in range(len(s))])
    for shape in ((len(s),) + s.shape[2:], s.shape):  # (B, H, W) and (B, 1, H, W)
        got = metrics.dice(torch.from_numpy(s.reshape(shape)), torch.from_numpy(y.reshape(shape)))
        assert got.dtype == torch.float64 and got.shape == (len(s),)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


@given(mask_sets())
def test_cimd_matches_brute_force(sy):
    s, y = sy
    got = metrics.collective_insight(torch.from_numpy(s), torch.from_numpy(y))
    want = [bf_cimd(s[b], y[b]) for b in range(len(s))]
    for key in ("S_c", "D_max", "D_a", "CI"):
        assert got[key].dtype == torch.float64 and got[key].shape == (len(s),)
        np.testing.assert_allclose(got[key].numpy(), [w[key] for w in want], rtol=0, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(metrics.combined_sensitivity(torch.from_numpy(s), torch.from_numpy(y)).numpy(),
                               got["S_c"].numpy())
    np.testing.assert_allclose(metrics.max_dice_matching(torch.from_numpy(s), torch.from_numpy(y)).numpy(),
                               got["D_max"].numpy())
    np.testing.assert_allclose(metrics.diversity_agreement(torch.from_numpy(s), torch.from_numpy(y)).numpy(),
                               got["D_a"].numpy())


@given(mask_sets(max_n=3, max_m=3))
def test_pairwise_iou_matches_brute_force(sy):
    s, y = sy
    got = metrics.pairwise_iou(torch.from_numpy(s), torch.from_numpy(y)).numpy()
    want = np.array([[[bf_iou(a, c) for c in y[b]] for a in s[b]] for b in range(len(s))])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)


def test_protocol_shapes_16_samples_4_annotations_match_released_evaluation():
    """hm_iou with N = 16, M = 4 equals the released evaluation: labels repeated 4 times, a
    16 x 16 cost matrix built pair by pair, scipy's assignment, the mean matched IoU."""
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(7)
    s = rng.random((2, 16, 12, 12)) < 0.4
    y = rng.random((2, 4, 12, 12)) < 0.4
    got = metrics.hm_iou(torch.from_numpy(s), torch.from_numpy(y)).numpy()
    for b in range(2):
        label = np.repeat(y[b], 4, 0)
        cost = np.array([[1 - bf_iou(label[i], s[b, j]) for j in range(16)] for i in range(16)])
        r, c = linear_sum_assignment(cost)
        assert got[b] == pytest.approx((1 - cost)[r, c].mean(), abs=1e-12)


# --------------------------------------------------------------------------- closed forms


def test_identical_sets_have_zero_ged():
    y = torch.from_numpy(np.random.default_rng(1).random((3, 4, 9, 9)) < 0.5)
    assert torch.equal(metrics.ged(y, y), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(metrics.ged(y, y, squared=True), torch.zeros(3, dtype=torch.float64))


def test_all_masks_equal_is_perfect_on_every_metric():
    a = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    a[..., 2:5, 3:7] = True
    s, y = a.expand(1, 16, 8, 8), a.expand(1, 4, 8, 8)
    assert metrics.ged(s, y).item() == 0.0
    assert metrics.hm_iou(s, y).item() == 1.0
    assert metrics.soft_dice(s.float(), y).item() == pytest.approx(1.0, abs=1e-15)
    assert metrics.dice(a[:, 0], a[:, 0]).item() == 1.0
    assert {k: v.item() for k, v in metrics.collective_insight(s, y).items()} == \
        {"S_c": 1.0, "D_max": 1.0, "D_a": 1.0, "CI": 1.0}


def test_disjoint_constant_sets():
    """Samples all A, annotations all B, A and B disjoint and non-empty: d(S, Y) = 1 and
    d(S, S') = d(Y, Y') = 0, so GED^2 = 2; every match has IoU 0."""
    a = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    b = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    a[..., :2, :] = True
    b[..., 4:, :] = True
    s, y = a.expand(1, 3, 6, 6), b.expand(1, 2, 6, 6)
    assert metrics.ged(s, y, squared=True).item() == 2.0
    assert metrics.ged(s, y).item() == pytest.approx(math.sqrt(2), abs=1e-15)
    assert metrics.hm_iou(s, y).item() == 0.0
    assert metrics.dice(a[:, 0], b[:, 0]).item() == 0.0
    assert metrics.combined_sensitivity(s, y).item() == 0.0
    assert metrics.max_dice_matching(s, y).item() == 0.0
    assert metrics.collective_insight(s, y)["CI"].item() == 0.0


def test_all_empty_samples_and_annotations():
    s = torch.zeros(2, 5, 7, 7, dtype=torch.bool)
    y = torch.zeros(2, 3, 7, 7, dtype=torch.bool)
    assert metrics.ged(s, y).tolist() == [0.0, 0.0]
    assert metrics.hm_iou(s, y).tolist() == [1.0, 1.0]
    assert metrics.soft_dice(s.float(), y).tolist() == [1.0, 1.0]
    assert metrics.dice(s[:, 0], y[:, 0]).tolist() == [1.0, 1.0]
    ci = metrics.collective_insight(s, y)
    assert ci["S_c"].tolist() == [1.0, 1.0] and ci["D_max"].tolist() == [1.0, 1.0]


def test_empty_annotation_vs_full_sample():
    s = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    y = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    assert metrics.ged(s, y, squared=True).item() == 2.0  # d = 1 across, 0 within each set
    assert metrics.dice(s[:, 0], y[:, 0]).item() == 0.0
    assert metrics.combined_sensitivity(s, y).item() == 1.0  # nothing to detect


def test_half_overlap_dice_and_iou():
    a = torch.zeros(1, 4, 4, dtype=torch.bool)
    b = torch.zeros(1, 4, 4, dtype=torch.bool)
    a[:, :2] = True   # 8 pixels
    b[:, 1:3] = True  # 8 pixels, 4 shared
    assert metrics.dice(a, b).item() == 0.5
    assert metrics.pairwise_iou(a[:, None], b[:, None]).item() == pytest.approx(4 / 12)


def test_diversity_agreement_closed_form():
    """Annotations {A, empty} on 4 pixels with |A| = 2: Var(A - 0) = 2/4 - (2/4)^2 = 1/4.
    Samples identical: V = {0}. D_a = 1 - (1/4 + 1/4) / 2 = 3/4."""
    y = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    y[0, 0, 0] = True
    s = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    assert metrics.diversity_agreement(s, y).item() == pytest.approx(0.75, abs=1e-15)


def test_soft_dice_thresholds_are_strict():
    """Two of four annotators mark a pixel: the annotators' mean 0.5 is not > 0.5."""
    y = torch.zeros(1, 4, 1, 2, dtype=torch.bool)
    y[0, :2, 0, 0] = True
    probs = torch.zeros(1, 1, 1, 2)
    probs[0, 0, 0, 0] = 0.5
    # thresholds 0.1, 0.3: both {pixel 0}: dice 1; 0.5, 0.7, 0.9: both empty: dice 1
    assert metrics.soft_dice(probs, y).item() == pytest.approx(1.0, abs=1e-15)
    probs[0, 0, 0, 0] = 0.6  # now > 0.5 for the prediction only: dice 1e-6 / (1 + 1e-6) at t = 0.5
    want = (4 * 1.0 + 1e-6 / (1 + 1e-6)) / 5
    assert metrics.soft_dice(probs, y).item() == pytest.approx(want, abs=1e-12)


def test_probability_samples_are_thresholded_at_half():
    rng = np.random.default_rng(3)
    p = torch.from_numpy(rng.random((2, 6, 5, 5)))
    p[0, 0, 0, 0] = 0.5  # exactly 0.5 is background (strict >)
    y = torch.from_numpy(rng.random((2, 3, 5, 5)) < 0.5)
    for fn in (metrics.ged, metrics.hm_iou):
        assert torch.equal(fn(p, y), fn(p > 0.5, y))
    assert metrics.collective_insight(p, y)["CI"].tolist() == metrics.collective_insight(p > 0.5, y)["CI"].tolist()


def test_integer_and_float_binary_masks_equal_bool():
    rng = np.random.default_rng(4)
    s = rng.random((2, 3, 5, 5)) < 0.5
    y = rng.random((2, 2, 5, 5)) < 0.5
    ref = metrics.ged(torch.from_numpy(s), torch.from_numpy(y))
    assert torch.equal(metrics.ged(torch.from_numpy(s.astype(np.uint8)), torch.from_numpy(y.astype(np.int64))), ref)
    assert torch.equal(metrics.ged(torch.from_numpy(s.astype(np.float32)), torch.from_numpy(y.astype(np.float64))), ref)


def test_batch_entries_are_independent():
    rng = np.random.default_rng(5)
    s = torch.from_numpy(rng.random((4, 5, 6, 6)) < 0.4)
    y = torch.from_numpy(rng.random((4, 3, 6, 6)) < 0.4)
    for fn in (metrics.ged, metrics.hm_iou, metrics.combined_sensitivity, metrics.max_dice_matching,
               metrics.diversity_agreement, lambda a, b: metrics.soft_dice(a.float(), b)):
        full = fn(s, y)
        single = torch.cat([fn(s[i:i + 1], y[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(full, single, rtol=0, atol=1e-15)


def test_ged_and_squared_agree():
    rng = np.random.default_rng(6)
    s = torch.from_numpy(rng.random((3, 8, 10, 10)) < 0.5)
    y = torch.from_numpy(rng.random((3, 4, 10, 10)) < 0.5)
    g, g2 = metrics.ged(s, y), metrics.ged(s, y, squared=True)
    assert bool((g2 >= 0).all())
    torch.testing.assert_close(g * g, g2, rtol=1e-12, atol=1e-15)


def test_metrics_are_unchanged_inside_autocast():
    # 128 x 128 masks hold thousands of pixels: a bf16 matmul would round their intersection counts
    # (8-bit mantissa) and shift GED and HM-IoU; the counts must stay exact in a mixed-precision region.
    g = torch.Generator().manual_seed(0)
    s = torch.rand(1, 16, 128, 128, generator=g) < 0.4
    y = torch.rand(1, 4, 128, 128, generator=g) < 0.4
    ged2, hm, iou = metrics.ged(s, y, squared=True), metrics.hm_iou(s, y), metrics.pairwise_iou(s, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(metrics.ged(s, y, squared=True), ged2)
        assert torch.equal(metrics.hm_iou(s, y), hm)
        assert torch.equal(metrics.pairwise_iou(s, y), iou)


# --------------------------------------------------------------------------- bad input

_S = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
_Y = torch.zeros(2, 2, 4, 4, dtype=torch.bool)
_PAIR_FNS = [metrics.ged, metrics.hm_iou, metrics.combined_sensitivity, metrics.max_dice_matching,
             metrics.diversity_agreement, metrics.collective_insight]


@pytest.mark.parametrize("fn", _PAIR_FNS)
@pytest.mark.parametrize("s, y, match", [
    (_S[0], _Y, r"samples: expected 4 dimensions"),
    (_S, _Y[0], r"annotations: expected 4 dimensions"),
    (_S, _Y[:1], r"batch sizes differ"),
    (_S, torch.zeros(2, 2, 4, 5, dtype=torch.bool), r"spatial sizes differ"),
    (_S[:, :0], _Y, r"samples: need at least one"),
    (_S, _Y[:, :0], r"annotations: need at least one"),
    (_S, _Y.to(torch.uint8) + 2, r"annotations: expected a binary mask"),
    (_S.float(), _Y.float() + 0.5, r"annotations: expected a binary mask .*threshold"),
    (torch.full((2, 3, 4, 4), 1.5), _Y, r"samples: expected a binary mask or probabilities in \[0, 1\]"),
    (torch.full((2, 3, 4, 4), float("nan")), _Y, r"samples: contains NaN"),
    (_S.to(torch.int32) + 3, _Y, r"samples: expected a binary mask"),
    (np.zeros((2, 3, 4, 4)), _Y, r"samples: expected a torch.Tensor"),
])
def test_pair_metrics_reject_bad_input(fn, s, y, match):
    with pytest.raises(ValueError, match=match):
        fn(s, y)


def test_soft_dice_rejects_bad_input():
    with pytest.raises(ValueError, match=r"probs: expected 4 dimensions"):
        metrics.soft_dice(torch.zeros(3, 4, 4), _Y)
    with pytest.raises(ValueError, match=r"probs: expected probabilities in \[0, 1\]"):
        metrics.soft_dice(torch.full((2, 3, 4, 4), -0.1), _Y)
    with pytest.raises(ValueError, match=r"probs: contains NaN"):
        metrics.soft_dice(torch.full((2, 3, 4, 4), float("inf")), _Y)
    with pytest.raises(ValueError, match=r"annotations: expected a binary mask"):
        metrics.soft_dice(torch.zeros(2, 3, 4, 4), _Y.float() + 0.3)
    with pytest.raises(ValueError, match=r"probs and annotations: batch sizes differ"):
        metrics.soft_dice(torch.zeros(1, 3, 4, 4), _Y)
    with pytest.raises(ValueError, match=r"probs and annotations: spatial sizes differ"):
        metrics.soft_dice(torch.zeros(2, 3, 4, 3), _Y)
    with pytest.raises(ValueError, match=r"probs: need at least one"):
        metrics.soft_dice(torch.zeros(2, 0, 4, 4), _Y)


def test_dice_rejects_bad_input():
    m = torch.zeros(2, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"pred: expected \(B, H, W\) or \(B, 1, H, W\)"):
        metrics.dice(torch.zeros(2, 2, 4, 4, dtype=torch.bool), m)
    with pytest.raises(ValueError, match=r"target: expected 3 or 4 dimensions"):
        metrics.dice(m, torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pred and target: shapes must match"):
        metrics.dice(m, m[:1])
    with pytest.raises(ValueError, match=r"pred: expected a binary mask"):
        metrics.dice(m.float() + 0.5, m)
    with pytest.raises(ValueError, match=r"target: expected a torch.Tensor"):
        metrics.dice(m, m.numpy())
