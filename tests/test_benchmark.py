"""--benchmark prints one JSON line of counted figures and writes nothing."""
import json

import pytest

import hardware
import pixelcnn
import train

KEYS = {"images_per_s", "ms_per_step", "peak_memory_mb", "flops_per_image", "achieved_tflops"}


def run_benchmark(main, argv, work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1])


@pytest.mark.parametrize("loader", ["resident", "dataloader"])
def test_train_benchmark_counts_flops_and_writes_nothing(tmp_path, tiny_demo, tiny_flags, capsys, monkeypatch,
                                                         loader):
    args = ["--benchmark", "--data", str(tiny_demo), *tiny_flags.vqvae, "--benchmark-steps", "2",
            "--benchmark-warmup", "1", "--benchmark-loader", loader]
    small = run_benchmark(train.main, args, tmp_path, capsys, monkeypatch)
    assert KEYS <= small.keys() and small["loader"] == loader
    assert small["images_per_s"] > 0 and small["batch_size"] == 8
    assert 0.5 < small["conv_flop_share"] <= 1
    assert {p.name for p in tmp_path.iterdir()} <= {".cache"}  # the decoded split; no checkpoint, no image
    # counted, not guessed: twice the side, four times the work of every convolution
    large = run_benchmark(train.main, args + ["--image-size", "64"], tmp_path, capsys, monkeypatch)
    assert large["flops_per_image"] / small["flops_per_image"] == pytest.approx(4, rel=0.05)


def test_prior_benchmark_times_training_and_sampling_without_a_vqvae(tmp_path, tiny_flags, capsys, monkeypatch):
    result = run_benchmark(pixelcnn.main, ["--benchmark", *tiny_flags.prior, "--grid-size", "6", "--num-codes", "16",
                                           "--benchmark-steps", "2", "--benchmark-warmup", "0",
                                           "--benchmark-samples", "3"], tmp_path, capsys, monkeypatch)
    assert KEYS <= result.keys() and result["flops_per_image"] > 0
    assert result["samples"] == 3 and result["sampling_seconds"] > 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("has_kernels", [True, False])
def test_bfloat16_on_a_cpu_without_its_kernels_is_warned_about(tmp_path, tiny_flags, capsys, monkeypatch,
                                                               has_kernels):
    monkeypatch.setattr(hardware, "cpu_has_bfloat16_kernels", lambda: has_kernels)
    args = ["--benchmark", *tiny_flags.prior, "--grid-size", "6", "--num-codes", "16", "--device", "cpu",
            "--benchmark-steps", "1", "--benchmark-warmup", "0", "--benchmark-samples", "0"]
    monkeypatch.chdir(tmp_path)
    for dtype in ["float32", "bfloat16"]:
        pixelcnn.main(args + ["--dtype", dtype])
        warned = "no bf16 convolution kernels" in capsys.readouterr().err
        assert warned == (dtype == "bfloat16" and not has_kernels)


@pytest.mark.parametrize("script", [train, pixelcnn])
def test_the_benchmark_flags_are_no_setting_of_a_run(script):
    """--benchmark and its counts parse into the benchmark's own config, so no checkpoint records them."""
    cfg, _, bench = script.parse_args(["--benchmark", "--benchmark-steps", "7", "--benchmark-warmup", "2"])
    assert (bench.benchmark, bench.benchmark_steps, bench.benchmark_warmup) == (True, 7, 2)
    assert not any(name.startswith("benchmark") for name in vars(cfg))
