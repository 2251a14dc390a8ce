"""The exceptions a user can cause. Each names where the problem is (file, line, field)."""

from __future__ import annotations


class PosttrainError(Exception):
    """Base class for every error caused by user input (config, data, paths)."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        super().__init__(self._format())

    def __reduce__(self):
        # Pickled whole (file, line and field kept), as torch.distributed passes a refusal from rank 0 to the others.
        return _rebuild, (type(self), self.message, self.file, self.line, self.field)

    def _format(self) -> str:
        where = ""
        if self.file is not None:
            where = f"{self.file}:{self.line}: " if self.line is not None else f"{self.file}: "
        field = f"{self.field}: " if self.field else ""
        return f"{where}{field}{self.message}"


def _rebuild(cls: type[PosttrainError], message: str, file: str | None, line: int | None,
             field: str | None) -> PosttrainError:
    return cls(message, file=file, line=line, field=field)


class ConfigError(PosttrainError):
    """A recipe or override names an unknown key, has a wrong type or an out-of-range value."""


class DataError(PosttrainError):
    """A data file or row cannot be used: missing, malformed, or inconsistent."""


class RunDirError(PosttrainError):
    """The run directory cannot be used as asked (exists without overwrite/resume, or is missing)."""
