"""llmfs as a system service: the systemd unit verifies; the unit's ExecStart reports READY=1
only once the mount answers and stops cleanly on SIGTERM (twice, even); `mount -t fuse.llmfs`, an
fstab line and `umount` work; config files are validated key by key."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llmfs import config, mounthelper, service
from llmfs.umount import wait_for_store

from .conftest import ROOT, daemon_pid, force_unmount, in_proc_mounts, llmfs, needs_fuse

UNIT = ROOT / "systemd" / "llmfs@.service"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of a FUSE type needs root")


def unit_exec_start() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("ExecStart="):
            return shlex.split(line.removeprefix("ExecStart="))
    raise AssertionError("no ExecStart in the unit")


# -- the unit ------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_verifies():
    exe = unit_exec_start()[0]
    if not os.path.exists(exe):
        pytest.skip(f"{exe} is missing: `make setup` links it as root")
    res = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True)
    assert res.returncode == 0 and not res.stderr.strip(), res.stderr
    assert os.path.realpath(exe) == os.path.realpath(ROOT / ".venv" / "bin" / "llmfs")
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "DeviceAllow=/dev/fuse rw",
        "SystemCallFilter=@system-service @mount",
    ):
        assert f"\n{line}\n" in text
    # Each of these puts the service in a mount namespace whose mounts never reach the host.
    for opt in (
        "ProtectSystem",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateMounts",
        "ReadWritePaths",
        "ProtectKernelTunables",
        "MemoryDenyWriteExecute",
    ):
        assert f"\n{opt}=" not in text, f"{opt} would hide the FUSE mount from the host"


# -- sd_notify and logging -----------------------------------------------------------------------


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"llmfs-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert service.notify("READY=1", "STATUS=ok")
        assert s.recv(4096) == b"READY=1\nSTATUS=ok"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not service.notify("READY=1")  # outside systemd: nothing, no error


def test_journal_lines_carry_a_priority_and_no_timestamp():
    record = service.logging.LogRecord("llmfs", service.logging.WARNING, "", 0, "a\nb", (), None)
    assert service.JournalFormatter("%(message)s").format(record) == "<4>a | b"


# -- config files --------------------------------------------------------------------------------


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_reads_every_key_and_resolves_paths(tmp_path):
    cfg = config.load(
        write_config(
            tmp_path / "c.toml",
            """
        store = "store"
        mountpoint = "/mnt/x"
        options = ["allow_other", "noatime"]
        log_level = "warning"
        model = "smollm2"
        device = "cpu"
        threads = 4
        [write]
        dirty_limit = "8M"
        [cache]
        ram = 1048576
        gpu = "1G"
        [compaction]
        enabled = false
        after = "2h"
    """.replace("\n        ", "\n"),
        )
    )
    assert cfg.options == ["allow_other", "noatime"] and cfg.log_level == "warning"
    args = llmfs_mount_args()
    config.apply(cfg, args)
    assert args.store == str(tmp_path / "store") and args.mountpoint == "/mnt/x"
    assert args.options == ["allow_other,noatime"]
    assert args.dirty_limit == 8 << 20 and args.cache_size == 1 << 20
    assert args.gpu_cache_size == 1 << 30
    assert args.no_compaction is True and args.compact_after == 7200
    assert args.device == "cpu" and args.threads == 4
    assert cfg.not_yet == ["model"]  # chosen at mkfs: accepted, reported as having no effect


@pytest.mark.parametrize(
    "text, message",
    [
        ('stor = "/x"', "unknown key 'stor'"),
        ('[cache]\nsize = "1M"', "unknown key 'cache.size'"),
        ("[compacton]\nenabled = false", "unknown section [compacton]"),
        ('[write]\ndirty_limit = "lots"', "write.dirty_limit: 'lots' is not a size"),
        ('[compaction]\nafter = "soon"', "compaction.after: 'soon' is not a duration"),
        ('[compaction]\nenabled = "no"', "compaction.enabled: must be true or false"),
        ('log_level = "loud"', "log_level: must be one of"),
        ("threads = 0", "threads: must be a positive integer"),
        ('device = "tpu"', "device: must be one of"),
        ('options = "allow_other', "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    path = write_config(tmp_path / "bad.toml", text)
    with pytest.raises(config.ConfigError, match=r"bad\.toml") as e:
        config.load(path)
    assert message in str(e.value)
    res = llmfs("mount", "--config", path, "-f", check=False)
    assert res.returncode == 1 and message in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1


def test_command_line_overrides_config(tmp_path):
    cfg = config.load(
        write_config(
            tmp_path / "c.toml",
            'store = "/a"\nmountpoint = "/b"\noptions = ["ro"]\n[write]\ndirty_limit = "1M"\n',
        )
    )
    args = llmfs_mount_args("--config", "c.toml", "/other", "-o", "rw", "--dirty-limit", "2M")
    config.apply(cfg, args)
    assert (args.store, args.mountpoint, args.dirty_limit) == ("/other", "/b", 2 << 20)
    assert args.options == ["ro", "rw"]  # the later -o wins in parse_options


def llmfs_mount_args(*argv):
    from llmfs.cli import build_parser

    return build_parser().parse_args(["mount", *argv])


def test_mount_helper_sorts_options():
    own, fuse, debug = mounthelper.split_options(
        "rw,noauto,_netdev,x-systemd.automount,x-systemd.idle-timeout=60,nofail,defaults,"
        "allow_other,noatime,config=/etc/llmfs/a.toml,dirty_limit=8M,debug,comment=x"
    )
    assert own == ["--config", "/etc/llmfs/a.toml", "--dirty-limit", "8M"]
    assert fuse == ["rw", "allow_other", "noatime"] and debug
    assert mounthelper.parse_helper_args(["s", "m", "-n", "-o", "a,b", "-t", "fuse.llmfs"]) == (
        ["s", "m"],
        "a,b",
        False,
        False,
    )


# -- the service's ExecStart under a NOTIFY_SOCKET we own ----------------------------------------


class Service:
    """`llmfs mount --config FILE -f` started as systemd would: NOTIFY_SOCKET, INVOCATION_ID."""

    def __init__(self, tmp_path: Path):
        self.store, self.mnt = tmp_path / "store", tmp_path / "mnt"
        self.mnt.mkdir()
        llmfs("mkfs", self.store)
        self.config = write_config(
            tmp_path / "svc.toml",
            f'store = "{self.store}"\nmountpoint = "{self.mnt}"\n[write]\ndirty_limit = "32M"\n',
        )
        self.sock_path = str(tmp_path / "notify.sock")
        self.stderr_path = tmp_path / "stderr"
        self.proc = None

    def start(self) -> None:
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.sock_path)
        exe, *argv = unit_exec_start()
        assert argv == ["mount", "--config", "/etc/llmfs/%i.toml", "-f"]
        argv[2] = str(self.config)
        self.stderr = open(self.stderr_path, "a")
        st = os.fstat(self.stderr.fileno())  # stderr "is the journal": see stderr_is_journal()
        env = dict(
            os.environ,
            NOTIFY_SOCKET=self.sock_path,
            INVOCATION_ID="0" * 32,
            JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmfs.cli", *argv], env=env, stdin=subprocess.DEVNULL, stderr=self.stderr
        )

    def recv(self, timeout: float = 60) -> dict:
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def wait(self, timeout: float = 120) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.sock.close()
        self.stderr.close()
        return rc

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def cleanup(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if in_proc_mounts(self.mnt):
            force_unmount(self.mnt)


@pytest.fixture
def svc(tmp_path):
    s = Service(tmp_path)
    try:
        yield s
    finally:
        s.cleanup()
    bad = [
        line
        for line in s.log().splitlines()
        if line.startswith(("<0>", "<1>", "<2>", "<3>")) or "Traceback" in line
    ]
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad)


@needs_fuse
@pytest.mark.mount
def test_service_ready_only_when_mounted_and_sigterm_stops_cleanly(svc):
    svc.start()
    msg = svc.recv()
    # the first datagram is READY=1, sent from FUSE's init: by then the mount exists and answers
    assert msg.get("READY") == "1", msg
    assert in_proc_mounts(svc.mnt) and os.listdir(svc.mnt) == []
    assert "serving" in msg.get("STATUS", "")
    synced, buffered = os.urandom(300_000), b"buffered line\n" * 50_000
    with open(svc.mnt / "synced", "wb") as f:
        f.write(synced)
        os.fsync(f.fileno())
    with open(svc.mnt / "buffered", "wb") as f:  # closed but not fsync'ed: below the dirty limit
        f.write(buffered)

    svc.proc.send_signal(signal.SIGTERM)
    assert svc.recv().get("STOPPING") == "1"
    assert svc.wait() == 0, svc.log()
    assert not in_proc_mounts(svc.mnt)
    # journal format: one line per event, priority prefix, no timestamp (journald adds it)
    assert f"<6>mounted {svc.store} on {svc.mnt}\n" in svc.log()
    assert "<6>stopping on a signal" in svc.log() and f"<6>unmounted {svc.mnt}\n" in svc.log()

    llmfs("mount", svc.store, svc.mnt)
    try:
        assert (svc.mnt / "synced").read_bytes() == synced
        assert (svc.mnt / "buffered").read_bytes() == buffered
    finally:
        llmfs("umount", svc.mnt)
    log = (svc.store / "llmfs.log").read_text()
    assert "not unmounted cleanly" not in log, "SIGTERM left the store unclean"


@needs_fuse
@pytest.mark.mount
def test_second_sigterm_during_the_flush_loses_nothing(svc):
    svc.start()
    assert svc.recv().get("READY") == "1"
    synced = os.urandom(200_000)
    with open(svc.mnt / "synced", "wb") as f:
        f.write(synced)
        os.fsync(f.fileno())
    # ~24 MiB of buffered writes (under the 32M dirty limit) to keep the final flush busy
    files = {f"b{i}": (f"file {i} ".encode() + os.urandom(64)) * 40_000 for i in range(8)}
    for name, data in files.items():
        (svc.mnt / name).write_bytes(data)

    svc.proc.send_signal(signal.SIGTERM)
    assert svc.recv().get("STOPPING") == "1"
    try:
        svc.proc.send_signal(signal.SIGTERM)
    except ProcessLookupError:
        pass  # already done flushing
    assert svc.wait() == 0, svc.log()
    assert not in_proc_mounts(svc.mnt)

    llmfs("mount", svc.store, svc.mnt)
    try:
        assert (svc.mnt / "synced").read_bytes() == synced
        for name, data in files.items():
            assert (svc.mnt / name).read_bytes() == data, name
    finally:
        llmfs("umount", svc.mnt)
    assert "not unmounted cleanly" not in (svc.store / "llmfs.log").read_text()


@needs_fuse
@pytest.mark.mount
def test_restarted_service_replaces_the_dead_mount(svc):
    """Restart=on-failure after a crash: the new daemon finds the dead mount (ENOTCONN), detaches
    it and checks the store instead of refusing."""
    svc.start()
    assert svc.recv().get("READY") == "1"
    with open(svc.mnt / "kept", "wb") as f:
        f.write(b"x" * 1000)
        f.flush()  # into the file before the fsync: a close alone is durable only within 5 s
        os.fsync(f.fileno())
    svc.proc.kill()
    svc.wait()
    assert in_proc_mounts(svc.mnt)  # the dead mount stays behind
    svc.start()
    assert svc.recv().get("READY") == "1"
    assert "not unmounted cleanly" in svc.log()
    assert (svc.mnt / "kept").read_bytes() == b"x" * 1000
    assert "detached the mount of a daemon that died" in svc.log()
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.wait() == 0


# -- mount(8), fstab and umount(8) ---------------------------------------------------------------


def helper_installed() -> bool:
    return os.path.realpath("/sbin/mount.fuse.llmfs") == os.path.realpath(
        ROOT / ".venv" / "bin" / "mount.fuse.llmfs"
    )


@pytest.fixture
def store_and_mnt(tmp_path):
    if not helper_installed():
        pytest.skip("/sbin/mount.fuse.llmfs is not linked to this project (`make setup` as root)")
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    llmfs("mkfs", store)
    try:
        yield store, mnt
    finally:
        if in_proc_mounts(mnt):
            force_unmount(mnt)
        pid = daemon_pid(store)
        if pid and in_proc_mounts(mnt):
            os.kill(pid, signal.SIGKILL)


def run(*cmd) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
    return res


def mount_options(mnt: Path) -> str:
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mnt):
                return f"{fields[2]} {fields[3]}"
    return ""


@needs_fuse
@needs_root
@pytest.mark.mount
def test_mount_t_fuse_llmfs_and_umount(store_and_mnt):
    store, mnt = store_and_mnt
    run(
        "mount",
        "-t",
        "fuse.llmfs",
        store,
        mnt,
        "-o",
        "noauto,_netdev,x-systemd.automount,allow_other,noatime,dirty_limit=4M",
    )
    assert os.path.ismount(mnt)
    opts = mount_options(mnt)
    assert opts.startswith("fuse.llmfs ") and "allow_other" in opts and "noatime" in opts
    data = os.urandom(100_000)
    (mnt / "f").write_bytes(data)
    run("umount", mnt)  # runs umount.fuse.llmfs: returns once the daemon has flushed and exited
    assert not os.path.ismount(mnt) and wait_for_store(str(store), timeout=0)
    llmfs("mount", store, mnt)  # the store is free right away
    try:
        assert (mnt / "f").read_bytes() == data
    finally:
        llmfs("umount", mnt)
    assert "ERROR" not in (store / "llmfs.log").read_text()


@needs_fuse
@needs_root
@pytest.mark.mount
def test_fstab_line(store_and_mnt, tmp_path):
    store, mnt = store_and_mnt
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test\n{store} {mnt} fuse.llmfs noauto,nofail,_netdev,allow_other 0 0\n")
    run("mount", "--fstab", fstab, mnt)
    assert "allow_other" in mount_options(mnt)
    (mnt / "g").write_bytes(b"from fstab\n")
    run("umount", mnt)
    assert not os.path.ismount(mnt)
    llmfs("mount", store, mnt)
    try:
        assert (mnt / "g").read_bytes() == b"from fstab\n"
    finally:
        llmfs("umount", mnt)
