"""The errors a script reports as one line instead of a traceback.

Everything the project raises on purpose is one of these, with a message that names the file
or flag at fault; cli.run_script turns them into `error: ...` and exit status 2."""


class DataError(Exception):
    """A problem with the data on disk; the message is one line and names the path."""


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable or of the wrong kind; one-line message."""


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; nothing was saved from that point on."""


class OutputError(Exception):
    """A file that could not be written (a full disk, no permission); the file it was to replace
    is left as it was."""


class FlagError(Exception):
    """A flag given a value the script cannot use; the message names the flag."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
