"""The filesystem's typed errors. Everything below the FUSE edge raises these; only the edge
(llmfs/fuseops.py) turns them into errno, one class per errno."""


class FsError(Exception):
    """A filesystem operation failed in a way POSIX names (the edge maps the class to errno)."""


class NotFound(FsError):
    pass


class Exists(FsError):
    pass


class NotEmpty(FsError):
    pass


class NotADirectory(FsError):
    pass


class IsADirectory(FsError):
    pass


class InvalidArgument(FsError):
    pass


class NameTooLong(FsError):
    pass


class NotPermitted(FsError):
    pass


class NoAttribute(FsError):
    pass


class NotSupported(FsError):
    pass


class TooBig(FsError):
    pass


class NoSpace(FsError):
    pass


class CorruptData(FsError):
    """A stored block failed its checksum or could not be decoded: the read fails (EIO), it never
    returns wrong bytes."""
