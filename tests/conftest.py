"""Fixtures and tiny configurations every test module shares."""
import pytest

from demo import make_demo

# A VQ-VAE and a prior small enough to train end to end in seconds on a CPU at 32x32.
TINY_VQVAE = ["--image-size", "32", "--hidden", "16", "--res-hidden", "8", "--num-codes", "16",
              "--code-dim", "8", "--batch-size", "8", "--log-every", "2"]
TINY_PRIOR = ["--hidden", "8", "--n-layers", "2", "--kernel", "3", "--batch-size", "8"]
# The same at batch 2, so the 8 training slices of tiny_demo make 4 steps an epoch: room to
# stop, resume and run out of a time budget mid-epoch.
TINY_VQVAE_BATCH_2 = ["--image-size", "32", "--hidden", "16", "--res-hidden", "8", "--num-codes", "16",
                      "--code-dim", "8", "--batch-size", "2", "--dead-code-steps", "3"]
TINY_PRIOR_BATCH_2 = ["--hidden", "8", "--n-layers", "2", "--kernel", "3", "--batch-size", "2"]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A demo set of 2 train, 1 validate and 1 test subject with 4 slices each."""
    return make_demo(tmp_path_factory.mktemp("data") / "demo", seed=1, n_train=2, n_validate=1,
                     n_test=1, n_slices=4, progress=False)
