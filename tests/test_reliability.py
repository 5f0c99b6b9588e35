"""Interruptions, resume, non-finite losses and checkpoint loading."""
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pixelcnn
import predict
import train
from dataset import load_split_tensor
from modules import PixelCNNConfig, VQVAEConfig, build_prior
from utils import CheckpointError, NonFiniteLoss, load_checkpoint, parse_configs, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY_VQVAE = ["--image-size", "32", "--hidden", "16", "--res-hidden", "8", "--num-codes", "16",
              "--code-dim", "8", "--batch-size", "2", "--dead-code-steps", "3"]
TINY_PRIOR = ["--hidden", "8", "--n-layers", "2", "--kernel", "3", "--batch-size", "2"]


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


def vqvae_configs(tmp_path, data, *extra):
    return parse_configs("", [train.TrainConfig, VQVAEConfig],
                         ["--data", str(data), "--checkpoint-dir", str(tmp_path / "ck"),
                          "--progress-dir", str(tmp_path / "progress"), *TINY_VQVAE, *extra])


def test_vqvae_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_demo):
    straight_cfg, model_cfg = vqvae_configs(tmp_path / "straight", tiny_demo, "--epochs", "2")
    train.train(straight_cfg, model_cfg, progress=False)
    straight = torch.load(tmp_path / "straight" / "ck" / "vqvae_last.pt", weights_only=True)

    cfg, model_cfg = vqvae_configs(tmp_path / "split", tiny_demo, "--epochs", "2")
    # 8 training images, batch 2: 4 steps an epoch; stop mid-way through the second epoch.
    with pytest.raises(KeyboardInterrupt, match="--resume"):
        train.train(cfg, model_cfg, progress=False, stop=StopAfter(6))
    halfway = torch.load(tmp_path / "split" / "ck" / "vqvae_last.pt", weights_only=True)
    assert halfway["run"]["step"] == 6 and halfway["run"]["step_in_epoch"] == 2
    torch.manual_seed(1234)  # whatever the global state now, resume must restore its own
    resumed_cfg, _ = vqvae_configs(tmp_path / "split", tiny_demo, "--epochs", "2", "--resume")
    train.train(resumed_cfg, model_cfg, progress=False)
    resumed = torch.load(tmp_path / "split" / "ck" / "vqvae_last.pt", weights_only=True)

    assert resumed["run"]["step"] == straight["run"]["step"] == 8
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert straight["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    for k, v in straight["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg"], resumed["optimizer"]["state"][k]["exp_avg"])


def train_tiny_vqvae(tmp_path, data):
    cfg, model_cfg = vqvae_configs(tmp_path, data, "--epochs", "1")
    train.train(cfg, model_cfg, progress=False)
    return tmp_path / "ck" / "vqvae_best.pt"


def prior_configs(tmp_path, data, vqvae, *extra):
    return parse_configs("", [pixelcnn.PriorTrainConfig, PixelCNNConfig],
                         ["--data", str(data), "--vqvae", str(vqvae),
                          "--checkpoint-dir", str(tmp_path / "prior"), *TINY_PRIOR, *extra])


@pytest.mark.parametrize("augment", [[], ["--vflip"]], ids=["plain", "vflip"])
def test_prior_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, tiny_demo, augment):
    vqvae = train_tiny_vqvae(tmp_path, tiny_demo)
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


def test_vflip_trains_the_prior_on_codes_of_flipped_slices_for_part_of_each_batch(tmp_path, tiny_demo,
                                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)  # the split cache goes here
    vqvae_path, cpu = train_tiny_vqvae(tmp_path, tiny_demo), torch.device("cpu")
    vqvae, _ = pixelcnn.load_vqvae(vqvae_path, cpu)
    images = load_split_tensor(tiny_demo, "train", 32, cpu, progress=False)[0]
    codes, _, flipped = pixelcnn.encode_split(vqvae, tiny_demo, "train", 32, cpu, progress=False, flipped=True)
    assert torch.equal(flipped, pixelcnn.encode_to_indices(vqvae, images.flip(2)))
    assert not torch.equal(flipped, codes)

    batches, make_step = [], pixelcnn.make_train_step

    def recording_step(*args):
        step = make_step(*args)
        return lambda batch, cond: (batches.append(batch.clone()), step(batch, cond))[1]
    monkeypatch.setattr(pixelcnn, "make_train_step", recording_step)
    cfg, model_cfg = prior_configs(tmp_path, tiny_demo, vqvae_path, "--epochs", "3", "--vflip")
    pixelcnn.train_prior(cfg, model_cfg, progress=False)

    def source(grid):
        return ("plain" if (codes == grid).all(dim=(1, 2)).any() else "") + \
               ("flipped" if (flipped == grid).all(dim=(1, 2)).any() else "")
    seen = [source(grid) for batch in batches for grid in batch]
    assert "" not in seen  # every grid is one slice's codes, as it is or flipped
    assert "plain" in seen and "flipped" in seen


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_the_run_and_says_how_to_resume(tmp_path, tiny_demo, sig):
    command = [sys.executable, str(ROOT / "train.py"), "--data", str(tiny_demo), "--epochs", "1000",
               "--log-every", "1", *TINY_VQVAE]
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


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, tiny_demo, monkeypatch):
    cfg, model_cfg = vqvae_configs(tmp_path, tiny_demo, "--epochs", "1")
    train.train(cfg, model_cfg, progress=False)
    last = tmp_path / "ck" / "vqvae_last.pt"
    good = last.read_bytes()

    real_loss = train.reconstruction_loss
    calls = {"n": 0}

    def poisoned(logits, x, kind):
        calls["n"] += 1
        loss = real_loss(logits, x, kind)
        return loss * float("nan") if calls["n"] >= 2 else loss

    monkeypatch.setattr(train, "reconstruction_loss", poisoned)
    cfg, model_cfg = vqvae_configs(tmp_path, tiny_demo, "--epochs", "3", "--resume")
    with pytest.raises(NonFiniteLoss, match="step 6"):
        train.train(cfg, model_cfg, progress=False)
    assert last.read_bytes() == good


def test_resuming_with_other_model_settings_names_them(tmp_path, tiny_demo):
    train_tiny_vqvae(tmp_path, tiny_demo)
    cfg, model_cfg = vqvae_configs(tmp_path, tiny_demo, "--epochs", "2", "--resume", "--num-codes", "32")
    with pytest.raises(CheckpointError, match="num_codes: 16 there, 32 here"):
        train.train(cfg, model_cfg, progress=False)


def test_a_file_that_is_not_our_checkpoint_is_refused_with_a_message(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(text, "vqvae")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a vqvae checkpoint"):
        load_checkpoint(foreign, "vqvae")
    prior = tmp_path / "prior.pt"
    save_checkpoint(prior, {"kind": "pixelcnn"})
    with pytest.raises(CheckpointError, match="not a vqvae checkpoint"):
        load_checkpoint(prior, "vqvae")


def test_a_checkpoint_whose_weights_do_not_fit_the_model_gets_one_line(tmp_path):
    cfg = PixelCNNConfig(num_codes=8, hidden=8, n_layers=2, kernel=3)
    weights = build_prior(cfg).state_dict()
    weights["layers.1.h_out.weight"] = torch.zeros(8, 8, 1, 1)  # a layer this version no longer has
    path = tmp_path / "old_prior.pt"
    save_checkpoint(path, {"kind": "pixelcnn", "model": weights, "model_config": dataclasses.asdict(cfg)})
    with pytest.raises(CheckpointError, match=r"does not fit this version's pixelcnn model \(.*h_out") as err:
        pixelcnn.load_prior(path, "cpu")
    assert len(str(err.value).splitlines()) == 1


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path, capfd):
    path = tmp_path / "evil.pt"
    torch.save({"kind": "vqvae", "x": Payload()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, "vqvae")
    assert "pwned" not in capfd.readouterr().out


def test_checkpoints_are_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"kind": "vqvae", "version": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, {"kind": "vqvae", "version": 2})
    assert load_checkpoint(path, "vqvae")["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary left behind


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


class TickingClock:
    """Stands in for time.monotonic: every reading is one second after the last."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def test_a_time_budget_ends_the_run_early_with_the_lr_decayed_and_keeps_the_best_checkpoint(
        tmp_path, tiny_demo, monkeypatch):
    import utils
    vqvae = train_tiny_vqvae(tmp_path, tiny_demo)
    monkeypatch.setattr(utils.TimeBudget, "clock", staticmethod(TickingClock()))
    # 8 training grids, batch 2: 4 steps an epoch, 80 planned; a step reads the clock once, so
    # the budget of 60 ticking seconds fits about 50 of them
    cfg, model_cfg = prior_configs(tmp_path, tiny_demo, vqvae, "--epochs", "20", "--minutes", "1",
                                   "--warmup-steps", "2")
    history = pixelcnn.train_prior(cfg, model_cfg, progress=False)
    last = torch.load(tmp_path / "prior" / "pixelcnn_last.pt", weights_only=True)
    best = torch.load(tmp_path / "prior" / "pixelcnn_best.pt", weights_only=True)
    total = last["run"]["total_steps"]
    assert 23 < total < 80 and last["run"]["step"] == total == history[-1]["step"]
    assert last["scheduler"]["total_steps"] == total and history[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert best["run"]["best"] == min(r["val_nll_bits"] for r in history)
    assert best["run"]["step"] == min(history, key=lambda r: r["val_nll_bits"])["step"]


def test_a_budget_spent_before_its_estimate_stops_at_the_next_step(tmp_path, tiny_demo, monkeypatch):
    import utils
    vqvae = train_tiny_vqvae(tmp_path, tiny_demo)
    monkeypatch.setattr(utils.TimeBudget, "clock", staticmethod(TickingClock()))
    cfg, model_cfg = prior_configs(tmp_path, tiny_demo, vqvae, "--epochs", "20", "--minutes", "0.25")
    history = pixelcnn.train_prior(cfg, model_cfg, progress=False)
    # 15 ticking seconds run out before the 20 timed steps: no estimate, a hard stop instead
    assert history[-1]["step"] < 20 and len(history) == -(-history[-1]["step"] // 4)
