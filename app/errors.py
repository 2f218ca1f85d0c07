"""Domain errors. Each names the bad value; app/api/errors.py maps them to HTTP codes."""

from __future__ import annotations


class LoragError(Exception):
    """Base of every error lorag raises on purpose."""


class NotFoundError(LoragError):
    """A named thing does not exist (adapter, adapter folder, index)."""


class InvalidInputError(LoragError):
    """A request or file is malformed, unsafe or incompatible; nothing was changed."""


class NotReadyError(LoragError):
    """The service is starting or stopping."""


class DatabaseUnavailable(NotReadyError):
    """The database cannot be reached now (HTTP 503); the message names it without a password."""


class AdapterNotFound(NotFoundError):
    def __init__(self, name: str) -> None:
        super().__init__(f"adapter {name!r} is not loaded")
        self.name = name


class AdapterPathNotFound(NotFoundError):
    def __init__(self, path: str) -> None:
        super().__init__(f"no adapter folder {path!r} under the adapters root")
        self.path = path


class AdapterInvalid(InvalidInputError):
    """Malformed adapter files, or an adapter that does not fit the base model."""


class AdapterStale(LoragError):
    """The files under a registered adapter's folder are not the version the fleet registered
    (a copy not yet synced, or replaced in place): this replica will not serve them."""

    def __init__(self, path: str, expected: str, found: str) -> None:
        super().__init__(
            f"adapter folder {path!r} holds version {found}, but version {expected} is "
            "registered: this replica's copy differs from the registered one"
        )
        self.path = path
        self.expected = expected
        self.found = found


class UnsafePath(InvalidInputError):
    """A path that is absolute, climbs out with '..', or escapes its root by a symlink."""


class IndexNotFound(NotFoundError):
    pass


class IndexInvalid(InvalidInputError):
    """A missing or corrupt index file, or an index built with another encoder."""


class GenerationTimeout(LoragError):
    pass
