"""mount(8)/umount(8) helpers: `mount -t fuse.llmfs STORE DIR -o OPTS` and an /etc/fstab line.

mount(8) runs `/sbin/mount.fuse.llmfs STORE DIR [-sfnv] [-o OPTS] [-t fuse.llmfs]` for a
`fuse.llmfs` type (before falling back to mount.fuse3, which would run a program named after the
subtype, `llmfs STORE DIR -o OPTS`, a calling convention our CLI does not have). umount(8) likewise
runs `/sbin/umount.fuse.llmfs DIR [-nlfvr]` if it exists: we use it so that a plain `umount` waits,
like `llmfs umount`, until buffered writes are flushed and the daemon has exited. `make setup`
links both into /sbin.

Options are sorted three ways:
  - for mount(8), fstab or systemd only (noauto, _netdev, x-systemd.*, nofail, user, ...): dropped;
  - llmfs's own (config=FILE, dirty_limit=SIZE, cache_size=SIZE, debug): become arguments;
  - everything else (allow_other, ro, noatime, ...): passed to FUSE as -o.
"""

from __future__ import annotations

import sys

from . import cli

# Meant for mount(8), fstab or systemd's fstab generator; FUSE would reject them.
FOR_MOUNT = {
    "auto",
    "noauto",
    "nofail",
    "_netdev",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "defaults",
    "loop",
}
FOR_MOUNT_PREFIXES = ("x-", "comment=", "_netdev")
# llmfs mount arguments given as -o key[=value]
OWN = {"config": "--config", "dirty_limit": "--dirty-limit", "cache_size": "--cache-size"}


def split_options(text: str) -> tuple[list[str], list[str], bool]:
    """-o text → (llmfs arguments, FUSE options, debug)."""
    own, fuse, debug = [], [], False
    for item in filter(None, (i.strip() for i in text.split(","))):
        key, eq, value = item.partition("=")
        if key in FOR_MOUNT or item.startswith(FOR_MOUNT_PREFIXES):
            continue
        if key == "debug" and not eq:
            debug = True
        elif key in OWN and eq:
            own += [OWN[key], value]
        else:
            fuse.append(item)
    return own, fuse, debug


def parse_helper_args(argv: list[str]) -> tuple[list[str], str, bool, bool]:
    """mount(8)'s helper calling convention → (positionals, -o text, fake, verbose)."""
    positionals, opts, fake, verbose = [], [], False, False
    it = iter(argv)
    for a in it:
        if a == "-o":
            opts.append(next(it, ""))
        elif a.startswith("-o") and len(a) > 2:
            opts.append(a[2:])
        elif a == "-t":
            next(it, None)  # fuse.llmfs: we know
        elif a.startswith("-") and len(a) > 1:
            fake |= "f" in a
            verbose |= "v" in a  # -s (sloppy), -n (no mtab), -r, -l, ... change nothing for us
        else:
            positionals.append(a)
    return positionals, ",".join(opts), fake, verbose


def mount_main(argv: list[str] | None = None) -> int:
    positionals, opts, fake, verbose = parse_helper_args(sys.argv[1:] if argv is None else argv)
    if len(positionals) != 2:
        print("usage: mount.fuse.llmfs STORE MOUNTPOINT [-o OPTIONS]", file=sys.stderr)
        return 1  # mount(8): 1 = incorrect invocation
    own, fuse, debug = split_options(opts)
    cmd = (["--debug"] if debug else []) + ["mount", *positionals, *own]
    if fuse:
        cmd += ["-o", ",".join(fuse)]
    if verbose or fake:
        print("llmfs " + " ".join(cmd))
    if fake:
        return 0
    # 32 = mount failure, for mount(8) and systemd
    return 0 if cli.main(cmd) == 0 else 32


def umount_main(argv: list[str] | None = None) -> int:
    positionals, _, _, _ = parse_helper_args(sys.argv[1:] if argv is None else argv)
    args = sys.argv[1:] if argv is None else argv
    lazy = any(a.startswith("-") and not a.startswith("--") and "l" in a for a in args)
    if len(positionals) != 1:
        print("usage: umount.fuse.llmfs MOUNTPOINT [-l]", file=sys.stderr)
        return 1
    return 0 if cli.main(["umount", *(["--lazy"] if lazy else []), positionals[0]]) == 0 else 32
