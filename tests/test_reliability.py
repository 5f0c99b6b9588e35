"""Interruptions, resume, non-finite losses and checkpoint loading."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pixelcnn
import predict
import train
from checkpoint import load_checkpoint, load_vqvae
from cli import parse_configs
from codes import encode_all
from dataset import load_split_tensor
from errors import CheckpointError, NonFiniteLoss
from modules import VQVAEConfig

ROOT = Path(__file__).resolve().parent.parent


class StopAfter:
    """Stands in for the signal handler: asks to stop once `steps` steps have run."""

    def __init__(self, steps):
        self.reads, self.steps = 0, steps

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @property
    def signal(self):
        self.reads += 1  # read once per step
        return "TEST" if self.reads >= self.steps else None


@pytest.fixture(scope="module")
def vqvae_configs(tiny_flags):
    """vqvae_configs(folder, data, *flags) -> (TrainConfig, VQVAEConfig) of a tiny VQ-VAE at batch 2
    that keeps its checkpoints in folder/ck."""
    def configs(folder, data, *extra):
        return parse_configs("", [train.TrainConfig, VQVAEConfig],
                             ["--data", str(data), "--checkpoint-dir", str(folder / "ck"),
                              "--progress-dir", str(folder / "progress"), *tiny_flags.vqvae_batch_2, *extra],
                             presets=train.PRESETS)
    return configs


# --adversarial-from 0.25: the discriminator joins at step 2 of 8, before the stop at step 6
@pytest.mark.parametrize("loss", [[], ["--adversarial", "1", "--adversarial-from", "0.25"]], ids=["plain", "adversarial"])
def test_vqvae_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_demo, vqvae_configs, monkeypatch, loss):
    monkeypatch.chdir(tmp_path)  # the split cache goes here
    straight_cfg, model_cfg = vqvae_configs(tmp_path / "straight", tiny_demo, "--epochs", "2", *loss)
    train.train(straight_cfg, model_cfg, progress=False)
    straight = torch.load(tmp_path / "straight" / "ck" / "vqvae_last.pt", weights_only=True)

    cfg, model_cfg = vqvae_configs(tmp_path / "split", tiny_demo, "--epochs", "2", *loss)
    # 8 training images, batch 2: 4 steps an epoch; stop mid-way through the second epoch.
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        train.train(cfg, model_cfg, progress=False, stop=StopAfter(6))
    halfway = torch.load(tmp_path / "split" / "ck" / "vqvae_last.pt", weights_only=True)
    assert halfway["run"]["step"] == 6 and halfway["run"]["step_in_epoch"] == 2
    torch.manual_seed(1234)  # whatever the global state now, resume must restore its own
    resumed_cfg, _ = vqvae_configs(tmp_path / "split", tiny_demo, "--epochs", "2", "--resume", *loss)
    train.train(resumed_cfg, model_cfg, progress=False)
    resumed = torch.load(tmp_path / "split" / "ck" / "vqvae_last.pt", weights_only=True)

    assert resumed["run"]["step"] == straight["run"]["step"] == 8
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert straight["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    for k, v in straight["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], resumed["optimizer"]["state"][k]["exp_avg"])
    assert ("discriminator" in straight) == bool(loss)
    for name, tensor in straight.get("discriminator", {}).items():
        assert torch.equal(tensor, resumed["discriminator"][name]), name


@pytest.mark.parametrize("augment", [[], ["--vflip"]], ids=["plain", "vflip"])
def test_prior_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_demo, tiny_models, prior_configs,
                                                               monkeypatch, augment):
    monkeypatch.chdir(tmp_path)  # the split cache goes here
    vqvae = tiny_models.vqvae
    cfg, model_cfg = prior_configs(tmp_path / "straight", tiny_demo, vqvae, "--epochs", "2", *augment)
    pixelcnn.train_prior(cfg, model_cfg, progress=False)
    straight = torch.load(tmp_path / "straight" / "prior" / "pixelcnn_last.pt", weights_only=True)

    cfg, model_cfg = prior_configs(tmp_path / "split", tiny_demo, vqvae, "--epochs", "2", *augment)
    with pytest.raises(KeyboardInterrupt):
        pixelcnn.train_prior(cfg, model_cfg, progress=False, stop=StopAfter(3))
    cfg, model_cfg = prior_configs(tmp_path / "split", tiny_demo, vqvae, "--epochs", "2", "--resume", *augment)
    pixelcnn.train_prior(cfg, model_cfg, progress=False)
    resumed = torch.load(tmp_path / "split" / "prior" / "pixelcnn_last.pt", weights_only=True)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_vflip_trains_the_prior_on_codes_of_flipped_slices_for_part_of_each_batch(tmp_path, tiny_demo, tiny_models,
                                                                                    prior_configs, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the split cache goes here
    vqvae_path, cpu = tiny_models.vqvae, torch.device("cpu")
    vqvae, _ = load_vqvae(vqvae_path, cpu)
    images = load_split_tensor(tiny_demo, "train", 32, cpu, progress=False)[0]
    (codes,), _, (flipped,) = pixelcnn.encode_split(vqvae, tiny_demo, "train", 32, cpu, progress=False, flipped=True)
    assert torch.equal(flipped, encode_all(vqvae, images.flip(2)))
    assert not torch.equal(flipped, codes)

    batches, real_step = [], pixelcnn.train_step

    def recording_step(model, forward, optimizer, scheduler, batch, cond, dtype):
        batches.append(batch.clone())
        return real_step(model, forward, optimizer, scheduler, batch, cond, dtype)
    monkeypatch.setattr(pixelcnn, "train_step", recording_step)
    cfg, model_cfg = prior_configs(tmp_path, tiny_demo, vqvae_path, "--epochs", "3", "--vflip")
    pixelcnn.train_prior(cfg, model_cfg, progress=False)

    def source(grid):
        return ("plain" if (codes == grid).all(dim=(1, 2)).any() else "") + \
               ("flipped" if (flipped == grid).all(dim=(1, 2)).any() else "")
    seen = [source(grid) for batch in batches for grid in batch]
    assert "" not in seen  # every grid is one slice's codes, as it is or flipped
    assert "plain" in seen and "flipped" in seen


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_run_and_says_how_to_resume(tmp_path, tiny_demo, tiny_flags, sig):
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(tiny_demo), "--epochs", "1000",
               "--log-every", "1", *tiny_flags.vqvae_batch_2]
    proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:  # wait until training steps are running
            if line.startswith("step 3 "):
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "--resume" in err and sig.name in err
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "vqvae_last.pt", "vqvae")
    assert ckpt["run"]["step"] >= 3

    resumed = subprocess.run([*command[:4], "--epochs", str(ckpt["run"]["epoch"] + 1), *command[6:],
                              "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from checkpoints/vqvae_last.pt at step {ckpt['run']['step']}" in resumed.stdout


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_demo, vqvae_configs,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # the split cache goes here
    cfg, model_cfg = vqvae_configs(tmp_path, tiny_demo, "--epochs", "1")
    train.train(cfg, model_cfg, progress=False)
    last = tmp_path / "ck" / "vqvae_last.pt"
    good = last.read_bytes()

    real_loss = train.reconstruction_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real_loss(*args)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(train, "reconstruction_loss", poisoned)
    cfg, model_cfg = vqvae_configs(tmp_path, tiny_demo, "--epochs", "3", "--resume")
    with pytest.raises(NonFiniteLoss, match="step 6"):
        train.train(cfg, model_cfg, progress=False)
    assert last.read_bytes() == good


def test_resuming_with_other_model_settings_names_them(tmp_path, tiny_demo, tiny_models, vqvae_configs, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the split cache goes here
    (tmp_path / "ck").mkdir()  # a copy: the shared tiny models stay as they are
    shutil.copy(tiny_models.vqvae.with_name("vqvae_last.pt"), tmp_path / "ck" / "vqvae_last.pt")
    cfg, model_cfg = vqvae_configs(tmp_path, tiny_demo, "--epochs", "2", "--resume", "--num-codes", "32")
    with pytest.raises(CheckpointError, match="num_codes: 16 there, 32 here"):
        train.train(cfg, model_cfg, progress=False)


def test_out_of_memory_suggests_a_smaller_batch(monkeypatch, capsys):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train", oom)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--batch-size", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "smaller --batch-size" in err and "64" in err and len(err.strip().splitlines()) == 1


def test_prior_and_predict_before_training_say_which_command_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for main, command in [(pixelcnn.main, "python train.py"), (predict.main, "python train.py")]:
        with pytest.raises(SystemExit):
            main(["--data", str(tmp_path)])
        assert command in capsys.readouterr().err
