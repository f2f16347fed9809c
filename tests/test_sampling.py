import functools

import pytest
import torch

import berdiff_fast as bf
from berdiff_fast import reference, rng
from berdiff_fast.sampling import binary_entropy_bits

# The reference path: eager U-Net (the fast path has tests of its own in test_fast_sampler.py).
sample = functools.partial(bf.sample, fast=False)


def _model(T=1000, seed=0, image_size=16):
    """A tiny model moved off its zero initialisation so its predictions depend on the inputs."""
    torch.manual_seed(seed)
    m = bf.BerDiff.from_preset("tiny", image_size=image_size, T=T)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def test_outputs_shapes_and_summaries(model, images):
    out = sample(model, images, steps=4, k=5, seed=11, backend="torch")
    assert out.masks.shape == (3, 5, 16, 16) and out.masks.dtype == torch.bool
    assert out.probs.shape == (3, 5, 16, 16) and out.probs.dtype == torch.float32
    assert torch.equal(out.masks, out.probs > 0.5)
    assert torch.allclose(out.saliency, out.masks.float().mean(1))
    assert out.uncertainty.shape == (3, 16, 16)
    assert torch.allclose(out.uncertainty, binary_entropy_bits(out.saliency))
    assert ((out.uncertainty >= 0) & (out.uncertainty <= 1)).all()
    assert (out.uncertainty[(out.saliency == 0) | (out.saliency == 1)] == 0).all()
    assert out.seed == 11 and out.timesteps.tolist() == [1000, 750, 500, 250]
    assert out.masks.any() and not out.masks.all()  # not a degenerate constant output


def test_same_seed_same_result_other_seed_differs(model, images):
    a = sample(model, images, steps=3, k=4, seed=5)
    b = sample(model, images, steps=3, k=4, seed=5)
    c = sample(model, images, steps=3, k=4, seed=6)
    assert torch.equal(a.probs, b.probs) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.probs, c.probs)
    torch.manual_seed(0)
    d = sample(model, images, steps=3, k=4)
    torch.manual_seed(0)
    e = sample(model, images, steps=3, k=4)
    assert d.seed == e.seed and torch.equal(d.probs, e.probs)


def test_chunking_does_not_change_the_result(model, images):
    # Same random numbers for every row whatever the chunk; the U-Net's float results may differ
    # in the last bits between batch sizes (different convolution algorithms), hence allclose.
    full = sample(model, images, steps=3, k=4, seed=9, max_batch=256)
    for chunk in (1, 7):
        part = sample(model, images, steps=3, k=4, seed=9, max_batch=chunk)
        assert torch.equal(part.masks, full.masks)
        assert torch.allclose(part.probs, full.probs, atol=1e-5)


def test_k_samples_run_as_one_batch(model, images):
    batches = []
    hook = model.unet.register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
    try:
        sample(model, images, steps=3, k=4, seed=1)
    finally:
        hook.remove()
    assert batches == [12, 12, 12]  # 3 U-Net calls, each on all B * k rows


def test_matches_an_independent_loop_over_the_reference(model, images):
    """The documented stream layout: y_T at offsets [0, n), step i at [(i+1) n, (i+2) n)."""
    k, seed, eta = 2, 21, 0.7
    out = sample(model, images, steps=3, k=k, seed=seed, eta=eta, backend="torch")
    sched = model.schedule
    x = images.repeat_interleave(k, 0)
    n = x.numel()
    y = (rng.uniform(seed, 0, n).view(x.shape) < 0.5).float()
    ts = [1000, 667, 333, 0]
    with torch.no_grad():
        for i in range(3):
            t = torch.full((x.shape[0],), ts[i])
            e = torch.sigmoid(model(y, x, t))
            if i == 2:
                y0_hat = reference.predict_y0(y, e)
                break
            _, _, ab_t, fl_t = sched.gather(t, 4)
            _, _, ab_s, fl_s = sched.gather(torch.full_like(t, ts[i + 1]), 4)
            p = reference.ddim_prob(y, reference.predict_y0(y, e), ab_t, fl_t, ab_s, fl_s, eta)
            y = (rng.uniform(seed, (i + 1) * n, n).view(x.shape) < p).float()
    assert torch.allclose(out.probs, y0_hat.view(3, k, 16, 16), atol=1e-6)


def test_ddpm_visits_all_steps():
    m = _model(T=25)
    x = torch.randn(2, 1, 16, 16)
    calls = []
    hook = m.unet.register_forward_hook(lambda mod, args, out: calls.append(int(args[2][0])))
    try:
        out = sample(m, x, steps=None, k=3, seed=0, sampler="ddpm")
    finally:
        hook.remove()
    assert calls == list(range(25, 0, -1)) and out.masks.shape == (2, 3, 16, 16)
    assert torch.equal(sample(m, x, k=3, seed=0, sampler="ddpm").probs, out.probs)  # the default steps
    with pytest.raises(ValueError, match="steps: the DDPM sampler visits all T = 25 steps"):
        sample(m, x, steps=5, sampler="ddpm")
    # DDIM's default, 50 steps, cannot exceed T.
    assert sample(m, x, k=1, seed=0).timesteps.tolist() == list(range(25, 0, -1))


def test_result_moves_between_devices(model, images):
    out = sample(model, images, steps=2, k=2, seed=3)
    moved = out.to("meta")
    assert all(getattr(moved, f).device.type == "meta" for f in ("masks", "probs", "saliency", "uncertainty"))
    assert moved.seed == out.seed and out.masks.device.type == "cpu"  # the original is left as it was
    back = out.to("cpu")
    assert torch.equal(back.masks, out.masks) and torch.equal(back.uncertainty, out.uncertainty)


def test_numpy_integers_and_float64_models(model, images):
    import numpy as np
    got = sample(model, images, steps=np.int64(3), k=np.int32(2), seed=np.uint16(7), max_batch=np.int64(64))
    want = sample(model, images, steps=3, k=2, seed=7)
    assert got.seed == 7 and isinstance(got.seed, int) and torch.equal(got.probs, want.probs)
    m64 = _model().double()
    out = sample(m64, images, steps=2, k=2, seed=1, fast=False)  # images are cast to the model's dtype
    assert out.masks.shape == (images.shape[0], 2, 16, 16)


def test_original_spacing(model, images):
    out = sample(model, images, steps=10, k=1, seed=0, spacing="original")
    assert out.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k: expected a positive int"),
    (dict(k=2.0), "k: expected a positive int"),
    (dict(steps=0), "steps: expected an int in 1..1000"),
    (dict(steps=1001), "steps: expected an int in 1..1000"),
    (dict(eta=1.5), "eta"),
    (dict(sampler="plms"), "sampler: unknown 'plms'"),
    (dict(seed=-3), "seed"),
    (dict(max_batch=0), "max_batch"),
    (dict(max_batch=True), "max_batch"),
    (dict(steps=2.5), "steps: expected an int"),
    (dict(spacing="log"), "spacing: unknown"),
])
def test_bad_arguments(model, images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(model, images, **kwargs)


@pytest.mark.parametrize("x, match", [
    (torch.randn(1, 16, 16), "x: expected 4 dimensions"),
    (torch.randn(2, 3, 16, 16), "x: the model takes 1 image channel"),
    (torch.randn(2, 1, 32, 32), "x: the model takes 16x16 images"),
    (torch.full((2, 1, 16, 16), float("inf")), "x: contains NaN or inf"),
    (torch.ones(2, 1, 16, 16, dtype=torch.long), "x: expected a floating-point image"),
    (torch.randn(2, 1, 16, 16, device="meta"), "x: on meta"),
])
def test_bad_images(model, x, match):
    with pytest.raises(ValueError, match=match):
        sample(model, x, steps=2, k=2)


def test_not_a_model(images):
    with pytest.raises(ValueError, match="model: expected a berdiff_fast.BerDiff"):
        sample(torch.nn.Identity(), images)
