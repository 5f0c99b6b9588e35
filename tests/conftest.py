import pytest

from dataset import make_demo


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A demo set of 2 train, 1 validate and 1 test subject with 4 slices each."""
    return make_demo(tmp_path_factory.mktemp("data") / "demo", seed=1, n_train=2, n_validate=1,
                     n_test=1, n_slices=4, progress=False)
