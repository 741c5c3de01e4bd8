"""The one exception family of mosconv.

Every error raised on bad user input is a :class:`MosconvError`; format and
configuration errors are also :class:`ValueError`, so callers that catch
``ValueError`` keep working.  Messages name the file (or argument), the value
and the problem, in one line.
"""

from __future__ import annotations


class MosconvError(Exception):
    """Base class of every error mosconv raises on purpose.

    Attributes:
        options: names of the library parameters that would fix the problem (for example
            ``("overwrite",)``); the command line shows them as its options
            (``--overwrite``).  Messages themselves never name command-line flags.
    """

    def __init__(self, *args: object, options: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.options = tuple(options)


class FormatError(MosconvError, ValueError):
    """An input file or folder is missing, unreadable, corrupt or of an unknown format."""


class ConfigError(MosconvError, ValueError):
    """An argument or setting has an invalid value."""


class UnsupportedAdapterError(FormatError):
    """A well-formed adapter that mosconv refuses on purpose (e.g. DoRA)."""


class NumericalError(MosconvError, ValueError):
    """Numbers turned non-finite (NaN or Inf) while computing: a base model that overflows,
    a diverging optimization. Nothing is written when it is raised."""


def check_seed(seed: object) -> None:
    """Raise :class:`ConfigError` unless ``seed`` is an integer that seeds every random
    step mosconv takes (scikit-learn's ``random_state``: ``0 .. 2**32 - 1``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed must be an integer in 0 .. 2**32 - 1, got {seed!r}",
                          options=("seed",))
