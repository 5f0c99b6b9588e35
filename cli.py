"""The command line every script shares: flags built from config dataclasses, named presets,
and running a script's work with its expected failures turned into one-line errors."""
import argparse
import dataclasses
import sys

import torch

from errors import CheckpointError, DataError, FlagError, NonFiniteLoss, OutputError


def opt(default, help, **extra):
    """A config field with its command-line help."""
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def in_range(kind, minimum, maximum=None):
    """An argparse type that also refuses values below `minimum` (and above `maximum`, if given)."""
    def convert(text):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
        return value
    convert.__name__ = kind.__name__
    return convert


def add_config_flags(parser, config_cls):
    """One flag per dataclass field; the flag's type follows the default's type."""
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = {"default": default, "help": f.metadata.get("help", " ")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, (list, tuple)):  # a list of the type of its first entry
            kwargs.update(type=type(default[0]) if default else float, nargs="*")
        elif "minimum" in f.metadata:
            kwargs["type"] = in_range(type(default), f.metadata["minimum"], f.metadata.get("maximum"))
        else:
            kwargs["type"] = type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the script's docstring as written and shows every flag's default."""


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_configs(description, config_classes, argv=None, presets=None, default_preset=None):
    """Parse the flags of several config dataclasses at once; returns one instance each.

    presets: {name: {field: value}}, chosen with --preset NAME; flags given explicitly
    still win over the preset's values. default_preset(args) names the preset used when
    none is given (args: the flags parsed so far), with a line of help saying how it picks."""
    parser = OneLineErrorParser(description=description, formatter_class=HelpFormatter)
    if presets:
        pick = f"; when not given, {default_preset.__doc__.strip()}" if default_preset else ""
        parser.add_argument("--preset", choices=sorted(presets), default=None,
                            help="start from a named set of defaults" + pick + ": " + "; ".join(
                                f"{name}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in values.items())
                                for name, values in presets.items()))
    for cls in config_classes:
        add_config_flags(parser, cls)
    if presets:
        known = parser.parse_known_args(argv)[0]
        chosen = known.preset or (default_preset(known) if default_preset else None)
        if chosen:
            parser.set_defaults(**presets[chosen])
    args = vars(parser.parse_args(argv))
    return [cls(**{f.name: args[f.name] for f in dataclasses.fields(cls)})
            for cls in config_classes]


def die(message):
    """Stop a script with a one-line error instead of a traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_script(work, batch_size=None):
    """Run a script's work, turning expected failures into one-line errors (exit 2)."""
    try:
        return work()
    except FlagError as err:
        die(f"{err} (see --help)")
    except (DataError, CheckpointError, NonFiniteLoss, OutputError) as err:
        die(err)
    except torch.OutOfMemoryError:
        hint = f" (now {batch_size})" if batch_size else ""
        die(f"out of GPU memory; try a smaller --batch-size{hint}")
    except KeyboardInterrupt as err:
        die(err if str(err) else "interrupted")

