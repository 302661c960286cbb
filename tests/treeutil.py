"""Compare directory trees by content: what a user means by "the copy is identical"."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path


def digest(root: Path, times: bool = False) -> dict:
    """relpath -> (kind, mode, content hash or link target[, mtime]) for everything under root;
    plus the groups of hard-linked paths."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entry = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                entry = ("dir", stat.S_IMODE(st.st_mode))
            else:
                entry = (
                    "file",
                    stat.S_IMODE(st.st_mode),
                    st.st_size,
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
                if st.st_nlink > 1:
                    inodes.setdefault(st.st_ino, []).append(rel)
            if times and not stat.S_ISLNK(st.st_mode) and not stat.S_ISDIR(st.st_mode):
                entry += (st.st_mtime_ns,)
            out[rel] = entry
    out["<hardlinks>"] = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return out


def make_source_tree(root: Path) -> Path:
    """Real text and binaries from this machine, with symlinks, hard links, an empty file, a
    sparse file and odd names."""
    root.mkdir(parents=True)
    licenses = Path("/usr/share/common-licenses")
    shutil.copytree(licenses, root / "licenses", symlinks=True)
    py = Path(os.__file__).parent
    (root / "py").mkdir()
    for name in ["os.py", "shutil.py", "tarfile.py", "json/__init__.py", "json/decoder.py"]:
        dst = root / "py" / name.replace("/", "_")
        shutil.copy2(py / name, dst)
    shutil.copy2("/bin/ls", root / "ls.bin")
    (root / "empty").write_bytes(b"")
    with open(root / "sparse", "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
    (root / "bin").mkdir()
    (root / "bin" / "random").write_bytes(os.urandom(300_000))
    (root / "odd name with spaces & ünïcode").write_text("odd\n")
    os.symlink("licenses/GPL-3", root / "gpl-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.link(root / "py" / "os.py", root / "os-hardlink.py")
    os.chmod(root / "ls.bin", 0o755)
    return root
