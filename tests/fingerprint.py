"""What must stay the same when the code is reorganised, as one JSON file.

    python tests/fingerprint.py OUT.json

Records, in a temporary directory: (a) the sha256 of every PNG of a tiny demo set;
(b) a tiny train -> prior -> predict run, done in-process as tests/test_pipeline.py does
it: the sha256 of every weight tensor of the four checkpoints, their keys, configs and
histories (less wall-clock times), and metrics.json (less times and paths); (c) every
script's command-line flags with their defaults and choices. Two trees behave the same
when their files are identical. Not a test module (no test_ prefix): it takes a minute.
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests"))

TINY_VQVAE = ["--preset", "quick", "--image-size", "32", "--hidden", "16", "--res-hidden", "8", "--num-codes", "16",
              "--code-dim", "8", "--batch-size", "8", "--log-every", "2"]
TINY_PRIOR = ["--hidden", "8", "--n-layers", "2", "--kernel", "3", "--batch-size", "8"]
VOLATILE_METRICS = {"sampling_seconds", "data_root"}


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def demo_pngs(root):
    return {str(path.relative_to(root)): sha256(path.read_bytes()) for path in sorted(root.rglob("*.png"))}


def tensor_digest(tensor):
    tensor = tensor.detach().cpu().contiguous()
    return f"{tensor.dtype}{tuple(tensor.shape)}:{sha256(tensor.numpy().tobytes())}"


def checkpoint_fingerprint(path):
    import torch
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    history = [{k: v for k, v in record.items() if k != "seconds"} for record in ckpt["run"]["history"]]
    # the --benchmark flags are no setting of a run; checkpoints stopped recording them
    train_config = {k: v for k, v in ckpt["train_config"].items() if k != "data" and not k.startswith("benchmark")}
    return {"keys": sorted(ckpt), "kind": ckpt["kind"],
            "model": {name: tensor_digest(t) for name, t in ckpt["model"].items()},
            "model_config": ckpt["model_config"], "train_config": train_config,
            "run": {**{k: v for k, v in ckpt["run"].items() if k != "history"}, "history": history}}


def tiny_pipeline(data, work):
    import pixelcnn
    import predict
    import train
    previous = os.getcwd()
    os.chdir(work)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            train.main(["--data", str(data), "--epochs", "2", *TINY_VQVAE])
            pixelcnn.main(["--data", str(data), "--epochs", "2", *TINY_PRIOR])
            predict.main(["--data", str(data), "--n-samples", "3", "--save-reconstructions",
                          "--sweep-frames", "3"])
    finally:
        os.chdir(previous)
    checkpoints = {name: checkpoint_fingerprint(work / "checkpoints" / name)
                   for name in ("vqvae_last.pt", "vqvae_best.pt", "pixelcnn_last.pt", "pixelcnn_best.pt")}
    metrics = json.loads((work / "out" / "metrics.json").read_text())
    metrics = {k: v for k, v in metrics.items() if k not in VOLATILE_METRICS}
    outputs = {str(p.relative_to(work / "out")): sha256(p.read_bytes())
               for p in sorted((work / "out").rglob("*.png")) if p.parent.name in ("samples", "reconstructions")}
    return {"checkpoints": checkpoints, "metrics": metrics, "sample_and_reconstruction_pngs": outputs}


def describe_parser(parser):
    flags = {}
    for action in parser._actions:
        if not action.option_strings:
            continue
        default = action.default
        if isinstance(default, tuple):
            default = list(default)
        flags[" ".join(action.option_strings)] = {
            "default": default if default is not argparse.SUPPRESS else "==SUPPRESS==",
            "choices": list(action.choices) if action.choices is not None else None,
            "nargs": action.nargs,
            "type": getattr(action.type, "__name__", None),
            "action": type(action).__name__,
            "required": action.required,
        }
    return flags


@contextlib.contextmanager
def parsers_built():
    """Every ArgumentParser that parses a command line inside the block, in order."""
    built = []
    original = argparse.ArgumentParser.parse_args

    def recording(self, *args, **kwargs):
        built.append(self)
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.parse_args = recording
    try:
        yield built
    finally:
        argparse.ArgumentParser.parse_args = original


def cli_flags():
    """Every script's flags as a user of this (GPU-less) machine gets them with no flags given."""
    import anomaly
    import dataset
    import pixelcnn
    import predict
    import sweep
    import train
    try:
        from cli import parse_configs
    except ImportError:  # before the split of utils.py
        from utils import parse_configs

    scripts = {}
    with parsers_built() as built:
        train.parse_args([])
    scripts["train.py"] = describe_parser(built[-1])
    with parsers_built() as built:
        if hasattr(pixelcnn, "parse_args"):
            pixelcnn.parse_args([])
        else:  # before pixelcnn.parse_args
            from modules import PixelCNNConfig
            parse_configs("", [pixelcnn.PriorTrainConfig, PixelCNNConfig], [], pixelcnn.PRESETS,
                          pixelcnn.default_preset)
    scripts["pixelcnn.py"] = describe_parser(built[-1])
    with parsers_built() as built:
        parse_configs("", [predict.PredictConfig], [])
    scripts["predict.py"] = describe_parser(built[-1])
    with parsers_built() as built:
        sweep.parse_args(["--runs", ""])
    scripts["sweep.py"] = describe_parser(built[-1])
    scripts["dataset.py"] = describe_parser(dataset.build_parser())
    with parsers_built() as built:
        parse_configs("", [anomaly.AnomalyConfig], [])
    scripts["anomaly.py"] = describe_parser(built[-1])
    presets = {"train.py": train.PRESETS, "pixelcnn.py": pixelcnn.PRESETS}
    return {"flags": scripts, "presets": json.loads(json.dumps(presets))}


def fingerprint():
    try:
        from demo import make_demo  # where the demo generator lives after the split of dataset.py
    except ImportError:
        from dataset import make_demo
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = make_demo(scratch / "demo", seed=1, n_train=2, n_validate=1, n_test=1, n_slices=4, progress=False)
        pngs = demo_pngs(data)
        work = scratch / "run"
        work.mkdir()
        run = tiny_pipeline(data, work)
    return {"demo_pngs": pngs, "tiny_run": run, "cli": cli_flags()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the JSON file to write")
    args = parser.parse_args(argv)
    Path(args.out).write_text(json.dumps(fingerprint(), indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
