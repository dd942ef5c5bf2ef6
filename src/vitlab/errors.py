"""The errors a user can cause. Each names the file or field at fault and says what to do.

The CLI catches :class:`VitlabError` and prints its message in one or two lines, without a traceback.
"""

from __future__ import annotations


class VitlabError(Exception):
    """Base class of every error vitlab raises for bad input (files, configs, arguments)."""


class ConfigError(VitlabError, ValueError):
    """A configuration field holds a value that cannot work."""


class DataError(VitlabError):
    """A dataset file or folder is missing, empty, corrupt or inconsistent."""


class ImageTooLargeError(DataError):
    """An image has more pixels than the reader allows (a decompression bomb, or a limit the caller set)."""


class CheckpointError(VitlabError):
    """A checkpoint or weight file is missing, corrupt, or does not fit the model."""


class MissingExtraError(VitlabError, ImportError):
    """An optional part of vitlab needs a package that is not installed; the message names the extra to install."""
