"""The kernel's table of mounts (/proc/mounts) as llmfs reads it: which llmfs mounts exist, and
which store each one serves. `llmfs umount` and `llmfs stat` use it."""
from __future__ import annotations

from collections.abc import Iterator

FSTYPE = "fuse.llmfs"


def unescape(field: str) -> str:
    """A /proc/mounts field with the kernel's octal escapes (space, tab, newline, backslash) undone."""
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def llmfs_mounts(table: str = "/proc/mounts") -> Iterator[tuple[str, str]]:
    """(store path, mount point) of every llmfs mount, in the table's order."""
    with open(table) as f:
        for line in f:
            source, target, fstype = line.split()[:3]
            if fstype == FSTYPE:
                yield unescape(source), unescape(target)
