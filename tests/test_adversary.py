"""The patch discriminator of --adversarial: its formulas on known inputs, and what a training
step with it changes."""
import pytest
import torch

import train
import training
from adversary import (PatchDiscriminator, adaptive_weight, codes_frozen, discriminator_hinge_loss, freeze_codes,
                       generator_loss, judge)
from checkpoint import load_checkpoint
from cli import parse_configs
from errors import CheckpointError
from modules import VQVAEConfig


def test_the_discriminator_judges_overlapping_patches_of_a_256_slice():
    logits = PatchDiscriminator()(torch.rand(2, 1, 256, 256))
    assert logits.shape == (2, 1, 30, 30)


def test_a_slices_logits_do_not_depend_on_its_batch_mates():
    torch.manual_seed(0)
    net, x = PatchDiscriminator(), torch.rand(3, 1, 64, 64)
    alone = net(x[:1])
    assert torch.allclose(net(x)[:1], alone, atol=1e-6)
    assert torch.allclose(net(torch.cat([x[:1], torch.zeros(2, 1, 64, 64)]))[:1], alone, atol=1e-6)


def test_hinge_losses_on_known_logits():
    ones = torch.ones(4)
    assert discriminator_hinge_loss(2 * ones, -2 * ones) == 0  # both beyond the margin: nothing to learn
    assert discriminator_hinge_loss(0 * ones, 0 * ones) == 1
    assert discriminator_hinge_loss(-ones, ones) == 2  # fooled both ways
    assert generator_loss(torch.tensor([1.0, 3.0])) == -2


def test_the_adaptive_weight_is_the_ratio_of_gradient_norms_on_the_last_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    out = layer(torch.randn(5, 3))
    reconstruction, adversarial = (out ** 2).mean(), 7 * out[:, 0].mean()
    expected = (torch.autograd.grad(reconstruction, layer.weight, retain_graph=True)[0].norm()
                / (torch.autograd.grad(adversarial, layer.weight, retain_graph=True)[0].norm() + 1e-4))
    weight = adaptive_weight(reconstruction, adversarial, layer.weight)
    assert torch.isclose(weight, expected) and not weight.requires_grad
    assert torch.isclose(adaptive_weight(reconstruction, 10 * adversarial, layer.weight), expected / 10, rtol=1e-3)


@pytest.fixture()
def tiny_training(tiny_flags):
    def build(*extra):
        cfg, model_cfg = parse_configs("", [train.TrainConfig, VQVAEConfig], [*tiny_flags.vqvae, *extra],
                                       presets=train.PRESETS)
        torch.manual_seed(0)
        return cfg, *train.build_training(cfg, model_cfg, torch.device("cpu"), train.Ranks(), n_train=16)
    return build


def test_without_the_flag_there_is_no_discriminator(tiny_training):
    *_, adversary = tiny_training()
    assert adversary is None


def test_a_step_with_the_adversary_trains_both_and_moves_the_decoder_otherwise(tiny_training):
    x = torch.rand(8, 1, 32, 32)
    cfg, model, forward, optimizer, scheduler, adversary = tiny_training("--adversarial", "1",
                                                                         "--no-adversarial-freeze-codes")
    assert adversary.trains_from == int(0.72 * cfg.epochs * 2)  # 16 images, batch 8: 2 steps an epoch
    plain_cfg, plain, plain_forward, plain_optimizer, plain_scheduler, _ = tiny_training()
    plain.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in adversary.net.state_dict().items()}

    losses, _ = train.train_step(model, forward, optimizer, scheduler, x, cfg, adversary)
    plain_losses, _ = train.train_step(plain, plain_forward, plain_optimizer, plain_scheduler, x, plain_cfg)

    assert losses.shape == (5,) and plain_losses[3] == plain_losses[4] == 0
    assert torch.isclose(losses[1], plain_losses[1])  # the same reconstruction before the step...
    assert losses[4] > 0 and any(not torch.equal(v, adversary.net.state_dict()[k]) for k, v in before.items())
    last = "decoder.net.2.weight"  # ...but the discriminator's pull moved the decoder differently
    assert not torch.allclose(model.state_dict()[last], plain.state_dict()[last])
    assert all(p.requires_grad for p in adversary.net.parameters())


def test_during_the_warm_up_the_discriminator_trains_alone(tiny_training):
    x = torch.rand(8, 1, 32, 32)
    cfg, model, forward, optimizer, scheduler, adversary = tiny_training("--adversarial", "1", "--epochs", "10",
                                                                         "--adversarial-warmup", "0.2")
    assert adversary.heard_from == adversary.trains_from + 4  # 20 steps in all
    assert not adversary.decoder_hears(adversary.heard_from - 1) and adversary.decoder_hears(adversary.heard_from)
    plain_cfg, plain, plain_forward, plain_optimizer, plain_scheduler, _ = tiny_training()
    plain.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in adversary.net.state_dict().items()}

    torch.manual_seed(1)  # the codebook's first seeding draws from it
    losses, _ = train.train_step(model, forward, optimizer, scheduler, x, cfg, adversary, heard_share=0.0)
    torch.manual_seed(1)
    train.train_step(plain, plain_forward, plain_optimizer, plain_scheduler, x, plain_cfg)

    assert losses[3] == 0 and losses[4] > 0
    assert any(not torch.equal(v, adversary.net.state_dict()[k]) for k, v in before.items())
    for name, value in plain.state_dict().items():  # the decoder stepped as if there were no discriminator
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("levels", ["1", "2"])
def test_with_frozen_codes_only_the_decoder_learns_once_it_hears(tiny_training, levels):
    x = torch.rand(8, 1, 32, 32)
    cfg, model, forward, optimizer, scheduler, adversary = tiny_training("--adversarial", "1", "--levels", levels,
                                                                         "--adversarial-freeze-codes")
    torch.manual_seed(1)
    assert not adversary.codes_freeze_at(adversary.heard_from - 1)
    train.train_step(model, forward, optimizer, scheduler, x, cfg, adversary, heard_share=0.0)
    assert model.quantizer.training  # during the warm-up the codes still learn
    before = {k: v.clone() for k, v in model.state_dict().items()}

    assert adversary.codes_freeze_at(adversary.heard_from)
    freeze_codes(model)
    torch.manual_seed(2)
    train.train_step(model, forward, optimizer, scheduler, x, cfg, adversary, heard_share=1.0)

    assert not model.quantizer.training and codes_frozen(model)
    # no backward pass through the encoder: its weights got no gradient
    assert all(p.grad is None for p in model.code_parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())
    after = model.state_dict()
    code_side = [k for k in after if not k.startswith("decoder.")]
    assert any("ema_sum" in k for k in code_side) and any(k.startswith("encoder.") for k in code_side)
    assert any(k.startswith("coarse.") for k in code_side) == (levels == "2")
    for name in code_side:  # encoder, codebooks and their EMA statistics stay put
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["decoder.net.2.weight"], before["decoder.net.2.weight"])


def test_the_decoders_share_of_the_adversarial_loss_ramps_up_once_it_hears(tiny_training):
    *_, adversary = tiny_training("--adversarial", "1", "--epochs", "10", "--adversarial-warmup", "0.2",
                                  "--adversarial-ramp", "0.2")
    start = adversary.heard_from
    assert [adversary.decoder_share(start + k) for k in (-1, 0, 1, 3, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0, 1.0]
    *_, at_once = tiny_training("--adversarial", "1", "--adversarial-ramp", "0")
    assert at_once.decoder_share(at_once.heard_from) == 1.0 and at_once.decoder_share(at_once.heard_from - 1) == 0.0


def test_the_discriminator_has_its_own_learning_rate_and_gan_momentum(tiny_training):
    *_, adversary = tiny_training("--adversarial", "1", "--adversarial-lr", "3e-5")
    group = adversary.optimizer.param_groups[0]
    assert group["lr"] == 3e-5 and group["betas"] == (0.5, 0.9)


def test_judging_for_the_decoder_leaves_the_discriminators_gradients_alone():
    net = PatchDiscriminator()
    images = torch.rand(2, 1, 32, 32, requires_grad=True)
    generator_loss(judge(net, images, torch.float32)).backward()
    assert images.grad is not None and all(p.grad is None for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())


def test_with_the_discriminator_the_last_epoch_is_kept_as_best(tmp_path, tiny_demo, tiny_flags, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg, model_cfg = parse_configs("", [train.TrainConfig, VQVAEConfig],
                                   ["--data", str(tiny_demo), "--checkpoint-dir", "ck", "--progress-dir", "p",
                                    *tiny_flags.vqvae, "--epochs", "4", "--adversarial", "1",
                                    "--adversarial-from", "0.25", "--adversarial-warmup", "0.25"],
                                   presets=train.PRESETS)
    history = train.train(cfg, model_cfg, progress=False)
    # epoch 2: the discriminator trains alone; from epoch 3 the decoder hears it
    assert [r["adversarial"] for r in history] == [False, False, True, True]
    assert history[1]["train_discriminator"] > 0 and history[1]["train_adversarial"] == 0
    best, last = load_checkpoint("ck/vqvae_best.pt", "vqvae"), load_checkpoint("ck/vqvae_last.pt", "vqvae")
    assert best["run"]["epoch"] == 4 and "discriminator" in best
    assert all(torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    assert all(0 < r["val_sharpness"] < 5 for r in history)


def test_resuming_without_the_discriminator_it_was_trained_with_is_refused(tmp_path, tiny_demo, tiny_flags,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--data", str(tiny_demo), "--checkpoint-dir", "ck", "--progress-dir", "p", *tiny_flags.vqvae,
             "--epochs", "1"]
    cfg, model_cfg = parse_configs("", [train.TrainConfig, VQVAEConfig], flags, presets=train.PRESETS)
    train.train(cfg, model_cfg, progress=False)
    cfg, model_cfg = parse_configs("", [train.TrainConfig, VQVAEConfig],
                                   [*flags, "--epochs", "2", "--resume", "--adversarial", "1"], presets=train.PRESETS)
    with pytest.raises(CheckpointError, match="no discriminator"):
        train.train(cfg, model_cfg, progress=False)


def test_building_the_discriminator_leaves_the_vqvaes_random_stream_alone(tiny_training):
    # so a run with --adversarial trains exactly as one without until the discriminator joins
    tiny_training()
    after_plain = torch.rand(3)
    tiny_training("--adversarial", "1")
    assert torch.equal(torch.rand(3), after_plain)


@pytest.mark.parametrize("flags, message", [
    (["--adversarial-ramp", "0.1"], "error: --adversarial-ramp needs --adversarial W"),
    (["--adversarial-lr", "3e-5"], "error: --adversarial-lr needs --adversarial W"),
    (["--adversarial", "1", "--adversarial-from", "0.9", "--adversarial-warmup", "0.1"],
     "error: --adversarial-from 0.9 plus --adversarial-warmup 0.1 reach the end of the run"),
    (["--adversarial", "1", "--adversarial-from", "0", "--adversarial-warmup", "0"],
     "error: --adversarial-freeze-codes with --adversarial-from 0 and --adversarial-warmup 0 would freeze"),
], ids=["ramp-alone", "lr-alone", "never-heard", "frozen-from-the-start"])
def test_discriminator_settings_that_would_do_nothing_are_refused_in_one_line(tmp_path, tiny_demo, tiny_flags,
                                                                              monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(tiny_demo), *tiny_flags.vqvae, *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(message) and "\n" not in error
    assert not (tmp_path / "checkpoints").exists()


def test_a_time_budget_ends_the_vqvae_run_early_and_moves_the_lr_milestones_and_the_discriminator_with_it(
        tmp_path, tiny_demo, tiny_flags, monkeypatch, ticking_clock):
    monkeypatch.chdir(tmp_path)
    # 8 training slices, batch 2: 4 steps an epoch, 80 planned; the budget of 60 ticking seconds fits fewer
    cfg, model_cfg = parse_configs("", [train.TrainConfig, VQVAEConfig],
                                   ["--data", str(tiny_demo), "--checkpoint-dir", "ck", "--progress-dir", "p",
                                    *tiny_flags.vqvae_batch_2, "--epochs", "20", "--minutes", "1",
                                    "--adversarial", "1", "--adversarial-from", "0.5", "--adversarial-warmup", "0.1"],
                                   presets=train.PRESETS)
    history = train.train(cfg, model_cfg, progress=False)
    last = load_checkpoint("ck/vqvae_last.pt", "vqvae")
    total = last["run"]["total_steps"]
    assert 23 < total < 80 and last["run"]["step"] == total == history[-1]["step"]
    # the schedule is the shares of the run that fits, not of the 20 epochs planned (each point as the
    # estimate of the run's end stood when it was reached: within a few steps of its share of the end)
    milestones = sorted(last["scheduler"]["milestones"])
    assert milestones != training.milestone_steps(cfg.milestones, 80)
    assert all(abs(m - int(f * total)) <= 3 for m, f in zip(milestones, cfg.milestones))
    trains_from, heard_from, ramp = last["adversary_schedule"]["steps"].tolist()
    assert abs(trains_from - 0.5 * total) <= 3 and abs(heard_from - trains_from - 0.1 * total) <= 3 < total - heard_from
    assert ramp == int(0.06 * total)
    assert history[-1]["adversarial"] and not history[0]["adversarial"]
    assert history[-1]["lr"] == pytest.approx(cfg.lr * cfg.lr_gamma ** 2)


def test_moving_milestones_keeps_those_passed_and_moves_the_rest_no_earlier_than_the_next_step():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = training.make_scheduler(optimizer, (0.2, 0.6), 0.5, 100)
    assert sorted(scheduler.milestones) == [20, 60]
    training.move_milestones(scheduler, (0.2, 0.6), 50, step=25)
    assert sorted(scheduler.milestones) == [20, 30]
    training.move_milestones(scheduler, (0.2, 0.6), 30, step=25)
    assert sorted(scheduler.milestones) == [20, 26]
