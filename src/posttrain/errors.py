"""The exceptions a user can cause. Each names where the problem is (file, line, field)."""

from __future__ import annotations

import errno
import re


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


# What the storage answers when it refuses a write: a full disk, a quota, a read-only file system, the process's
# file-size limit, a failing device, no permission.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO, errno.EACCES,
                            errno.EPERM})


def refused_write(err: BaseException) -> tuple[str, str | None] | None:
    """(the reason, the file or None) when `err` is the storage refusing a file (`STORAGE_ERRNOS`; also safetensors'
    own error, which carries the I/O error in its text and no file name); None for any other error."""
    # No permission is the storage's only for a file (os.kill's EPERM is not); a full disk's write names none.
    if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS and (
            err.filename is not None or err.errno not in (errno.EACCES, errno.EPERM)):
        return err.strerror or str(err), None if err.filename is None else str(err.filename)
    if type(err).__name__ == "SafetensorError" and "I/O error: " in str(err):
        first = str(err).strip().splitlines()[0]
        return re.sub(r"\s*\(os error \d+\)$", "", first.rpartition("I/O error: ")[2]), None
    return None


def storage_fault(err: BaseException, then: str = "") -> RunDirError | None:
    """`err` as one line when the storage refused a file (`refused_write`): the file, the reason and `then` (what the
    user can do next). None for any other error, which stays what it is."""
    refused = refused_write(err)
    if refused is None:
        return None
    reason, file = refused
    message = reason if file is not None else f"a file could not be written ({reason})"
    return RunDirError(message + (f"; {then}" if then else ""), file=file)
