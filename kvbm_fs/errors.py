"""One error contract for the whole package.

A *miss* is never an exception: lookups return ``None``/``False``/masks.  Misuse
(bad config, wrong layout, illegal lifecycle transitions) raises a subclass of
:class:`KvbmError` that is also a subclass of the matching builtin, so callers
can catch either ``ValueError`` or the precise kvbm_fs type.
"""

from __future__ import annotations


class KvbmError(Exception):
    """Base of every error kvbm_fs raises on purpose."""


class ConfigError(KvbmError, ValueError):
    """A URL, config file, environment variable or option is malformed."""


class UnknownSchemeError(ConfigError):
    """A tier URL names a scheme no tier is registered for."""


class CapacityError(ConfigError):
    """A capacity is too small to hold even one block, or is not a size."""


class LayoutMismatchError(KvbmError, ValueError):
    """Data or a stored namespace does not match the expected KV layout."""


class CorruptBlockError(KvbmError, ValueError):
    """Stored bytes failed verification; they must never be served."""


class TruncatedBlockError(CorruptBlockError):
    """Fewer bytes than the header promises."""


class ForeignBlockError(CorruptBlockError):
    """A valid block, but for another key or namespace than the one asked for."""


class FormatVersionError(CorruptBlockError):
    """A block written by an unknown (newer) format version."""


class IndexCorruptError(KvbmError, OSError):
    """A tier's index is damaged, lost or being rebuilt (errno EUCLEAN, as filesystems report
    corruption). Reads of such an index are misses; the index is rebuilt from the data files."""


class IllegalTransitionError(KvbmError, RuntimeError):
    """A block lifecycle transition that the state machine forbids."""


class PinnedError(IllegalTransitionError):
    """The block is pinned (in use) and cannot be deleted or evicted."""


class TierClosedError(KvbmError, RuntimeError):
    """The tier or store was closed."""
