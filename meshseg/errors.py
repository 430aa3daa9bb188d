"""Errors that reach users as one line.

The library raises these; only ``cli.py`` catches them, prints the message and
turns it into an exit status. Each message names the file and the problem.
"""


class MeshsegError(Exception):
    """A problem the user can fix; its message is shown as is, without traceback."""


class InputError(MeshsegError):
    """An input image is missing, unreadable or not a usable 3-D scan."""


class OutputError(MeshsegError):
    """An output file cannot be written."""


class ForeignOutputError(OutputError):
    """An output's path holds a file that meshseg did not make (no record says so)."""


class WeightsError(MeshsegError):
    """A model checkpoint is missing, malformed or fails its checksum."""


class DeviceError(MeshsegError):
    """The requested compute device is not available."""
