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


class UnsafePath(InvalidInputError):
    """A path that is absolute, climbs out with '..', or escapes its root by a symlink."""


class IndexNotFound(NotFoundError):
    pass


class IndexInvalid(InvalidInputError):
    """A missing or corrupt index file, or an index built with another encoder."""


class GenerationTimeout(LoragError):
    pass
