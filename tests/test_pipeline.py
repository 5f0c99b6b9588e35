"""The three scripts, end to end, on a tiny demo set at 32x32."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import hardware
import pixelcnn
import predict
import train
from cli import parse_configs
from dataset import load_split_tensor
from errors import FlagError
from modules import PixelCNNConfig, VQVAEConfig, rows_seen_above

N_SAMPLES = 3


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_demo, tiny_flags):
    """Run train -> prior -> predict once in a scratch working directory, as a user does."""
    work, data = tmp_path_factory.mktemp("run"), tiny_demo
    # leftovers of an older, longer run must not leak into this run's GIF and samples
    for stale in ("out/progress/epoch_007.png", "out/samples/sample_099.png"):
        (work / stale).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (32, 32)).save(work / stale)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        train.main(["--data", str(data), "--epochs", "2", *tiny_flags.vqvae])
        pixelcnn.main(["--data", str(data), "--epochs", "2", *tiny_flags.prior])
        predict.main(["--data", str(data), "--n-samples", str(N_SAMPLES), "--save-reconstructions",
                      "--sweep-frames", "3"])
    return work, data


def test_train_writes_best_and_last_checkpoints_with_config(pipeline_run):
    work, _ = pipeline_run
    for name in ("vqvae_best.pt", "vqvae_last.pt", "pixelcnn_best.pt", "pixelcnn_last.pt"):
        ckpt = torch.load(work / "checkpoints" / name, weights_only=True)
        assert "model" in ckpt and "model_config" in ckpt and "train_config" in ckpt
    last = torch.load(work / "checkpoints" / "vqvae_last.pt", weights_only=True)
    assert last["model_config"]["num_codes"] == 16
    assert last["train_config"]["dtype"] == "float32" and last["train_config"]["image_size"] == 32
    for name in ("vqvae_last.pt", "pixelcnn_last.pt"):  # --benchmark is no setting of a run
        recorded = torch.load(work / "checkpoints" / name, weights_only=True)["train_config"]
        assert not any(key.startswith("benchmark") for key in recorded)
    assert [r["epoch"] for r in last["run"]["history"]] == [1, 2]
    assert all(0 <= r["val_ssim"] <= 1 for r in last["run"]["history"])


def test_predict_writes_every_listed_output(pipeline_run):
    work, _ = pipeline_run
    out = work / "out"
    for name in ("reconstructions.png", "samples.png", "progression.gif", "curves.png", "metrics.json",
                 "code_maps.png", "codebook_usage.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "reconstructions.png").mode == "L"
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == N_SAMPLES
    assert all(Image.open(p).mode == "L" and Image.open(p).size == (32, 32) for p in samples)
    gif = Image.open(out / "progression.gif")
    assert gif.n_frames == 2  # one frame per training epoch
    sweep = Image.open(out / "slice_sweep.gif")
    assert sweep.n_frames == 3 and sweep.size == (32, 32)  # --sweep-frames 3


def test_samples_are_shown_above_real_test_slices_at_full_size(pipeline_run):
    work, data = pipeline_run
    beside = np.asarray(Image.open(work / "out" / "samples_vs_real.png"))
    count = min(8, N_SAMPLES, 4)  # the tiny test split has 4 slices
    assert beside.shape == (2 * 34 + 2, count * 34 + 2)  # 32 px tiles, 2 px apart
    sample = np.asarray(Image.open(work / "out" / "samples" / "sample_000.png"))
    assert np.array_equal(beside[2:34, 2:34], sample)
    real = load_split_tensor(data, "test", 32, cache_dir=None, progress=False)[0][:, 0].numpy()
    assert np.array_equal(beside[36:68, 2:34], real[0]) and np.array_equal(beside[36:68, -34:-2], real[-1])


def test_metrics_json_has_the_promised_keys(pipeline_run):
    work, data = pipeline_run
    metrics = json.loads((work / "out" / "metrics.json").read_text())
    for key in ("test_ssim_mean", "test_ssim_min", "test_ssim_std", "test_psnr_mean"):
        assert isinstance(metrics[key], float)
    assert metrics["split"] == "test" and metrics["image_size"] == 32
    assert metrics["n_images"] == 4 and metrics["data_root"] == str(data)
    assert 1 <= metrics["test_codes_used"] <= 16 and 1 <= metrics["test_perplexity"] <= 16
    assert -1 <= metrics["test_ssim_min"] <= metrics["test_ssim_mean"] <= 1
    # the demo set knows its slices without noise; a model scores against that bound
    assert 0.5 < metrics["test_ssim_noise_free"] < 1


def test_noise_free_score_is_absent_for_data_without_twins(tmp_path):
    images = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    assert predict.noise_free_ssim(tmp_path, "test", images, 32) is None


def test_save_reconstructions_keeps_the_input_file_names(pipeline_run):
    work, data = pipeline_run
    inputs = sorted(p.name for p in (data / "keras_png_slices_test").glob("*.png"))
    written = sorted(p.name for p in (work / "out" / "reconstructions").glob("*.png"))
    assert written == inputs
    assert Image.open(work / "out" / "reconstructions" / written[0]).mode == "L"


def test_predict_before_training_names_the_missing_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--data", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "checkpoints/vqvae_best.pt" in err and "python train.py" in err


def test_train_on_a_missing_data_root_gives_a_one_line_error(tmp_path, tiny_flags, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--data", str(tmp_path / "nowhere"), *tiny_flags.vqvae])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nowhere" in err


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_an_lr_hold_outside_0_to_1_gets_a_one_line_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pixelcnn.main(["--lr-hold", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr-hold" in err


def test_a_preset_sets_defaults_and_explicit_flags_win():
    classes = [train.TrainConfig, VQVAEConfig]
    cfg, model_cfg = parse_configs("", classes, ["--preset", "paper", "--batch-size", "8"], train.PRESETS)
    assert (cfg.image_size, model_cfg.hidden, model_cfg.num_codes, cfg.batch_size) == (256, 256, 512, 8)
    cfg, model_cfg = parse_configs("", classes, [], train.PRESETS)
    quick = train.PRESETS["quick"]
    assert (cfg.image_size, model_cfg.hidden, cfg.batch_size) == (quick["image_size"], quick["hidden"],
                                                                  quick["batch_size"])


def test_without_a_preset_a_gpu_run_gets_the_paper_model_and_a_cpu_run_the_quick_one():
    cfg, model_cfg, _ = train.parse_args(["--device", "cuda"])  # parsing only: nothing touches a GPU
    assert (cfg.image_size, model_cfg.hidden, model_cfg.num_codes) == (256, 256, 512)
    cfg, model_cfg, _ = train.parse_args(["--device", "cpu"])
    assert (cfg.image_size, model_cfg.hidden, model_cfg.num_codes) == (128, 64, 256)
    cfg, _, _ = train.parse_args(["--device", "cuda", "--preset", "quick", "--image-size", "64"])
    assert cfg.image_size == 64


def test_reconstruction_only_evaluates_the_vqvae_without_a_prior(pipeline_run, monkeypatch):
    work, data = pipeline_run
    monkeypatch.chdir(work)
    predict.main(["--data", str(data), "--reconstruction-only", "--prior", "missing.pt",
                  "--out-dir", "recon_only"])
    metrics = json.loads((work / "recon_only" / "metrics.json").read_text())
    full = json.loads((work / "out" / "metrics.json").read_text())
    assert metrics["test_ssim_mean"] == pytest.approx(full["test_ssim_mean"])
    assert metrics["prior"] is None and "sampling_seconds" not in metrics
    assert not (work / "recon_only" / "samples").exists()
    assert (work / "recon_only" / "curves.png").is_file()


def test_without_a_preset_a_gpu_prior_sees_the_paper_grid_and_a_cpu_prior_is_quick_and_budgeted():
    def parse(*argv):
        return pixelcnn.parse_args(list(argv))[:2]
    cfg, model_cfg = parse("--device", "cuda")  # parsing only: nothing touches a GPU
    assert cfg.minutes == 0 and rows_seen_above(model_cfg) >= 64 - 1  # the paper VQ-VAE's 64x64 grid
    cfg, model_cfg = parse("--device", "cpu")
    assert cfg.minutes > 0 and rows_seen_above(model_cfg) >= 32 - 1  # the quick VQ-VAE's 32x32 grid
    defaults = (pixelcnn.PriorTrainConfig(), PixelCNNConfig())  # what code that builds configs gets
    assert [(c.hidden, c.n_layers, c.dropout) for c in (model_cfg, defaults[1])] == \
        [(model_cfg.hidden, model_cfg.n_layers, model_cfg.dropout)] * 2
    assert (defaults[0].minutes, defaults[0].lr, defaults[0].epochs) == (cfg.minutes, cfg.lr, cfg.epochs)
    cfg, model_cfg = parse("--device", "cuda", "--preset", "quick", "--minutes", "0")
    assert cfg.minutes == 0 and model_cfg.hidden == pixelcnn.PRESETS["quick"]["hidden"]


@pytest.mark.parametrize("device, fast, expected", [("cpu", True, "bfloat16"), ("cpu", False, "float32"),
                                                     ("cuda", True, "bfloat16"), ("cuda", False, "float32")])
def test_dtype_auto_picks_bf16_only_where_the_device_has_fast_kernels_and_says_so(monkeypatch, device, fast,
                                                                                  expected):
    monkeypatch.setattr(hardware, "cpu_has_bfloat16_kernels", lambda: fast)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: fast)
    said = []
    assert hardware.resolve_dtype("auto", torch.device(device), said.append) == expected
    assert len(said) == 1 and expected in said[0]
    assert hardware.resolve_dtype("float32", torch.device(device), said.append) == "float32" and len(said) == 1


@pytest.mark.parametrize("flags, named", [({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p"),
                                          ({"temperature": 0.0}, "--temperature"),
                                          ({"detail_top_p": 0.0}, "--detail-top-p"),
                                          ({"detail_temperature": -1.0}, "--detail-temperature")])
def test_sampling_settings_refuse_a_top_p_outside_0_1_or_a_temperature_of_zero(flags, named):
    with pytest.raises(FlagError, match=named):
        predict.sampling_settings(predict.PredictConfig(**flags))
    assert predict.sampling_settings(predict.PredictConfig(top_p=0.9, detail_temperature=0.8)) == {
        "temperature": 1.0, "top_p": 0.9, "detail_sampling": {"temperature": 0.8, "top_p": 1.0}}
