"""`-o` options are checked before the store is touched: an option llmfs sets itself
(fsname, subtype) or does not pass to FUSE fails at once with a clear message, and the store stays
as it was (a failure after it was marked in use would leave it unclean: a restart loop under
systemd)."""

from __future__ import annotations

import pytest

from llmfs.mount import MountError, parse_options
from llmfs.store import Store

from .conftest import llmfs


def test_supported_options_pass():
    assert parse_options(["allow_other,noatime", "ro", " nodev , nosuid", ""]) == {
        "allow_other": True,
        "noatime": True,
        "ro": True,
        "nodev": True,
        "nosuid": True,
    }
    assert parse_options(["context=system_u:object_r:tmp_t:s0"]) == {"context": "system_u:object_r:tmp_t:s0"}


@pytest.mark.parametrize(
    "option, says",
    [
        ("fsname=/etc", "set by llmfs"),
        ("subtype=other", "set by llmfs"),
        ("kernel_cache", "unsupported mount option 'kernel_cache'"),
        ("attr_timeout=5", "unsupported"),
        ("modules=subdir", "unsupported"),
        ("max_read=4096", "unsupported"),
        ("ro=1", "takes no value"),
        ("context=", "needs an SELinux context"),
    ],
)
def test_unsupported_options_are_refused(option, says):
    with pytest.raises(MountError, match=says):
        parse_options(["allow_other", option])


@pytest.mark.parametrize("how", ["-o", "config"])
@pytest.mark.parametrize("option", ["fsname=x", "subtype=llmfs2", "kernel_cache"])
def test_mount_refuses_before_touching_the_store(tmp_path, how, option):
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    llmfs("mkfs", store)
    before = sorted(p.name for p in store.iterdir())
    if how == "-o":
        args = [store, mnt, "-o", f"allow_other,{option}"]
    else:
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'store = "{store}"\nmountpoint = "{mnt}"\noptions = ["{option}"]\n')
        args = ["--config", cfg]
    for fg in ([], ["-f"]):
        res = llmfs("mount", *args, *fg, check=False)
        assert res.returncode == 2, res.stdout + res.stderr
        assert option.partition("=")[0] in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in store.iterdir()) == before  # no lock file, no log
    s = Store(str(store), lock=False)
    try:
        assert s.was_clean()
    finally:
        s.close()
