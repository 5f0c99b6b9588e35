"""What users of the command lines rely on: every flag of every script says what it does, the
trainers pick their preset by the device, and the defaults the README quotes are the defaults."""
import argparse

import pytest
import torch

import anomaly
import dataset
import pixelcnn
import predict
import realism
import sweep
import train

SCRIPTS = {"train.py": train, "pixelcnn.py": pixelcnn, "predict.py": predict, "anomaly.py": anomaly,
           "sweep.py": sweep, "dataset.py": dataset, "realism.py": realism}


class Parsed(Exception):
    """Raised in place of parsing: the script built its parser and got no further."""


def parser_of(script, monkeypatch):
    """The parser a script builds for its command line, caught where it starts to parse (so
    nothing runs), with the flags a user of this machine gets."""
    built = []

    def record(self, *args, **kwargs):
        built.append(self)
        raise Parsed

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", record)
        with pytest.raises(Parsed):
            script.main([])
    return built[-1]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_flag_of_every_script_has_help(name, monkeypatch):
    parser = parser_of(SCRIPTS[name], monkeypatch)
    arguments = [action for action in parser._actions if action.help is not argparse.SUPPRESS]
    assert len(arguments) > 2
    undocumented = [action.option_strings or action.dest for action in arguments
                    if not (action.help or "").strip()]
    assert not undocumented, f"{name}: no help for {undocumented}"


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_lists_every_flag_and_exits_cleanly(name, monkeypatch, capsys):
    flags = [flag for action in parser_of(SCRIPTS[name], monkeypatch)._actions for flag in action.option_strings]
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].main(["--help"])
    assert exit_info.value.code == 0
    shown = capsys.readouterr().out
    assert [flag for flag in flags if flag not in shown] == []


# ----------------------------------------------------------------------------- presets by device

@pytest.mark.parametrize("script", [train, pixelcnn], ids=["train.py", "pixelcnn.py"])
@pytest.mark.parametrize("device, preset", [("cpu", "quick"), ("cuda", "paper")])
def test_the_trainers_pick_quick_on_a_cpu_and_paper_on_a_gpu(script, device, preset):
    assert script.default_preset(argparse.Namespace(device=device)) == preset  # naming a device touches none


@pytest.mark.parametrize("script", [train, pixelcnn], ids=["train.py", "pixelcnn.py"])
@pytest.mark.parametrize("has_gpu, preset", [(False, "quick"), (True, "paper")])
def test_device_auto_picks_the_preset_of_the_device_it_finds(script, has_gpu, preset, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    assert script.default_preset(argparse.Namespace(device="auto")) == preset


@pytest.mark.parametrize("script", [train, pixelcnn], ids=["train.py", "pixelcnn.py"])
@pytest.mark.parametrize("device, preset", [("cpu", "quick"), ("cuda", "paper")])
def test_without_a_preset_the_device_s_preset_sets_every_value_it_names(script, device, preset):
    configs = script.parse_args(["--device", device])  # parsing only: nothing touches a GPU
    for field, value in script.PRESETS[preset].items():
        (got,) = [getattr(cfg, field) for cfg in configs if hasattr(cfg, field)]
        assert got == value, (preset, field)


@pytest.mark.parametrize("script", [train, pixelcnn], ids=["train.py", "pixelcnn.py"])
def test_the_preset_flag_says_how_it_picks_and_what_each_preset_sets(script, monkeypatch):
    (preset,) = [a for a in parser_of(script, monkeypatch)._actions if "--preset" in a.option_strings]
    assert sorted(preset.choices) == sorted(script.PRESETS) and {"paper", "quick"} <= set(preset.choices)
    assert preset.default is None
    assert "GPU" in preset.help and "CPU" in preset.help
    for name, values in script.PRESETS.items():
        assert f"{name}: " in preset.help and all(f"--{k.replace('_', '-')} {v}" in preset.help
                                                  for k, v in values.items())


def test_on_a_cpu_oasis_data_gets_the_full_resolution_two_level_vqvae_and_the_demo_the_quick_one():
    cfg, model_cfg, _ = train.parse_args(["--device", "cpu", "--data", "path/to/keras_png_slices_data"])
    assert (cfg.image_size, model_cfg.n_downsample, model_cfg.levels, cfg.epochs) == (256, 2, 2, 18)
    assert (model_cfg.coarse_only, cfg.adversarial, cfg.adversarial_freeze_codes) == (0.25, 1.0, True)
    assert (cfg.adversarial_from, cfg.adversarial_warmup, cfg.adversarial_ramp) == (0.72, 0.06, 0.06)
    cfg, model_cfg, _ = train.parse_args(["--device", "cpu"])
    assert (cfg.data, cfg.image_size, model_cfg.levels) == ("demo", 128, 1)
    cfg, model_cfg, _ = train.parse_args(["--device", "cuda", "--data", "path/to/keras_png_slices_data"])
    assert (cfg.image_size, model_cfg.hidden, model_cfg.levels) == (256, 256, 1)  # a GPU: the paper's model


# ----------------------------------------------------------------------------- the defaults the README quotes

def test_train_on_a_cpu_trains_the_quick_vqvae_the_readme_describes():
    cfg, model_cfg, bench = train.parse_args(["--device", "cpu"])
    assert (cfg.image_size, cfg.batch_size, cfg.epochs) == (128, 8, 18)
    assert (model_cfg.num_codes, model_cfg.code_dim, model_cfg.hidden) == (256, 64, 64)
    assert (cfg.data, cfg.dtype, cfg.resume, bench.benchmark) == ("demo", "auto", False, False)


def test_the_paper_preset_is_the_full_resolution_model_the_readme_describes():
    cfg, model_cfg, _ = train.parse_args(["--preset", "paper"])
    assert (cfg.image_size, model_cfg.num_codes, model_cfg.code_dim, model_cfg.hidden, cfg.batch_size) == \
        (256, 512, 64, 256, 32)


def test_pixelcnn_on_a_cpu_trains_the_budgeted_prior_the_readme_describes():
    cfg, model_cfg, bench = pixelcnn.parse_args(["--device", "cpu"])
    assert (cfg.minutes, cfg.lr, cfg.lr_hold, cfg.epochs, cfg.batch_size) == (5.0, 8e-3, 0.8, 12, 16)
    assert (model_cfg.hidden, model_cfg.kind) == (32, "gated")
    assert (cfg.data, cfg.vqvae, cfg.dtype, bench.benchmark) == ("demo", "checkpoints/vqvae_best.pt", "auto", False)


def test_pixelcnn_on_a_gpu_trains_the_prior_the_readme_describes():
    cfg, model_cfg, _ = pixelcnn.parse_args(["--device", "cuda"])  # parsing only: nothing touches a GPU
    assert (model_cfg.n_layers, model_cfg.kernel, model_cfg.hidden, cfg.epochs, cfg.minutes) == (21, 7, 128, 40, 0.0)


def defaults_of(script, monkeypatch):
    """What a script's command line gives with no flags."""
    return parser_of(script, monkeypatch).parse_args([])


def test_predict_and_anomaly_read_the_default_checkpoints_and_write_to_out(monkeypatch):
    for script in (predict, anomaly):
        args = defaults_of(script, monkeypatch)
        assert (args.data, args.vqvae, args.prior, args.out_dir) == \
            ("demo", "checkpoints/vqvae_best.pt", "checkpoints/pixelcnn_best.pt", "out")
    args = defaults_of(predict, monkeypatch)
    assert (args.n_samples, args.realism) == (16, False)


def test_anomaly_maps_combine_smooth_and_leave_out_the_edge_as_the_readme_describes(monkeypatch):
    args = defaults_of(anomaly, monkeypatch)
    assert (args.combine, args.edge_margin, args.smooth, args.threshold) == ("min", 8.0, 6.0, "auto")
    assert (tuple(args.lesion_size), tuple(args.lesion_contrast)) == ((4.0, 32.0), (0.15, 0.5))


def test_dataset_and_sweep_defaults():
    args = dataset.build_parser().parse_args(["--stats"])
    assert (args.data, args.demo_dir, args.cache_dir, args.image_size) == ("demo", "data/demo", ".cache", 256)
    options, runs = sweep.parse_args(["--runs", ""])
    assert (options.out_dir, options.checkpoint_root, runs) == ("out/sweep", "checkpoints/sweep", [""])
