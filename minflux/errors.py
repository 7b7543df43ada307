"""The project's one error: `CheckpointError`, a file that could not be read, written or matched to a model.

Every command answers it with one line and exit status 2 (`minflux_cli.main`). Its message names the file
(or key, or argument) and the cause.
"""


class CheckpointError(Exception):
    """A checkpoint could not be read, written or matched to a model; the message says where and why."""
