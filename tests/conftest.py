"""Fixtures every test module shares: tiny flag sets, a tiny demo set, a tiny VQ-VAE and prior
trained once per test run, and small helpers. Test modules take these as fixtures; none imports
another test module (nor this one)."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pixelcnn
import train
import training
from cli import parse_configs
from demo import make_demo
from modules import PixelCNNConfig


@dataclasses.dataclass(frozen=True)
class TinyFlags:
    """Flags of a VQ-VAE and a prior small enough to train end to end in seconds on a CPU at
    32x32. Every set pins --dtype float32: `--dtype auto` would pick bf16 on CPUs with its
    kernels and float32 elsewhere, and a test must train the same way on every CPU. The VQ-VAE
    sets pin --preset quick: a --data folder would otherwise pick the full-resolution one."""
    vqvae: tuple = ("--preset", "quick", "--image-size", "32", "--hidden", "16", "--res-hidden", "8", "--num-codes", "16",
                    "--code-dim", "8", "--batch-size", "8", "--log-every", "2", "--dtype", "float32")
    prior: tuple = ("--hidden", "8", "--n-layers", "2", "--kernel", "3", "--batch-size", "8",
                    "--dtype", "float32")
    # The same at batch 2, so the 8 training slices of tiny_demo make 4 steps an epoch: room to
    # stop, resume and run out of a time budget mid-epoch.
    vqvae_batch_2: tuple = ("--preset", "quick", "--image-size", "32", "--hidden", "16", "--res-hidden", "8", "--num-codes", "16",
                            "--code-dim", "8", "--batch-size", "2", "--dead-code-steps", "3", "--dtype", "float32")
    prior_batch_2: tuple = ("--hidden", "8", "--n-layers", "2", "--kernel", "3", "--batch-size", "2",
                            "--dtype", "float32")


@dataclasses.dataclass(frozen=True)
class TinyModels:
    """A trained tiny VQ-VAE and prior (tiny_models). Tests read these files, never write them:
    a test that resumes or changes a run copies them first."""
    work: Path    # the working directory they were trained in (checkpoints/, out/progress/)
    data: Path    # the tiny demo set they were trained on
    vqvae: Path   # checkpoints/vqvae_best.pt
    prior: Path   # checkpoints/pixelcnn_best.pt


@pytest.fixture(scope="session")
def tiny_flags():
    return TinyFlags()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A demo set of 2 train, 1 validate and 1 test subject with 4 slices each."""
    return make_demo(tmp_path_factory.mktemp("data") / "demo", seed=1, n_train=2, n_validate=1,
                     n_test=1, n_slices=4, progress=False)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_demo, tiny_flags):
    """A tiny VQ-VAE and prior trained once per test run on tiny_demo, as a user trains them
    (train.py, then pixelcnn.py, in their own working directory), in float32.

    Batch 2 gives 4 steps an epoch; these epochs take seconds and give reconstructions that
    follow the head and a prior that knows background from brain."""
    work = tmp_path_factory.mktemp("tiny_models")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work)
        train.main(["--data", str(tiny_demo), "--epochs", "60", "--lr", "3e-3", *tiny_flags.vqvae_batch_2])
        pixelcnn.main(["--data", str(tiny_demo), "--epochs", "24", *tiny_flags.prior_batch_2])
    return TinyModels(work=work, data=tiny_demo, vqvae=work / "checkpoints" / "vqvae_best.pt",
                      prior=work / "checkpoints" / "pixelcnn_best.pt")


@pytest.fixture(scope="session")
def prior_configs(tiny_flags):
    """prior_configs(folder, data, vqvae, *flags) -> (PriorTrainConfig, PixelCNNConfig) of a tiny
    prior at batch 2 that keeps its checkpoints in folder/prior."""
    def configs(folder, data, vqvae, *extra):
        return parse_configs("", [pixelcnn.PriorTrainConfig, PixelCNNConfig],
                             ["--data", str(data), "--vqvae", str(vqvae),
                              "--checkpoint-dir", str(Path(folder) / "prior"), *tiny_flags.prior_batch_2, *extra])
    return configs


@pytest.fixture(scope="session")
def write_png():
    """write_png(path, pixels, mode=None) writes an array as a PNG (making its folder); -> path."""
    def write(path, pixels, mode=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(np.asarray(pixels), mode=mode) if mode else Image.fromarray(np.asarray(pixels))
        image.save(path)
        return path
    return write


@pytest.fixture(scope="session")
def assert_one_line_naming():
    """assert_one_line_naming(error_info, path): the raised error's message is one line naming path."""
    def check(error_info, path):
        message = str(error_info.value)
        assert "\n" not in message
        assert str(path) in message
    return check


@pytest.fixture()
def ticking_clock(monkeypatch):
    """The time budgets (training.TimeBudget) read a clock that moves one second at every reading,
    so a budget in minutes is a number of readings, the same on every machine."""
    readings = iter(range(1, 10 ** 9))
    monkeypatch.setattr(training.TimeBudget, "clock", staticmethod(lambda: float(next(readings))))
