"""The trainer: EMA math, data order, atomic checkpoints, exact resume, resume after SIGKILL,
divergence handling, logs, and DistributedDataParallel with gloo on 2 CPU processes."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from berdiff_fast.model import BerDiff
from berdiff_fast.synthetic import SyntheticLesions
from berdiff_fast.train import train
from berdiff_fast.trainer import (CHECKPOINT, EMA, WEIGHTS, DataOrder, Trainer, TrainConfig, TrainingDiverged,
                                  checkpoint_info, load_model, step_randomness, write_safetensors_atomic)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def _env():
    path = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def _model(seed=0):
    torch.manual_seed(seed)
    return BerDiff.from_preset("tiny", image_size=16)


def _data(n=32, seed=0):
    return SyntheticLesions(n, size=16, seed=seed, mode="eval")


def _cfg(**kw):
    base = dict(steps=6, batch_size=8, lr=5e-4, ckpt_every=3, log_every=1, ema_decay=0.99, tensorboard="off")
    base.update(kw)
    return TrainConfig(**base)


def _csv_steps(path):
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


# --------------------------------------------------------------------------- EMA


def test_ema_update_is_the_exponential_average():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    net.register_buffer("count", torch.tensor(7))
    ema = EMA(net, decay=0.9, warmup=False)
    w0 = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
        net.bias.mul_(-2.0)
        net.count.fill_(9)
    assert ema.update(net, 1) == 0.9
    for k in ("weight", "bias"):
        torch.testing.assert_close(ema.shadow[k], 0.9 * w0[k] + 0.1 * net.state_dict()[k], rtol=0, atol=1e-7)
    assert int(ema.shadow["count"]) == 9  # integer buffers are copied, not averaged
    # A second update composes: s2 = d s1 + (1 - d) w.
    s1 = {k: v.clone() for k, v in ema.shadow.items()}
    ema.update(net, 2)
    torch.testing.assert_close(ema.shadow["weight"], 0.9 * s1["weight"] + 0.1 * net.weight, rtol=0, atol=1e-7)


def test_ema_warmup_decay_schedule():
    ema = EMA(nn.Linear(1, 1), decay=0.999, warmup=True)
    assert ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(100) == pytest.approx(101 / 110)
    assert ema.decay_at(10**6) == 0.999
    assert EMA(nn.Linear(1, 1), decay=0.999, warmup=False).decay_at(1) == 0.999
    with pytest.raises(ValueError, match="decay"):
        EMA(nn.Linear(1, 1), decay=1.0)


def test_trainer_ema_tracks_the_weights_step_by_step():
    model = _model()
    trainer = Trainer(model, _data(), _cfg(steps=3, ema_decay=0.5), progress=False)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    batch = {"image": torch.stack([_data()[i]["image"] for i in range(8)]),
             "mask": torch.stack([_data()[i]["masks"][:1].float() for i in range(8)])}
    for n in (1, 2, 3):
        trainer.train_step(batch)
        d = min(0.5, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * v for k, v in model.state_dict().items()}
    for k, v in expected.items():
        torch.testing.assert_close(trainer.ema.shadow[k], v, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- data order


def test_data_order_is_a_per_epoch_permutation_split_over_ranks():
    n, gb, world = 37, 8, 2
    orders = [DataOrder(n, gb, world, r, seed=5) for r in range(world)]
    assert orders[0].steps_per_epoch == 4
    seen = []
    for step in range(4):
        parts = [o.indices(step) for o in orders]
        assert all(len(p) == 4 for p in parts)
        assert parts[0] + parts[1] == orders[0].global_indices(step)  # rank slices in rank order
        seen += parts[0] + parts[1]
    assert len(set(seen)) == 32 and set(seen) <= set(range(n))  # each image at most once per epoch
    again = DataOrder(n, gb, world, 0, seed=5)
    assert again.indices(6) == orders[0].indices(6)  # a pure function of (seed, step)
    assert DataOrder(n, gb, 1, 0, seed=5).global_indices(0) != DataOrder(n, gb, 1, 0, seed=6).global_indices(0)
    assert orders[0].global_indices(0) != orders[0].global_indices(4)  # a new permutation each epoch
    t1, s1 = step_randomness(5, 3, 8, 1000)
    t2, s2 = step_randomness(5, 3, 8, 1000)
    assert torch.equal(t1, t2) and s1 == s2 and int(t1.min()) >= 1 and int(t1.max()) <= 1000


def test_data_set_errors_name_the_problem():
    with pytest.raises(ValueError, match="fewer than the global batch size 8"):
        Trainer(_model(), _data(4), _cfg(), progress=False)
    with pytest.raises(ValueError, match=r"image of shape \(1, 32, 32\).*takes \(1, 16, 16\)"):
        Trainer(_model(), SyntheticLesions(16, size=32, mode="eval"), _cfg(), progress=False)
    with pytest.raises(ValueError, match="dataset: is empty"):
        Trainer(_model(), [], _cfg(), progress=False)
    with pytest.raises(ValueError, match="does not split evenly"):
        DataOrder(32, 9, 2, 0, 0)
    with pytest.raises(ValueError, match="steps/minutes"):
        Trainer(_model(), _data(), TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="amp: bf16 autocast runs on CUDA only"):
        Trainer(_model(), _data(), _cfg(amp="bf16"), progress=False)


# --------------------------------------------------------------------------- checkpoints


def test_atomic_write_leaves_the_previous_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.safetensors"
    write_safetensors_atomic(path, {"a": torch.ones(3)}, {"k": "v"})
    with pytest.raises(Exception):
        # safetensors rejects metadata values that are not strings: the write fails midway.
        write_safetensors_atomic(path, {"a": torch.zeros(3)}, {"k": 1})
    assert torch.equal(load_file(str(path))["a"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors"]  # no temporary file left


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    full = Trainer(_model(), _data(), _cfg(steps=6), out=tmp_path / "full", progress=False)
    full.fit()

    first = Trainer(_model(), _data(), _cfg(steps=3), out=tmp_path / "split", progress=False)
    assert first.fit()["steps"] == 3
    second = Trainer(_model(seed=123), _data(), _cfg(steps=6), out=tmp_path / "split", resume=True, progress=False)
    assert second.step == 3
    hist = second.fit()
    assert hist["start_step"] == 3 and hist["steps"] == 6

    a = load_file(str(tmp_path / "full" / CHECKPOINT))
    b = load_file(str(tmp_path / "split" / CHECKPOINT))
    for k in a:
        if k.startswith(("model.", "ema.", "optim.")):
            assert torch.equal(a[k], b[k]), k
    assert checkpoint_info(tmp_path / "split" / CHECKPOINT)["step"] == 6
    assert _csv_steps(tmp_path / "split" / "metrics.csv") == [1, 2, 3, 4, 5, 6]
    # model.safetensors holds the EMA weights and loads as a BerDiff.
    m = load_model(tmp_path / "split" / WEIGHTS)
    assert isinstance(m, BerDiff)
    for k, v in m.state_dict().items():
        assert torch.equal(v, b[f"ema.{k}"])


def test_out_folder_protection_and_resume_errors(tmp_path):
    out = tmp_path / "run"
    Trainer(_model(), _data(), _cfg(steps=3), out=out, progress=False).fit()
    with pytest.raises(FileExistsError, match=r"checkpoint.safetensors.*--overwrite"):
        Trainer(_model(), _data(), _cfg(), out=out, progress=False)
    with pytest.raises(ValueError, match="preset 'tiny', but preset 'lidc'"):
        torch.manual_seed(0)
        Trainer(BerDiff.from_preset("lidc", image_size=16), _data(), _cfg(), out=out, resume=True, progress=False)
    with pytest.raises(ValueError, match="batch_size=8, now 16.*--batch-size 8"):
        Trainer(_model(), _data(), _cfg(batch_size=16), out=out, resume=True, progress=False)
    with pytest.raises(ValueError, match="trained on 32 images, the data set now holds 40"):
        Trainer(_model(), _data(40), _cfg(), out=out, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        Trainer(_model(), _data(), _cfg(), out=tmp_path / "empty", resume=True, progress=False)
    before = (out / CHECKPOINT).read_bytes()
    Trainer(_model(), _data(), _cfg(steps=1), out=out, overwrite=True, progress=False).fit()
    assert (out / CHECKPOINT).read_bytes() != before and checkpoint_info(out / CHECKPOINT)["step"] == 1


def _labelled(info, n=16):
    data = _data(n)
    data.split_info = info
    return data


def test_resume_on_another_data_set_is_refused_and_the_record_kept(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(steps=1, batch_size=4, ema_decay=None)
    a = {"dataset": "A", "split": "train", "n_images": 16, "path": "/data/a"}
    Trainer(_model(), _labelled(a), cfg, out=out, progress=False).fit()
    other = {"dataset": "B", "split": "val", "n_images": 16, "path": "/data/b"}  # same size: only the record differs
    with pytest.raises(ValueError, match=r"trained on dataset='A', split='train'.*, but the data set now is "
                                         r"dataset='B', split='val'.*\(they differ in dataset, split\)"):
        Trainer(_model(), _labelled(other), _cfg(steps=2, batch_size=4, ema_decay=None), out=out, resume=True,
                progress=False)
    # The same data moved to another folder resumes, and the checkpoint keeps the first run's record.
    moved = dict(a, path="/scratch/a")
    Trainer(_model(), _labelled(moved), _cfg(steps=2, batch_size=4, ema_decay=None), out=out, resume=True,
            progress=False).fit()
    info = checkpoint_info(out / CHECKPOINT)
    assert info["step"] == 2 and info["split_info"] == a


def test_resume_of_a_checkpoint_without_a_data_record_warns(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(steps=1, batch_size=4, ema_decay=None)
    Trainer(_model(), _labelled({"dataset": "A"}), cfg, out=out, progress=False).fit()
    # Rewrite it as a checkpoint from before data_sha256 was recorded.
    from safetensors import safe_open

    with safe_open(str(out / CHECKPOINT), framework="pt") as f:
        meta = f.metadata()
    trainer_meta = json.loads(meta["berdiff_trainer"])
    del trainer_meta["data_sha256"]
    meta["berdiff_trainer"] = json.dumps(trainer_meta)
    write_safetensors_atomic(out / CHECKPOINT, load_file(str(out / CHECKPOINT)), meta)
    said = []
    t = Trainer(_model(), _labelled({"dataset": "B"}), _cfg(steps=2, batch_size=4, ema_decay=None), out=out,
                resume=True, progress=False, log=said.append)
    assert t.step == 1
    assert any(m.startswith("warning:") and "cannot check that this is the data" in m for m in said), said


def test_load_model_weights_choice_needs_a_training_checkpoint(tmp_path):
    out = tmp_path / "run"
    Trainer(_model(), _data(16), _cfg(steps=1, batch_size=4, ema_decay=0.5), out=out, progress=False).fit()
    for choice in ("raw", "ema"):
        # model.safetensors holds the EMA weights only: 'raw' used to return them silently.
        with pytest.raises(ValueError, match=rf"weights: '{choice}' chooses between the raw and EMA weights.*"
                                             rf"{WEIGHTS} is a weights file"):
            load_model(out / WEIGHTS, weights=choice)
    state = load_file(str(out / CHECKPOINT))
    raw = load_model(out / CHECKPOINT, weights="raw")
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in raw.state_dict().items())
    assert any(not torch.equal(state[f"model.{k}"], state[f"ema.{k}"]) for k in raw.state_dict())


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    data = SyntheticLesions(16, size=16, seed=0, mode="eval")
    cfg = _cfg(steps=20, batch_size=4, ckpt_every=1)
    bad = DataOrder(16, 4, 1, 0, cfg.seed).global_indices(2)[1]  # read at the third step
    data.images[bad, 0, 3, 3] = float("nan")
    out = tmp_path / "run"
    trainer = Trainer(_model(), data, cfg, out=out, progress=False)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3.*non-finite image values.*"
                                               r"checkpoint.safetensors \(step 2\), is left as it was"):
        trainer.fit()
    assert checkpoint_info(out / CHECKPOINT)["step"] == 2
    state = load_file(str(out / CHECKPOINT))
    assert all(bool(torch.isfinite(v).all()) for k, v in state.items() if v.is_floating_point())
    assert all(bool(torch.isfinite(p).all()) for p in load_model(out / WEIGHTS).parameters())
    assert _csv_steps(out / "metrics.csv") == [1, 2]


def test_logs_csv_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    Trainer(_model(), _data(), _cfg(steps=4, log_every=2, tensorboard="on"), out=out, progress=False).fit()
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["loss"]) > 0 and float(r["steps_per_s"]) > 0 for r in rows)
    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_plain_train_wrapper_reduces_the_loss_and_copies_ema():
    model = _model()
    hist = train(model, _data(64), max_steps=25, batch_size=16, lr=2e-3, progress=False, ema_decay=0.9)
    assert hist["steps"] == 25 and hist["stopped"] == "steps"
    first, last = sum(hist["loss"][:3]) / 3, sum(hist["loss"][-5:]) / 5
    assert last < first - 0.05, (first, last)
    assert not model.training


# --------------------------------------------------------------------------- real processes


def _train_cmd(out, steps, *extra):
    return [sys.executable, "-m", "berdiff_fast.cli", "train", "--synthetic", "--synthetic-size", "64",
            "--image-size", "16", "--batch-size", "8", "--steps", str(steps), "--log-every", "1", "--ema", "0.99",
            "--tensorboard", "off", "--no-progress", "--out", str(out), *extra]


def test_resume_after_sigkill_loses_at_most_the_steps_since_the_checkpoint(tmp_path):
    out, every = tmp_path / "run", 4
    proc = subprocess.Popen(_train_cmd(out, 100000, "--ckpt-every", str(every)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt, deadline = out / CHECKPOINT, time.monotonic() + 150
    try:
        while time.monotonic() < deadline:
            if ckpt.exists() and checkpoint_info(ckpt)["step"] >= 2 * every:
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early: {proc.stderr.read().decode()}")
            time.sleep(0.1)
        else:
            pytest.fail("no second checkpoint within 150 s")
        time.sleep(0.3)  # let it run on past the checkpoint (and maybe into the next write)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint_info(ckpt)["step"]  # the file is whole: the kill never leaves half a checkpoint
    logged = max(_csv_steps(out / "metrics.csv"))
    assert saved % every == 0 and 0 <= logged - saved <= every, (saved, logged)

    target = saved + 5
    r = subprocess.run(_train_cmd(out, target, "--ckpt-every", str(every), "--resume"), env=_env(),
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {ckpt} at step {saved}" in r.stderr
    info = checkpoint_info(ckpt)
    assert info["step"] == target
    assert _csv_steps(out / "metrics.csv") == list(range(1, target + 1))  # steps continue, none twice


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    steps = 3
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "berdiff_fast.cli", *_train_cmd(tmp_path / "ddp", steps, "--ema", "0")[3:]],
                         env=_env(), capture_output=True, text=True, timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = subprocess.run(_train_cmd(tmp_path / "one", steps, "--ema", "0"), env=_env(), capture_output=True,
                            text=True, timeout=180)
    assert single.returncode == 0, single.stderr[-3000:]
    info = checkpoint_info(tmp_path / "ddp" / CHECKPOINT)
    assert info["world_size"] == 2 and info["step"] == steps
    # Each process held half of the global batch: the per-step losses and the weights agree
    # with one process holding all of it (the same images, timesteps and noise).
    with open(tmp_path / "ddp" / "metrics.csv") as f:
        l_ddp = [float(r["loss"]) for r in csv.DictReader(f)]
    with open(tmp_path / "one" / "metrics.csv") as f:
        l_one = [float(r["loss"]) for r in csv.DictReader(f)]
    assert l_ddp == pytest.approx(l_one, rel=1e-4)
    a = load_file(str(tmp_path / "ddp" / CHECKPOINT))
    b = load_file(str(tmp_path / "one" / CHECKPOINT))
    assert {k for k in a if k.startswith("rng.cpu.")} == {"rng.cpu.0", "rng.cpu.1"}
    for k in a:
        if k.startswith("model."):
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-5, msg=k)
    assert json.loads(json.dumps(info["train_config"]))["batch_size"] == 8
