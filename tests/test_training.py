"""checkpoint.py and training.py: the checkpoint (atomic, weights only, tagged with its kind, refused
when it does not fit), the learning-rate schedule, and the time budget."""
import dataclasses
import os

import pytest
import torch

import pixelcnn
from checkpoint import load_checkpoint, load_prior, save_checkpoint
from errors import CheckpointError, OutputError
from modules import PixelCNNConfig, build_prior
from training import WarmupCosine


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
        load_prior(path, "cpu")
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
    with pytest.raises(OutputError):
        save_checkpoint(path, {"kind": "vqvae", "version": 2})
    assert load_checkpoint(path, "vqvae")["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary left behind


def test_warmup_cosine_rises_linearly_then_decays_to_zero_where_the_run_ends():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=4, total_steps=20)
    lrs = [optimizer.param_groups[0]["lr"]]
    for step in range(10):
        optimizer.step()
        schedule.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        if step == 6:
            schedule.end_at(10)  # a time budget cut the run short
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # 4 steps: a fifth of 20
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:])) and lrs[10] == pytest.approx(0.0, abs=1e-12)


def test_warmup_cosine_holds_the_peak_for_its_share_of_the_run_before_decaying():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=2, total_steps=22, hold=0.5)
    lrs = []
    for _ in range(22):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:2] == pytest.approx([0.5, 1.0])
    assert lrs[2:13] == pytest.approx([1.0] * 11)  # the first half of the 20 steps after the warm-up
    assert lrs[13] < 1.0 and lrs[17] == pytest.approx(0.5) and lrs[22] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_a_time_budget_ends_the_run_early_with_the_lr_decayed_and_keeps_the_best_checkpoint(
        tmp_path, tiny_demo, tiny_models, prior_configs, monkeypatch, ticking_clock):
    monkeypatch.chdir(tmp_path)  # the split cache goes here
    vqvae = tiny_models.vqvae
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


def test_a_budget_spent_before_its_estimate_stops_at_the_next_step(tmp_path, tiny_demo, tiny_models, prior_configs,
                                                                   monkeypatch, ticking_clock):
    monkeypatch.chdir(tmp_path)  # the split cache goes here
    vqvae = tiny_models.vqvae
    cfg, model_cfg = prior_configs(tmp_path, tiny_demo, vqvae, "--epochs", "20", "--minutes", "0.25")
    history = pixelcnn.train_prior(cfg, model_cfg, progress=False)
    # 15 ticking seconds run out before the 20 timed steps: no estimate, a hard stop instead
    assert history[-1]["step"] < 20 and len(history) == -(-history[-1]["step"] // 4)
