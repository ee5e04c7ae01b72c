"""The project's own error types.

Every failure a user can cause (a bad image, a hostile checkpoint, a wrong config) surfaces as
one of these, with a message that names the input and the problem. Anything else escaping is a
bug in jaxdream.
"""

from __future__ import annotations


class JaxdreamError(Exception):
    """Base class: an error caused by input, reported to the user as one readable line."""


class ImageError(JaxdreamError):
    """An input image cannot be read, decoded or converted."""


class CheckpointError(JaxdreamError):
    """A checkpoint file is unreadable, malformed, or asks for something we refuse to do."""


class ConversionError(JaxdreamError):
    """A state dict does not fit a model: missing, unexpected or mis-shaped keys."""


class ConfigError(JaxdreamError):
    """A recipe, option or config value is unknown, of the wrong type, or impossible."""


class JobError(JaxdreamError):
    """A job as a whole cannot go on (no cluster, no worker, the manifest cannot be written)."""


def brief(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for quoting untrusted values in a
    message: a recipe or config can hold a megabyte where a name was expected."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def first_few(items: list[object], count: int = 5) -> str:
    """The first ``count`` of ``items``, each :func:`brief`, and how many more, so a list of
    100,000 offenders is one short line: ``-1, -2, -3, -4, -5 and 99995 more``."""
    shown = ", ".join(brief(item, 30) for item in items[:count])
    return shown + (f" and {len(items) - count} more" if len(items) > count else "")
