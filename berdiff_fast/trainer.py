"""The production trainer: AdamW, EMA, bf16 autocast on CUDA, gradient clipping, atomic resumable
checkpoints, DistributedDataParallel under ``torchrun``, CSV and TensorBoard logs.

It trains BerDiff (Algorithm 1: t ~ U{1..T} per image, y_t = y_0 XOR eps with the fused noising
op, the fused KL + BCE loss) and the deterministic baseline (``berdiff_fast.baseline``: BCE on the
mask) with the same loop.

Determinism. Everything random in a step is a pure function of (seed, step) or (seed, epoch):

- data order: epoch e reads ``torch.randperm(n)`` from a generator seeded ``mix_seed(seed, e)``;
  step s is batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` (the incomplete last
  batch is dropped), ``steps_per_epoch = n // batch_size``. Data sets with ``set_epoch`` (LIDC,
  BraTS, :class:`EpochAnnotations`) get it before each epoch, so the annotation drawn for an image
  is a function of (seed, epoch, index) too;
- per step: the global batch's t and the Philox seed of its noise come from a generator seeded
  ``mix_seed(seed, step, 1)``. Process r of W holds the contiguous slice r of the global batch
  and draws its noise at Philox offset ``r * (batch / W) * H * W``: W processes compute the same
  numbers as one process with the whole batch.

A resumed run therefore reads the same images, timesteps and noise as an uninterrupted one; the
global torch RNG states (dropout) of every process are stored in the checkpoint and restored.

Files in ``out`` (rank 0 writes them):

    checkpoint.safetensors  the training state: ``model.*`` weights, ``ema.*`` EMA weights,
                            ``optim.*`` AdamW moments, ``rng.*`` RNG states; step, data order,
                            configs and the data set trained on (the first run's ``split_info``
                            and its ``data_identity``, checked on resume) as JSON metadata.
                            Written to a temporary file, fsynced, then renamed over the previous
                            one (os.replace), every ``ckpt_every`` steps and at the end. Never
                            unpickled: safetensors holds tensors only.
    model.safetensors       the weights for inference (the EMA weights when EMA is on), loadable
                            with ``BerDiff.load`` / ``DeterministicUNet.load`` / :func:`load_model`.
    metrics.csv             step, epoch, loss, grad_norm, lr, ema_decay, steps_per_s, elapsed_s.
    tb/                     TensorBoard event files (when tensorboard is installed).
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import _checks as check
from .baseline import DeterministicUNet
from .data._common import draw_annotation, mix_seed
from .model import _META_KEY, BerDiff, diffusion_losses, read_checkpoint, write_safetensors_atomic
from .unet import UNetConfig

TRAINER_KEY = "berdiff_trainer"
CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
METRICS_CSV = "metrics.csv"
TB_DIR = "tb"
AMP_MODES = ("auto", "bf16", "off")
TENSORBOARD_MODES = ("auto", "on", "off")
CSV_FIELDS = ("step", "epoch", "loss", "grad_norm", "lr", "ema_decay", "steps_per_s", "elapsed_s")
# Fields that fix the data order and the per-step randomness: a resume must keep them.
_ORDER_FIELDS = ("seed", "batch_size")
# split_info fields that say where the data lie, not which data they are: a data set moved to
# another disk (a cluster's scratch folder) is still the same data set.
_LOCATION_FIELDS = ("path",)


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN or inf; the last good checkpoint is untouched."""


@dataclass
class TrainConfig:
    """Hyperparameters of :class:`Trainer` (defaults: the paper's AdamW, batch 32).

    steps: total optimisation steps to reach (a resumed run continues up to it); minutes: the
    wall-clock budget of this run. At least one of the two. batch_size is the global batch,
    split evenly over the processes. ema_decay None (or 0) turns EMA off; grad_clip None (or 0)
    turns clipping off (the norm is still computed and logged). amp "auto" is bf16 autocast
    on CUDA and off on CPU. backend: the fused ops' backend (None: automatic).
    """

    steps: int | None = None
    minutes: float | None = None
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    ema_decay: float | None = 0.9999
    ema_warmup: bool = True
    grad_clip: float | None = 1.0
    amp: str = "auto"
    ckpt_every: int = 1000
    log_every: int = 10
    seed: int = 0
    backend: str | None = None
    compile: bool = False
    num_workers: int = 0
    tensorboard: str = "auto"

    def validate(self) -> "TrainConfig":
        if self.steps is None and self.minutes is None:
            raise ValueError("steps/minutes: give a step budget (steps), a time budget (minutes), or both")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"steps: expected a positive int, got {self.steps!r}")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and self.minutes > 0):
            raise ValueError(f"minutes: expected a positive number, got {self.minutes!r}")
        for name in ("batch_size", "ckpt_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: expected a non-negative number, got {self.weight_decay!r}")
        if self.ema_decay is not None and not (0 <= self.ema_decay < 1):
            raise ValueError(f"ema_decay: expected a number in [0, 1) (0 or None: no EMA), got {self.ema_decay!r}")
        if self.grad_clip is not None and not self.grad_clip >= 0:
            raise ValueError(f"grad_clip: expected a non-negative max norm (0 or None: no clipping), "
                             f"got {self.grad_clip!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: unknown {self.amp!r}; expected one of {AMP_MODES}")
        if self.tensorboard not in TENSORBOARD_MODES:
            raise ValueError(f"tensorboard: unknown {self.tensorboard!r}; expected one of {TENSORBOARD_MODES}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {self.seed!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"num_workers: expected a non-negative int, got {self.num_workers!r}")
        self.betas = tuple(self.betas)
        return self

    @property
    def ema_on(self) -> bool:
        return bool(self.ema_decay)


# --------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of a model's floating-point state.

    After optimisation step n (n = 1, 2, ...): shadow <- d_n * shadow + (1 - d_n) * weights, with
    d_n = min(decay, (1 + n) / (10 + n)) when ``warmup`` (ADM's and TensorFlow's warm-up, so that
    short runs are not dominated by the initial weights) and d_n = decay otherwise.
    Non-floating buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        if not 0 <= decay < 1:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        self.decay, self.warmup = float(decay), warmup
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, n: int) -> float:
        d = self.decay_at(n)
        state = model.state_dict()
        floats = [k for k, v in self.shadow.items() if v.is_floating_point()]
        if floats:
            torch._foreach_lerp_([self.shadow[k] for k in floats], [state[k].detach() for k in floats], 1.0 - d)
        for k, v in self.shadow.items():
            if not v.is_floating_point():
                v.copy_(state[k])
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"ema: the stored EMA misses {sorted(missing)[:3]}")
        for k, v in self.shadow.items():
            v.copy_(state[k])

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)


# --------------------------------------------------------------------------- data


class EpochAnnotations(torch.utils.data.Dataset):
    """Training items from a data set of ``{"image", "masks"}`` items: adds ``mask``, the annotation
    ``draw_annotation(seed, epoch, index, A)`` (a pure function, so resumed and multi-process runs
    draw the same). Call ``set_epoch`` each epoch (the trainer does)."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0
        self.split_info = getattr(dataset, "split_info", {})

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        masks = item["masks"]
        a = draw_annotation(self.seed, self.epoch, i, masks.shape[0])
        item["mask"] = masks[a:a + 1].float()
        return item


class DataOrder:
    """Which images process ``rank`` of ``world`` reads at each step (see the module docstring)."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int):
        if n < batch_size:
            raise ValueError(f"dataset: {n} images, fewer than the global batch size {batch_size}; "
                             f"lower batch_size (--batch-size) or use more data")
        if batch_size % world:
            raise ValueError(f"batch_size: the global batch {batch_size} does not split evenly over {world} processes")
        self.n, self.batch_size, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.local = batch_size // world
        self.steps_per_epoch = n // batch_size
        self._perm: tuple[int, torch.Tensor] | None = None

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within the epoch) of the step after ``step`` completed steps."""
        return divmod(step, self.steps_per_epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_indices(self, step: int) -> list[int]:
        epoch, pos = self.position(step)
        return self.permutation(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()

    def indices(self, step: int) -> list[int]:
        idx = self.global_indices(step)
        return idx[self.rank * self.local:(self.rank + 1) * self.local]


def _collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k in ("image", "mask")}
    out["name"] = [str(it.get("name", "")) for it in items]
    return out


def step_randomness(seed: int, step: int, batch_size: int, T: int) -> tuple[torch.Tensor, int]:
    """The global batch's timesteps (batch_size,) in 1..T and the Philox seed of the noise of ``step``."""
    g = torch.Generator().manual_seed(mix_seed(seed, step, 1))
    t = torch.randint(1, T + 1, (batch_size,), generator=g)
    return t, int(torch.randint(0, 2**62, (1,), generator=g).item())


# --------------------------------------------------------------------------- checkpoint files


def model_kind(config: dict) -> str:
    return config.get("kind", "berdiff")


def build_model(config: dict) -> BerDiff | DeterministicUNet:
    """An untrained model from a stored config (BerDiff or the deterministic baseline)."""
    kind = model_kind(config)
    unet = UNetConfig.from_dict(config["unet"])
    if kind == "berdiff":
        return BerDiff(unet, schedule=config["schedule"], T=config["T"], preset=config.get("preset"))
    if kind == DeterministicUNet.kind:
        return DeterministicUNet(unet, preset=config.get("preset"))
    raise ValueError(f"model kind: unknown {kind!r}; expected 'berdiff' or {DeterministicUNet.kind!r}")


def load_model(path, *, preset: str | None = None, weights: str = "auto",
               map_location: str | torch.device = "cpu") -> BerDiff | DeterministicUNet:
    """Load a model from ``model.safetensors`` (BerDiff or baseline) or a training ``checkpoint.safetensors``.

    weights: for a training checkpoint, "ema" (the EMA weights), "raw" (the optimised weights)
    or "auto" (EMA when stored). A weights file holds a single set, loaded with "auto"; "ema" or
    "raw" on it is a ValueError. preset: when given, a checkpoint of another preset is an error.
    """
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights: unknown {weights!r}; expected 'auto', 'ema' or 'raw'")
    config, state = read_checkpoint(path)
    if preset is not None and config.get("preset") != preset:
        raise ValueError(f"{path}: a checkpoint of preset {config.get('preset')!r}, but preset {preset!r} was "
                         f"requested; pass the matching --preset or another checkpoint")
    training_checkpoint = any(k.startswith("model.") for k in state) and not any(k.startswith("unet.") for k in state)
    if weights != "auto" and not training_checkpoint:
        # A weights file holds one set (the EMA weights when training used EMA) and does not say
        # which: returning it for "raw" or "ema" could hand back the other set silently.
        raise ValueError(f"weights: {weights!r} chooses between the raw and EMA weights of a training checkpoint, "
                         f"but {path} is a weights file holding one set (EMA when the run used EMA); pass "
                         f"weights='auto' (--weights auto), or the run's {CHECKPOINT}")
    if training_checkpoint:
        has_ema = any(k.startswith("ema.") for k in state)
        if weights == "ema" and not has_ema:
            raise ValueError(f"{path}: this training checkpoint holds no EMA weights (trained without EMA); "
                             f"use weights='raw'")
        prefix = "ema." if has_ema and weights != "raw" else "model."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        model = build_model(config)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: the stored config is incomplete ({e})") from e
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the config stored with them: {e}") from e
    return model.to(map_location).eval()


def data_identity(split_info: dict) -> str:
    """sha256 (hex) of a data set's ``split_info`` without its location fields (``path``): equal
    for the same data set and split, wherever it is stored. A data set without split_info has
    the identity of ``{}`` and cannot be told from another one."""
    kept = {k: v for k, v in (split_info or {}).items() if k not in _LOCATION_FIELDS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _describe_data(info: dict) -> str:
    shown = [f"{k}={info[k]!r}" for k in ("dataset", "split", "n_images", "seed", "path") if k in info]
    return ", ".join(shown) if shown else "a data set without split_info"


def checkpoint_info(path) -> dict:
    """The trainer state stored in a training checkpoint (step, configs, data order), without its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(TRAINER_KEY)
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors checkpoint (corrupt or truncated?): {e}") from e
    if raw is None:
        raise ValueError(f"{path}: a weights file, not a training checkpoint (no trainer state)")
    return json.loads(raw)


# --------------------------------------------------------------------------- the trainer


def _dist_env() -> tuple[int, int, int]:
    return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
            int(os.environ.get("LOCAL_RANK", "0")))


class Trainer:
    """Train a BerDiff or DeterministicUNet model on ``dataset`` (items with ``image`` (C,H,W) and
    ``mask`` (1,H,W), or ``masks`` (A,H,W) from which one is drawn per epoch).

    Args:
        model: the model (moved to this process's device).
        dataset: the training data set.
        config: a :class:`TrainConfig`.
        out: output folder for checkpoints and logs; None trains in memory only.
        resume: continue from ``out/checkpoint.safetensors`` (required to exist) with the same
            model options, seed, batch size and data set (``split_info`` equal but for its path).
        overwrite: replace the files of an earlier run in ``out`` instead of refusing.
        progress: a tqdm bar on rank 0.
        device: None picks cuda:LOCAL_RANK when CUDA is available, else cpu.

    Under ``torchrun`` (WORLD_SIZE > 1) it joins the process group (nccl on CUDA, gloo on CPU)
    and wraps the model in DistributedDataParallel.
    """

    def __init__(self, model: BerDiff | DeterministicUNet, dataset, config: TrainConfig, out=None, *,
                 resume: bool = False, overwrite: bool = False, progress: bool = True,
                 device: str | torch.device | None = None, log=None):
        if not isinstance(model, (BerDiff, DeterministicUNet)):
            raise ValueError(f"model: expected a BerDiff or DeterministicUNet, got {type(model).__name__}")
        self.cfg = config.validate()
        self.model = model
        self.progress = progress
        self._log_fn = log
        self.world, self.rank, self.local_rank = _dist_env()
        self._owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            self._owns_group = True
        if dist.is_initialized():
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = check.canonical_device(device)  # "cuda" -> "cuda:N": set_device needs the index
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.cfg.amp == "bf16" and self.device.type != "cuda":
            raise ValueError("amp: bf16 autocast runs on CUDA only; use amp='auto' or 'off' on CPU")
        self.autocast = self.device.type == "cuda" and self.cfg.amp in ("auto", "bf16")
        model.to(self.device)

        self.dataset = self._prepare_dataset(dataset)
        # The data set the run trains on, kept from its first run through every resume.
        self.split_info = dict(getattr(self.dataset, "split_info", {}) or {})
        self.order = DataOrder(len(self.dataset), self.cfg.batch_size, self.world, self.rank, self.cfg.seed)

        self.optimizer = torch.optim.AdamW(model.parameters(), lr=self.cfg.lr, betas=self.cfg.betas,
                                           weight_decay=self.cfg.weight_decay)
        self.ema = EMA(model, self.cfg.ema_decay, self.cfg.ema_warmup) if self.cfg.ema_on else None
        net: nn.Module = model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            net = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            net = torch.compile(net)
        self.net = net
        self.step = 0
        self.elapsed = 0.0  # training seconds over all runs (resumed ones included)
        self.last_saved: int | None = None
        self.last_loss: float | None = None

        self.out = Path(out) if out is not None else None
        self._csv = self._tb = None
        if self.out is not None:
            self._prepare_out(resume, overwrite)
        elif resume:
            raise ValueError("resume: needs an output folder (out) holding the checkpoint to resume from")

    # -- set-up -----------------------------------------------------------------------------

    def _prepare_dataset(self, dataset):
        n = len(dataset)
        if n == 0:
            raise ValueError("dataset: is empty (no images to train on)")
        item = dataset[0]
        if "mask" not in item and "masks" not in item:
            raise ValueError(f"dataset: items need 'image' and 'mask' (or 'masks'); got keys {sorted(item)}")
        if "masks" in item and ("mask" not in item or not hasattr(dataset, "set_epoch")):
            # Draw the annotation as a function of (seed, epoch, index), so that a resumed or
            # multi-process run reads the same masks (a stateful per-access draw would not).
            dataset = EpochAnnotations(dataset, self.cfg.seed)
            item = dataset[0]
        image, mask = item["image"], item["mask"]
        c, s = self.model.image_channels, self.model.image_size
        where = f"dataset item 0{' (' + str(item['name']) + ')' if item.get('name') else ''}"
        if not isinstance(image, torch.Tensor) or tuple(image.shape) != (c, s, s):
            got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"{where}: image of shape {got}, but the model (preset {self.model.preset!r}) takes "
                             f"{(c, s, s)} (channels, height, width)")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (1, s, s):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"{where}: mask of shape {got}, expected {(1, s, s)}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{where}: mask values must be 0 or 1")
        return dataset

    def _info(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self._log_fn is not None:
            self._log_fn(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    @property
    def checkpoint_path(self) -> Path | None:
        return self.out / CHECKPOINT if self.out is not None else None

    def _prepare_out(self, resume: bool, overwrite: bool) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"out: {out} exists and is not a folder")
        ours = [out / n for n in (CHECKPOINT, WEIGHTS, METRICS_CSV, TB_DIR)]
        if resume:
            if not self.checkpoint_path.is_file():
                raise FileNotFoundError(f"{self.checkpoint_path}: no checkpoint to resume from "
                                        f"(start without --resume, or point --out at the earlier run)")
            self._load_checkpoint(self.checkpoint_path)
        else:
            existing = [p for p in ours if p.exists()]
            if existing and not overwrite:
                raise FileExistsError(f"out: {', '.join(map(str, existing))} already exist(s); pass --overwrite to "
                                      f"replace them, --resume to continue that run, or choose another --out")
            self._barrier()
            if self.rank == 0 and existing:
                import shutil

                for p in existing:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        self._barrier()
        if self.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            self._open_logs()

    def _open_logs(self) -> None:
        path = self.out / METRICS_CSV
        rows = []
        if path.exists():  # resuming: drop the rows of steps lost with the kill
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= self.step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in CSV_FIELDS} for r in rows)
        self._csv = open(path, "a", newline="")
        self._csv_writer = csv.DictWriter(self._csv, fieldnames=CSV_FIELDS)
        if self.cfg.tensorboard == "off":
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            if self.cfg.tensorboard == "on":
                raise ImportError("tensorboard: logging was requested but the 'tensorboard' package is missing: "
                                  "pip install tensorboard (or pass --tensorboard off)") from e
            self._info("note: TensorBoard logging is off (the 'tensorboard' package is not installed: "
                       "pip install tensorboard); metrics go to metrics.csv only")
            return
        self._tb = SummaryWriter(str(self.out / TB_DIR), purge_step=self.step + 1 if self.step else None)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # -- checkpoints ---------------------------------------------------------------------------

    def _gather_rng(self) -> dict[str, torch.Tensor]:
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world == 1:
            return {f"rng.{k}.0": v for k, v in states.items()}
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, states)
        return {f"rng.{k}.{r}": v for r, s in enumerate(gathered) for k, v in s.items()}

    def _trainer_meta(self) -> dict:
        epoch, pos = self.order.position(self.step)
        opt = self.optimizer.state_dict()
        return {
            "format_version": 1,
            "kind": model_kind(self.model.config),
            "step": self.step,
            "elapsed_s": self.elapsed,
            "last_loss": self.last_loss,
            "world_size": self.world,
            "dataset_len": self.order.n,
            "train_config": asdict(self.cfg),
            "data_order": {"epoch": epoch, "batch_in_epoch": pos, "steps_per_epoch": self.order.steps_per_epoch,
                           "rule": "epoch e: torch.randperm(n) seeded mix_seed(seed, e); step s: batch "
                                   "s % steps_per_epoch of epoch s // steps_per_epoch"},
            "optimizer": {"param_groups": opt["param_groups"],
                          "scalars": {str(i): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                                      for i, st in opt["state"].items()}},
            "split_info": self.split_info,
            "data_sha256": data_identity(self.split_info),
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint.safetensors`` and ``model.safetensors`` (all ranks call this)."""
        if self.out is None:
            return None
        rng = self._gather_rng()
        if self.rank == 0:
            tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
            if self.ema is not None:
                tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
            for i, st in self.optimizer.state_dict()["state"].items():
                tensors.update({f"optim.{i}.{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
            tensors.update(rng)
            meta = {_META_KEY: json.dumps(self.model.config), TRAINER_KEY: json.dumps(self._trainer_meta())}
            write_safetensors_atomic(self.checkpoint_path, tensors, meta)
            weights = self.ema.state_dict() if self.ema is not None else self.model.state_dict()
            write_safetensors_atomic(self.out / WEIGHTS, dict(weights), {_META_KEY: json.dumps(self.model.config)})
        self._barrier()
        self.last_saved = self.step
        return self.checkpoint_path

    def _load_checkpoint(self, path: Path) -> None:
        config, state = read_checkpoint(path)
        meta = checkpoint_info(path)
        mine = json.loads(json.dumps(self.model.config))  # tuples as the stored JSON holds them
        if model_kind(config) != model_kind(mine):
            raise ValueError(f"{path}: a checkpoint of a {model_kind(config)!r} model, but a {model_kind(mine)!r} "
                             f"model is being trained")
        if config.get("preset") != mine.get("preset"):
            raise ValueError(f"{path}: a checkpoint of preset {config.get('preset')!r}, but preset "
                             f"{mine.get('preset')!r} was requested")
        if config != mine:
            diff = sorted(k for k in set(config) | set(mine) if config.get(k) != mine.get(k))
            raise ValueError(f"{path}: the checkpoint's model config differs from the requested one in {diff}; "
                             f"resume with the same model options")
        stored = meta["train_config"]
        for name in _ORDER_FIELDS:
            if stored.get(name) != getattr(self.cfg, name):
                raise ValueError(f"{path}: the run was trained with {name}={stored.get(name)!r}, now "
                                 f"{getattr(self.cfg, name)!r}; the data order would not continue. Resume with "
                                 f"--{name.replace('_', '-')} {stored.get(name)}")
        self._check_same_data(path, meta)
        if meta["dataset_len"] != self.order.n:
            raise ValueError(f"{path}: the run was trained on {meta['dataset_len']} images, the data set now holds "
                             f"{self.order.n}; the data order would not continue")
        if bool(stored.get("ema_decay")) != self.cfg.ema_on:
            raise ValueError(f"{path}: the run was trained {'with' if stored.get('ema_decay') else 'without'} EMA; "
                             f"resume with the same --ema setting")
        self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v.to(self.device) for k, v in state.items() if k.startswith("ema.")})
        opt_state: dict = {}
        for k, v in state.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = v
        for i, scalars in meta["optimizer"]["scalars"].items():
            opt_state.setdefault(int(i), {}).update(scalars)
        groups = meta["optimizer"]["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
            g["lr"] = self.cfg.lr  # the learning rate of this run's config
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        if meta["world_size"] == self.world and f"rng.cpu.{self.rank}" in state:
            torch.set_rng_state(state[f"rng.cpu.{self.rank}"])
            if self.device.type == "cuda" and f"rng.cuda.{self.rank}" in state:
                torch.cuda.set_rng_state(state[f"rng.cuda.{self.rank}"], self.device)
        else:
            torch.manual_seed(mix_seed(self.cfg.seed, self.rank, meta["step"]))
            self._info(f"note: {path} was written by {meta['world_size']} process(es), now {self.world}: the "
                       f"global RNG (dropout) is reseeded; data order and noise continue unchanged")
        self.step = self.last_saved = int(meta["step"])
        self.elapsed = float(meta.get("elapsed_s", 0.0))
        self.last_loss = meta.get("last_loss")
        self._info(f"resumed from {path} at step {self.step}")

    def _check_same_data(self, path: Path, meta: dict) -> None:
        """Refuse to resume on another data set or split than the run's (its ``data_sha256``)."""
        stored, now = meta.get("split_info") or {}, self.split_info
        if "data_sha256" not in meta:
            self._info(f"warning: {path} was written before checkpoints recorded their data set, so resuming "
                       f"cannot check that this is the data the run was trained on ({_describe_data(now)}); "
                       f"it is recorded from now on")
            return
        if meta["data_sha256"] != data_identity(now):
            diff = sorted(k for k in (set(stored) | set(now)) - set(_LOCATION_FIELDS) if stored.get(k) != now.get(k))
            raise ValueError(f"{path}: the run was trained on {_describe_data(stored)}, but the data set now is "
                             f"{_describe_data(now)} (they differ in {', '.join(diff) or 'split_info'}); resume with "
                             f"the data set and split the run was trained on, or start a new run in another --out")
        self.split_info = stored  # the first run's record, its path included

    # -- the step ------------------------------------------------------------------------------

    def _amp(self):
        """bf16 autocast around the network on CUDA (the loss itself runs in float32)."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else nullcontext()

    def _losses(self, x: torch.Tensor, y0: torch.Tensor, step: int) -> torch.Tensor:
        """Per-image losses (local batch,) of the step numbered ``step`` (0-based)."""
        if isinstance(self.model, DeterministicUNet):
            with self._amp():
                logits = self.net(x)
            return DeterministicUNet.bce(logits.float(), y0)
        sched = self.model.schedule
        t_all, seed = step_randomness(self.cfg.seed, step, self.cfg.batch_size, sched.T)
        lo = self.rank * self.order.local
        t = t_all[lo:lo + x.shape[0]].to(x.device)
        offset = lo * y0[0].numel()
        with self._amp():
            return diffusion_losses(self.net, sched, x, y0, t, seed, offset, backend=self.cfg.backend)

    def train_step(self, batch: dict) -> tuple[float, float]:
        """One optimisation step on a local batch; returns (mean loss over all processes, grad norm).

        Raises TrainingDiverged (before the weights change) when the loss or the gradient norm
        is not finite."""
        x = batch["image"].to(self.device, non_blocking=True)
        y0 = batch["mask"].to(self.device, non_blocking=True)
        self.model.train()
        loss = self._losses(x, y0, self.step).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mean_loss = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(mean_loss, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM)
            if self.device.type != "cuda":
                mean_loss /= self.world
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip else math.inf
        gnorm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        value = float(mean_loss)
        if not math.isfinite(value) or not math.isfinite(gnorm):
            self._diverged(value, gnorm, batch, x)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.last_loss = value
        return value, gnorm

    def _diverged(self, value: float, gnorm: float, batch: dict, x: torch.Tensor):
        what = f"the loss became {value}" if not math.isfinite(value) else f"the gradient norm became {gnorm}"
        msg = f"training stopped: {what} at step {self.step + 1}"
        bad = [n for n, img in zip(batch.get("name", []), x) if not bool(torch.isfinite(img).all())]
        if not bool(torch.isfinite(x).all()):
            msg += f"; the batch holds non-finite image values ({', '.join(bad[:5]) or 'unnamed items'})"
        if self.last_saved is not None and self.out is not None:
            msg += f". The last good checkpoint, {self.checkpoint_path} (step {self.last_saved}), is left as it was"
        elif self.out is not None:
            msg += ". No checkpoint had been written yet"
        msg += ". Lower the learning rate (--lr), keep gradient clipping on, or check the data."
        self.close()
        raise TrainingDiverged(msg)

    # -- the loop ------------------------------------------------------------------------------

    def _loader(self, epoch: int, first: int):
        steps = range(epoch * self.order.steps_per_epoch + first, (epoch + 1) * self.order.steps_per_epoch)
        batches = [self.order.indices(s) for s in steps]
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.cfg.num_workers,
                                           collate_fn=_collate, pin_memory=self.device.type == "cuda")

    def _should_stop(self, deadline: float) -> bool:
        stop = self.cfg.steps is not None and self.step >= self.cfg.steps
        if not stop and deadline != math.inf:
            flag = torch.tensor([float(time.monotonic() >= deadline)])
            if self.world > 1:
                flag = flag.to(self.device)
                dist.broadcast(flag, 0)
            stop = bool(flag.item())
        return stop

    def fit(self) -> dict:
        """Train until ``steps`` or ``minutes``; returns {"steps", "start_step", "seconds", "loss", "stopped"}."""
        cfg = self.cfg
        start_step, t0 = self.step, time.monotonic()
        deadline = t0 + 60 * cfg.minutes if cfg.minutes is not None else math.inf
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"training {model_kind(self.model.config)}",
                       unit="step", dynamic_ncols=True)
        losses: list[float] = []
        window: list[tuple[float, float]] = []
        t_log = time.monotonic()
        stopped = "steps"
        try:
            while not self._should_stop(deadline):
                epoch, pos = self.order.position(self.step)
                for batch in self._loader(epoch, pos):
                    loss, gnorm = self.train_step(batch)
                    losses.append(loss)
                    window.append((loss, gnorm))
                    if bar is not None:
                        bar.update(1)
                        if self.step % 10 == 0 or self.step == cfg.steps:
                            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
                    if self.step % cfg.log_every == 0:
                        now = time.monotonic()
                        self._log_row(epoch, window, len(window) / max(now - t_log, 1e-9),
                                      self.elapsed + now - t0)
                        window, t_log = [], now
                    if self.step % cfg.ckpt_every == 0:
                        self.elapsed += time.monotonic() - t0
                        t0 = time.monotonic()
                        self.save_checkpoint()
                    if self._should_stop(deadline):
                        break
            if cfg.steps is None or self.step < cfg.steps:
                stopped = "time"
            self.elapsed += time.monotonic() - t0
            t0 = time.monotonic()
            if self.out is not None and self.last_saved != self.step:
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self.model.eval()
        self.close()
        return {"steps": self.step, "start_step": start_step, "seconds": self.elapsed, "loss": losses,
                "stopped": stopped}

    def _log_row(self, epoch: int, window: list[tuple[float, float]], steps_per_s: float, elapsed: float) -> None:
        if self.rank != 0 or not window:
            return
        row = {"step": self.step, "epoch": epoch, "loss": sum(w[0] for w in window) / len(window),
               "grad_norm": sum(w[1] for w in window) / len(window), "lr": self.optimizer.param_groups[0]["lr"],
               "ema_decay": self.ema.decay_at(self.step) if self.ema is not None else 0.0,
               "steps_per_s": steps_per_s, "elapsed_s": elapsed}
        if self._csv is not None:
            self._csv_writer.writerow(row)
            self._csv.flush()
        if self._tb is not None:
            for k in ("loss", "grad_norm", "lr", "steps_per_s"):
                self._tb.add_scalar(f"train/{k}", row[k], self.step)

    def close(self) -> None:
        """Close the log files (and leave the process group if this trainer joined it)."""
        if self._csv is not None:
            self._csv.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False
