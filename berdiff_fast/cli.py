"""The ``berdiff-fast`` command line: train, sample, evaluate, demo, bench.

Every command takes ``--help``. Outputs are never written over without ``--overwrite``; errors
name the argument, path or file that is wrong and exit with status 2 (3 when training diverged).
Multi-GPU training: ``torchrun --nproc_per_node N -m berdiff_fast.cli train ...``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# The paper's learning rates per data set (Sect. 3.1); the synthetic data use the demo's.
DEFAULT_LR = {"lidc": 5e-5, "brats": 1e-4, "synthetic": 5e-4}
DEFAULT_PRESET = {"lidc": "lidc", "brats": "brats", "synthetic": "tiny"}
DATASETS = ("auto", "lidc", "brats")
BENCHMARKS = ("latency", "train_step", "kernels")
# The data seed of the synthetic test set of `evaluate --synthetic`, whatever its sampling --seed
# (the demo's held-out seed at its default --seed 0); `train --synthetic` refuses it as a seed,
# so no run can train on these images.
SYNTHETIC_TEST_SEED = 10_000


# --------------------------------------------------------------------------- argument types


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low:
            raise argparse.ArgumentTypeError(f"expected a {what} integer, got {text!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "positive")
_nonneg_int = _int_at_least(0, "non-negative")


def _float_where(ok, what: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


_positive_float = _float_where(lambda v: v > 0, "a positive number")
_unit_float = _float_where(lambda v: 0 <= v < 1, "a number in [0, 1)")
_nonneg_float = _float_where(lambda v: v >= 0, "a non-negative number")


# --------------------------------------------------------------------------- shared helpers


def _detect_dataset(path: Path) -> str:
    """'lidc' or 'brats' for a data path, or a ValueError saying what was expected."""
    from .data import DataError, detect_format
    from .data.brats import case_folders

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory (the data set path)")
    if path.is_dir() and case_folders(path):
        return "brats"
    try:
        detect_format(path)
        return "lidc"
    except DataError as e:
        raise ValueError(f"{path}: neither a LIDC data set nor a folder of BRATS case folders "
                         f"(<case>/<case>_t1.nii.gz ...). {e}") from None


def _open_dataset(path: str, kind: str, split: str, mode: str, seed: int, crop: int | None):
    from .data import LIDC, BraTS

    p = Path(path)
    kind = _detect_dataset(p) if kind == "auto" else kind  # LIDC and BraTS check that p exists
    if kind == "lidc":
        return "lidc", LIDC(p, split=split, mode=mode, crop=crop if crop is not None else 128, seed=seed)
    return "brats", BraTS(p, split=split, mode=mode, crop=crop if crop is not None else 224, seed=seed)


def _synthetic(n: int, size: int, seed: int):
    from .synthetic import SyntheticLesions

    ds = SyntheticLesions(n, size=size, seed=seed, mode="eval")
    ds.split_info = {"dataset": "synthetic", "n_images": n, "size": size, "seed": seed,
                     "generator": "berdiff_fast.synthetic.make_synthetic"}
    return ds


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None


def _refuse_existing(paths, overwrite: bool, flag: str = "--out") -> None:
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 3} more)" if len(existing) > 3 else ""
        raise FileExistsError(f"{flag}: {', '.join(existing[:3])}{more} already exist(s); pass --overwrite to "
                              f"replace, or choose another {flag}")


# --------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    from .baseline import DeterministicUNet
    from .model import BerDiff
    from .trainer import CHECKPOINT, WEIGHTS, Trainer, TrainConfig

    if args.synthetic == (args.data is not None):
        raise ValueError("data: give a data set path or --synthetic (exactly one of them)")
    if args.steps is None and args.minutes is None:
        raise ValueError("--steps/--minutes: give a step budget (--steps N), a time budget (--minutes M), or both")
    if args.synthetic:
        if args.seed == SYNTHETIC_TEST_SEED:
            raise ValueError(f"--seed: {SYNTHETIC_TEST_SEED} is the data seed of the synthetic test set that "
                             f"`evaluate --synthetic` scores; train --synthetic with another --seed")
        kind = "synthetic"
    else:
        kind = _detect_dataset(Path(args.data)) if args.dataset == "auto" else args.dataset
    preset = args.preset or DEFAULT_PRESET[kind]
    import torch

    torch.manual_seed(args.seed)  # the initial weights: the same in every process and every run
    overrides = {}
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.image_channels is not None:
        overrides["image_channels"] = args.image_channels
    if args.model == "berdiff":
        model = BerDiff.from_preset(preset, schedule=args.schedule, T=args.T, **overrides)
    else:
        model = DeterministicUNet.from_preset(preset, **overrides)
    if args.synthetic:
        dataset = _synthetic(args.synthetic_size, model.image_size, args.seed)
    else:
        _, dataset = _open_dataset(args.data, kind, args.split, "train", args.seed, args.crop)
    cfg = TrainConfig(steps=args.steps, minutes=args.minutes, batch_size=args.batch_size,
                      lr=args.lr if args.lr is not None else DEFAULT_LR[kind], weight_decay=args.weight_decay,
                      ema_decay=args.ema or None, grad_clip=args.grad_clip or None, amp=args.amp,
                      ckpt_every=args.ckpt_every, log_every=args.log_every, seed=args.seed, backend=args.backend,
                      compile=args.compile, num_workers=args.workers, tensorboard=args.tensorboard)
    trainer = Trainer(model, dataset, cfg, out=args.out, resume=args.resume, overwrite=args.overwrite,
                      progress=not args.no_progress)
    hist = trainer.fit()
    if trainer.rank == 0:
        how = "step budget reached" if hist["stopped"] == "steps" else "time budget reached"
        print(f"trained {args.model} ({preset}) to step {hist['steps']} ({how}; {hist['steps'] - hist['start_step']} "
              f"steps this run, lr {cfg.lr:g}, global batch {cfg.batch_size})")
        print(f"wrote {Path(args.out) / CHECKPOINT} (training state) and {Path(args.out) / WEIGHTS} "
              f"({'EMA' if cfg.ema_on else 'raw'} weights)")
    return 0


# --------------------------------------------------------------------------- sample


def _png_write(path: Path, arr) -> None:
    from PIL import Image

    Image.fromarray(arr).save(path)


def _u16(x):
    import numpy as np

    return np.round(x.clamp(0, 1).numpy() * 65535).astype(np.uint16)


def _overlay(path: Path, image, saliency, uncertainty, masks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    img = image[0].numpy() if image.shape[0] == 1 else image.mean(0).numpy()
    axes[0].imshow(img, cmap="gray")
    cmap = plt.get_cmap("tab20")
    for j in range(masks.shape[0]):
        if masks[j].any():
            axes[0].contour(masks[j].numpy().astype(float), levels=[0.5], colors=[cmap(j % 20)], linewidths=0.7)
    axes[0].set_title(f"image + {masks.shape[0]} sample outlines", fontsize=8)
    axes[1].imshow(img, cmap="gray")
    im = axes[1].imshow(saliency.numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=1)
    axes[1].set_title("saliency (fraction of samples)", fontsize=8)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    im = axes[2].imshow(uncertainty.numpy(), cmap="viridis", vmin=0, vmax=1)
    axes[2].set_title("uncertainty (entropy, bits)", fontsize=8)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .baseline import DeterministicUNet
    from .data import load_inputs
    from .data._common import mix_seed
    from .evaluate import predict_sets
    from .model import BerDiff
    from .sampling import binary_entropy_bits, resolve_steps
    from .trainer import load_model

    device = _device(args.device)
    model = load_model(args.checkpoint, preset=args.preset, weights=args.weights, map_location=device)
    deterministic = isinstance(model, DeterministicUNet)
    k = 1 if deterministic else args.k
    inputs = Path(args.inputs)
    if not inputs.exists():
        raise FileNotFoundError(f"{inputs}: no such file or directory (the inputs to segment)")
    loaded = list(load_inputs(inputs, model.image_channels, crop=args.crop, geometry=True, nifti_norm=args.nifti_norm))
    if not loaded:
        raise ValueError(f"{inputs}: no images found")
    items = [(name, img) for name, img, _ in loaded]
    s = model.image_size
    for name, img in items:
        if tuple(img.shape[1:]) != (s, s):
            raise ValueError(f"{inputs}: image {name!r} is {img.shape[1]}x{img.shape[2]}, but the model takes {s}x{s}"
                             + (f"; pass --crop {s} to centre-crop it" if min(img.shape[1:]) > s else ""))
    fmt = args.format
    if fmt == "auto":
        fmt = "both" if any(geo is not None for _, _, geo in loaded) else "png"
    want_png, want_nifti = fmt in ("png", "both"), fmt in ("nifti", "both")
    if want_nifti:
        try:
            import nibabel  # noqa: F401
        except ImportError:
            raise ImportError("--format: NIfTI output needs the 'nibabel' package: pip install nibabel "
                              "(or pass --format png)") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    # One NIfTI output per input volume (its slices, in z order); a PNG input is a volume of one slice.
    groups: dict[str, list[int]] = {}
    geometry: dict[str, object] = {}
    for i, (name, _, geo) in enumerate(loaded):
        group = geo.name if geo is not None else name
        groups.setdefault(group, []).append(i)
        geometry[group] = geo
    targets = [out / "summary.json"]
    if want_png:
        targets += [out / name for name, _ in items]
    if want_nifti:
        targets += [out / f"{g}_{what}.nii.gz" for g in groups
                    for what in ("masks", "probs", "saliency", "uncertainty")]
    _refuse_existing(targets, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)

    images = torch.from_numpy(np.stack([img for _, img in items]))
    masks, probs = [], []
    for c, lo in enumerate(range(0, len(items), args.batch)):
        m, p = predict_sets(model, images[lo:lo + args.batch], k=k, steps=args.steps, seed=mix_seed(args.seed, c),
                            eta=args.eta, sampler=args.sampler, max_batch=args.max_batch, backend=args.backend,
                            progress=not args.no_progress)
        masks.append(m)
        probs.append(p)
    masks, probs = torch.cat(masks), torch.cat(probs)
    saliency = masks.float().mean(1)
    uncertainty = binary_entropy_bits(saliency)
    written = []
    if want_png:
        for i, (name, img) in enumerate(items):
            d = out / name
            d.mkdir(parents=True, exist_ok=True)
            for j in range(k):
                _png_write(d / f"mask_{j:02d}.png", masks[i, j].numpy().astype(np.uint8) * 255)
                _png_write(d / f"prob_{j:02d}.png", _u16(probs[i, j]))
            _png_write(d / "saliency.png", _u16(saliency[i]))
            _png_write(d / "uncertainty.png", _u16(uncertainty[i]))
            if not args.no_figure:
                _overlay(d / "overlay.png", torch.from_numpy(img), saliency[i], uncertainty[i], masks[i])
            written.append(str(d))
    if want_nifti:
        import nibabel as nib

        for g, idx in groups.items():
            vol = {"masks": masks[idx].permute(2, 3, 0, 1).numpy().astype(np.uint8),        # (H, W, D, k)
                   "probs": probs[idx].permute(2, 3, 0, 1).numpy().astype(np.float32),
                   "saliency": saliency[idx].permute(1, 2, 0).numpy().astype(np.float32),   # (H, W, D)
                   "uncertainty": uncertainty[idx].permute(1, 2, 0).numpy().astype(np.float32)}
            for what, arr in vol.items():
                path = out / f"{g}_{what}.nii.gz"
                # On the input volume's grid (crop undone, its affine); a PNG has no geometry.
                geo = geometry[g]
                nib.save(geo.to_nifti(arr) if geo is not None else nib.Nifti1Image(arr, np.eye(4)), str(path))
                written.append(str(path))
    summary = {"checkpoint": str(Path(args.checkpoint).resolve()), "inputs": str(inputs.resolve()),
               "images": [n for n, _ in items], "k": k,
               "steps": resolve_steps(args.steps, args.sampler, model.schedule.T) if isinstance(model, BerDiff) else None,
               "sampler": args.sampler,
               "eta": args.eta, "seed": args.seed, "batch": args.batch, "model": model.config,
               "png": "mask_XX.png 0/255; prob_XX.png, saliency.png, uncertainty.png 16-bit, value / 65535 "
                      "(uncertainty in bits)" if want_png else None,
               "nifti": "<volume>_masks/_probs (H, W, D, k), _saliency/_uncertainty (H, W, D) on the input volume's "
                        "grid: its affine, and its full H x W with 0 outside a --crop (a PNG input: identity affine)"
               if want_nifti else None,
               "crop": args.crop,
               "nifti_norm": args.nifti_norm if any(geo is not None for _, _, geo in loaded) else None,
               "outputs": written}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"sampled {len(items)} image(s) x {k} mask(s); wrote {out}")
    return 0


# --------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .trainer import load_model

    if args.synthetic == (args.data is not None):
        raise ValueError("data: give a data set path or --synthetic (exactly one of them)")
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out: {out} is a folder; give the path of the JSON file to write")
    _refuse_existing([out], args.overwrite)
    device = _device(args.device)
    model = load_model(args.checkpoint, preset=args.preset, weights=args.weights, map_location=device)
    if args.synthetic:
        dataset = _synthetic(args.synthetic_size, model.image_size, SYNTHETIC_TEST_SEED)
    else:
        _, dataset = _open_dataset(args.data, args.dataset, args.split, "eval", args.seed, args.crop)
    result = evaluate(model, dataset, protocol=args.protocol, k=args.k, steps=args.steps, seed=args.seed,
                      eta=args.eta, sampler=args.sampler, batch=args.batch, limit=args.limit,
                      max_batch=args.max_batch, backend=args.backend, per_image=args.per_image,
                      progress=not args.no_progress)
    result["checkpoint"] = str(Path(args.checkpoint).resolve())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    shown = "   ".join(f"{k} = {v:.4f}" if v is not None else f"{k} = n/a" for k, v in result["metrics"].items())
    print(f"{result['protocol']} protocol, {result['n_images']} images: {shown}")
    if result["protocol"] == "lidc":
        print("(GED is the squared form D^2_GED, as the paper reports it)")
    else:
        n_empty = result["n_empty_target"]
        print(f"(Dice, Dice1: all {result['n_images']} slices, the {n_empty} tumour-free ones scoring 100 when "
              f"nothing is predicted there; Dice_nonempty, Dice1_nonempty: the {result['n_images'] - n_empty} "
              f"slices with tumour only)")
    print(f"wrote {out}")
    return 0


# --------------------------------------------------------------------------- demo and bench


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(out=args.out, minutes=args.minutes, train_size=args.train_size, test_size=args.test_size,
                      k=args.k, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                      ema_decay=args.ema or None, overwrite=args.overwrite, progress=not args.no_progress)
    k = args.k
    c = result["comparison"]
    print(f"BerDiff:  GED{k} = {c[f'GED{k}_berdiff']:.4f}   HM-IoU{k} = {result[f'HM-IoU{k}']:.4f}   "
          f"({result['train']['steps']} training steps, sampling {result['sampling_seconds']} s)")
    print(f"baseline: GED{k} = {c[f'GED{k}_baseline']:.4f}   HM-IoU{k} = {result['baseline'][f'HM-IoU{k}']:.4f}   "
          f"({result['train']['baseline_steps']} training steps)   (GED in the squared form, as the paper)")
    cal = result["calibration"]["saliency_vs_annotator_frequency"]
    print(f"saliency vs annotator frequency: MAE {cal['mae_active']:.4f}, ECE {cal['ece_active']:.4f} "
          f"(active pixels)")
    print(f"wrote {args.out}/metrics.json, demo.png, model.safetensors, baseline.safetensors")
    return 0


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _bench(args: argparse.Namespace) -> int:
    script = _repo_root() / "benchmarks" / f"{args.which}.py"
    if not script.is_file():
        raise FileNotFoundError(f"{script}: benchmark script not found (the benchmarks ship with the source "
                                f"checkout, not the wheel)")
    return subprocess.call([sys.executable, str(script), *args.args])


# --------------------------------------------------------------------------- the parser


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=_positive_int, default=16, help="samples per image (default: 16)")
    p.add_argument("--steps", type=_positive_int,
                   help="DDIM steps (default: 50, or T if smaller); --sampler ddpm always takes all T steps")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="sampler (default: ddim)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity in [0, 1] (default: 1)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--batch", type=_positive_int, default=8, help="images per sampling call (default: 8)")
    p.add_argument("--max-batch", type=_positive_int, default=256,
                   help="most U-Net rows (images x samples) per forward pass (default: 256)")
    p.add_argument("--preset", choices=("lidc", "brats", "tiny"),
                   help="require the checkpoint to be of this preset (error otherwise)")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="for a training checkpoint: EMA or raw weights (default: auto = EMA when stored; "
                        "a model.safetensors holds one set and takes auto only)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--backend", choices=("torch", "triton", "cpu", "cuda"),
                   help="backend of the fused Bernoulli ops (default: automatic)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berdiff-fast", description="Conditional Bernoulli diffusion (BerDiff) for "
                                "binary medical image segmentation")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # train ------------------------------------------------------------------------------------
    t = sub.add_parser("train", help="train BerDiff (or the deterministic baseline) on LIDC, BRATS or synthetic data",
                       description="Train with AdamW, EMA, gradient clipping, bf16 autocast on CUDA, atomic "
                                   "checkpoints and --resume. Defaults are the paper's: batch 32, lr 5e-5 (LIDC) "
                                   "or 1e-4 (BRATS), linear schedule, T = 1000. Multi-GPU: torchrun "
                                   "--nproc_per_node N -m berdiff_fast.cli train ... (the batch is the global one).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("data", nargs="?", help="data set path: LIDC (lidc_crops root, ProbUNet pickle, PHiSeg HDF5) "
                                           "or a BRATS 2021 root; the format is detected")
    t.add_argument("--synthetic", action="store_true", help="train on the embedded synthetic lesions instead")
    t.add_argument("--synthetic-size", type=_positive_int, default=2000, help="synthetic training images")
    t.add_argument("--dataset", choices=DATASETS, default="auto", help="data set kind")
    t.add_argument("--split", choices=("train", "val", "test"), default="train", help="split to train on")
    t.add_argument("--crop", type=_positive_int, help="centre crop (default: 128 for LIDC, 224 for BRATS)")
    t.add_argument("--model", choices=("berdiff", "baseline"), default="berdiff",
                   help="BerDiff or the deterministic U-Net baseline (BCE, same backbone)")
    t.add_argument("--preset", choices=("lidc", "brats", "tiny"),
                   help="network preset (default: lidc / brats by data set, tiny for --synthetic)")
    t.add_argument("--image-size", type=_positive_int, help="override the preset's image size")
    t.add_argument("--image-channels", type=_positive_int, help="override the preset's image channels "
                                                                   "(e.g. 4 to train the tiny preset on BRATS)")
    t.add_argument("--schedule", choices=("linear", "cosine"), default="linear", help="noise schedule")
    t.add_argument("--T", type=_positive_int, default=1000, help="diffusion steps")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="global batch size")
    t.add_argument("--lr", type=_positive_float, help="learning rate (default: 5e-5 LIDC, 1e-4 BRATS, 5e-4 synthetic)")
    t.add_argument("--weight-decay", type=_nonneg_float, default=0.0, help="AdamW weight decay")
    t.add_argument("--ema", type=_unit_float, default=0.9999, help="EMA decay (0: no EMA)")
    t.add_argument("--grad-clip", type=_nonneg_float, default=1.0, help="max gradient norm (0: no clipping)")
    t.add_argument("--steps", type=_positive_int, help="total steps to reach (a resumed run continues up to it)")
    t.add_argument("--minutes", type=_positive_float, help="wall-clock budget of this run")
    t.add_argument("--ckpt-every", type=_positive_int, default=1000, help="checkpoint every N steps")
    t.add_argument("--log-every", type=_positive_int, default=10, help="log to CSV/TensorBoard every N steps")
    t.add_argument("--seed", type=_nonneg_int, default=0,
                   help=f"seed of the data order, t and noise, and of the --synthetic images "
                        f"({SYNTHETIC_TEST_SEED} is refused with --synthetic: it makes the synthetic test set)")
    t.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="bf16 autocast (CUDA only)")
    t.add_argument("--backend", choices=("torch", "triton", "cpu", "cuda"),
                   help="backend of the fused noising and loss ops (default: automatic)")
    t.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    t.add_argument("--workers", type=_nonneg_int, default=0, help="DataLoader worker processes")
    t.add_argument("--tensorboard", choices=("auto", "on", "off"), default="auto",
                   help="TensorBoard logs in OUT/tb (auto: when the package is installed)")
    t.add_argument("--out", required=True, help="output folder (checkpoint, weights, metrics.csv, tb/)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in OUT")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    # sample -----------------------------------------------------------------------------------
    s = sub.add_parser("sample", help="draw k masks per input image; write masks, probabilities, saliency, "
                                      "uncertainty (PNG / NIfTI) and an overlay figure",
                       description="Segment a PNG, a NIfTI volume (slice by slice), a BRATS case folder or a "
                                   "folder of PNG/NIfTI files. PNG outputs go to OUT/<image>/ (mask_XX.png, "
                                   "prob_XX.png, saliency.png, uncertainty.png, overlay.png); NIfTI outputs to "
                                   "OUT/<volume>_{masks,probs,saliency,uncertainty}.nii.gz.")
    s.add_argument("checkpoint", help="model.safetensors or a training checkpoint.safetensors")
    s.add_argument("inputs", help="a .png, .nii/.nii.gz, or a folder of them")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--crop", type=_positive_int, help="centre-crop inputs to this size (e.g. 128 for 180x180 crops)")
    s.add_argument("--format", choices=("auto", "png", "nifti", "both"), default="auto",
                   help="output format (default: auto = PNG, plus NIfTI for NIfTI inputs)")
    s.add_argument("--nifti-norm", choices=("zscore", "none"), default="zscore",
                   help="how NIfTI voxels become image values: zscore (default: per volume and channel over the "
                        "nonzero voxels, as BRATS training images) or none (the stored values: for volumes already "
                        "scaled as the model's training images, e.g. [0, 1] for a model trained on LIDC PNGs)")
    s.add_argument("--no-figure", action="store_true", help="skip the overlay figures")
    _add_sampling_args(s)
    s.set_defaults(func=_sample)

    # evaluate ---------------------------------------------------------------------------------
    e = sub.add_parser("evaluate", help="the paper's protocol: GED16/8/4/1, HM-IoU16, Soft-Dice16 (LIDC), Dice "
                                        "(BRATS), CIMD; JSON out",
                       description="Evaluate a checkpoint on a data split. LIDC protocol: GED with 16, 8, 4, 1 "
                                   "samples (squared form D^2_GED, as the paper reports it), HM-IoU16, Soft-Dice16, "
                                   "CIMD S_c/D_max/D_a/CI, saliency calibration. BRATS: Dice (%%) of the majority "
                                   "vote and of one sample, over all slices (a tumour-free slice predicted empty "
                                   "scores 100) and over the slices with tumour only (_nonempty). The data split "
                                   "is recorded in the JSON.")
    e.add_argument("checkpoint", help="model.safetensors or a training checkpoint.safetensors")
    e.add_argument("data", nargs="?", help="data set path (LIDC or BRATS; detected)")
    e.add_argument("--synthetic", action="store_true",
                   help=f"evaluate on the synthetic test set instead (data seed {SYNTHETIC_TEST_SEED}, whatever "
                        f"--seed; train --synthetic never trains on it)")
    e.add_argument("--synthetic-size", type=_positive_int, default=64, help="synthetic test images (default: 64)")
    e.add_argument("--dataset", choices=DATASETS, default="auto", help="data set kind (default: auto)")
    e.add_argument("--split", choices=("train", "val", "test"), default="test", help="split (default: test)")
    e.add_argument("--crop", type=_positive_int, help="centre crop (default: 128 for LIDC, 224 for BRATS)")
    e.add_argument("--protocol", choices=("auto", "lidc", "brats"), default="auto", help="metrics to compute")
    e.add_argument("--limit", type=_positive_int, help="evaluate only the first N images")
    e.add_argument("--per-image", action="store_true", help="also store every image's metrics")
    e.add_argument("--out", required=True, help="JSON file to write")
    _add_sampling_args(e)
    e.set_defaults(func=_evaluate)

    # demo -------------------------------------------------------------------------------------
    d = sub.add_parser("demo", help="train BerDiff and a deterministic baseline on synthetic lesions, compare",
                       description="Train the tiny preset on synthetic ambiguous lesions for half of --minutes, "
                                   "then the deterministic U-Net baseline for the same number of steps; draw k "
                                   "masks per held-out image; report GED16 (squared form, as the paper) for both, "
                                   "HM-IoU, Soft-Dice, CIMD and the saliency map's calibration against the "
                                   "annotators' per-pixel frequency; write metrics.json and a figure.")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--minutes", type=_positive_float, default=7.0,
                   help="training budget in minutes, shared by the two models (default: 7)")
    d.add_argument("--train-size", type=_positive_int, default=2000, help="synthetic training images (default: 2000)")
    d.add_argument("--test-size", type=_positive_int, default=32, help="held-out images to evaluate (default: 32)")
    d.add_argument("--k", type=_positive_int, default=16, help="samples per image (default: 16)")
    d.add_argument("--steps", type=_positive_int, default=10,
                   help="DDIM steps (default: 10, as the released sampler)")
    d.add_argument("--batch-size", type=_positive_int, default=32, help="batch size (default: 32)")
    d.add_argument("--lr", type=_positive_float, default=5e-4, help="learning rate of both models (default: 5e-4)")
    d.add_argument("--ema", type=_unit_float, default=0.999, help="EMA decay, 0 for none (default: 0.999)")
    d.add_argument("--seed", type=_nonneg_int, default=0)
    d.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)

    # bench ------------------------------------------------------------------------------------
    b = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (arguments pass through)",
                       description="Run benchmarks/<which>.py with the remaining arguments, e.g. "
                                   "`berdiff-fast bench --quick` or `berdiff-fast bench --which train_step -- "
                                   "--json out.json`. Use `berdiff-fast bench -- --help` for the script's help.")
    b.add_argument("--which", choices=BENCHMARKS, default="latency", help="benchmark script (default: latency)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # Everything after bench's own options goes to the script verbatim (argparse would
        # otherwise claim or reorder options such as --json PATH).
        head, rest = [], argv[1:]
        while rest and (rest[0] in ("-h", "--help", "--which") or rest[0].startswith("--which=")):
            take = 2 if rest[0] == "--which" else 1
            head, rest = head + rest[:take], rest[take:]
        args = parser.parse_args(["bench", *head])
        args.args = rest[1:] if rest[:1] == ["--"] else rest
    else:
        args = parser.parse_args(argv)
    from .trainer import TrainingDiverged

    try:
        return args.func(args)
    except TrainingDiverged as e:
        print(f"berdiff-fast {args.command}: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError, ImportError) as e:
        print(f"berdiff-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
