"""Mount configuration files: `/etc/llmfs/NAME.toml`, read by `llmfs mount --config FILE`.

One file per mount (the systemd template instance `llmfs@NAME` reads `/etc/llmfs/NAME.toml`).
Every key is listed in KEYS with its parser; an unknown key, a wrong type or a bad value is a
ConfigError that names the file and the key. A key that no `llmfs mount` argument honours (today
only `model`: a store's model is chosen at mkfs) is accepted and validated so that a file written
today keeps working, and `not_yet` lists it so that the mount says so instead of silently
pretending to honour it. Command-line arguments override the file.

    store = "/srv/llmfs/docs"          # the store made by `llmfs mkfs` (relative: to this file)
    mountpoint = "/mnt/docs"
    options = ["allow_other"]         # FUSE -o options
    log_level = "info"                # debug | info | warning | error

    [write]
    dirty_limit = "64M"               # buffered bytes before files are flushed

    [cache]
    ram = "64M"                       # decoded blocks kept in RAM
    gpu = "1G"                        # ... and in GPU memory when CUDA is present

    [compaction]
    enabled = true                    # background LM compaction (--no-compaction)
    after = "10m"                     # blocks unchanged this long (--compact-after)

    device = "auto"                   # where the LM runs: auto | cpu | cuda
    threads = 1                       # CPU threads of the LM

    [cluster]                         # compaction (and cold reads) on a Ray cluster: .[cluster]
    address = "ray://head:10001"      # --cluster; "host:6379" when this machine is a Ray node
    workers = 0                       # actors holding the model; 0: one per GPU / CPU-only node
    timeout = "10m"                   # a batch not back in this long is retried elsewhere

Accepted, validated and reported as having no effect: `model` (a store's model is chosen at mkfs).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field

from .compactor import COMPACT_AFTER
from .service import LEVELS
from .units import parse_size

# cluster.TIMEOUT; named here so that reading a config does not import the cluster module
CLUSTER_TIMEOUT = 600.0


class ConfigError(Exception):
    pass


def _str(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty string")
    return value


def _size(value) -> int:
    if isinstance(value, bool):
        raise ValueError("must be a size such as 64M or a number of bytes")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        try:
            n = parse_size(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a size (e.g. 512K, 64M, 2G)") from None
    else:
        raise ValueError("must be a size such as 64M or a number of bytes")
    if n < 0:
        raise ValueError("must not be negative")
    return n


_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value) -> int:
    """Seconds, from an integer or a string such as 30s, 10m, 12h, 7d."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _DURATION.match(value.strip()) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 10m, 12h, 7d)")
    return int(m.group(1)) * _SECONDS[m.group(2)]


def _positive(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("must be a positive integer")
    return value


def _count(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("must be a whole number, 0 or more")
    return value


def _options(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError('must be a list of strings, e.g. ["allow_other"]')
    return [i.strip() for i in items if i.strip()]


def _choice(*allowed):
    def parse(value):
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(map(repr, allowed))}")
        return value

    return parse


def _bool(value) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


# dotted key → (parser, the `llmfs mount` argument it sets). An argument the parser doesn't have
# (None, or not built yet) makes the key accepted, validated and reported as having no effect.
KEYS = {
    "store": (_str, "store"),
    "mountpoint": (_str, "mountpoint"),
    "options": (_options, None),  # merged into args.options by apply()
    "log_level": (_choice(*LEVELS), None),  # applied by mount.run()
    "model": (_str, None),
    "device": (_choice("auto", "cpu", "cuda"), "device"),
    "threads": (_positive, "threads"),
    "write.dirty_limit": (_size, "dirty_limit"),
    "cache.ram": (_size, "cache_size"),
    "cache.gpu": (_size, "gpu_cache_size"),
    "compaction.enabled": (_bool, "no_compaction"),
    "compaction.after": (_duration, "compact_after"),
    "cluster.address": (_str, "cluster"),
    "cluster.workers": (_count, "cluster_workers"),
    "cluster.timeout": (_duration, "cluster_timeout"),
}
HANDLED = {"options", "log_level"}
# What an argument holds when the command line did not set it (None unless listed).
UNSET = {
    "no_compaction": False,
    "compact_after": COMPACT_AFTER,
    "device": "auto",
    "cluster_workers": 0,
    "cluster_timeout": CLUSTER_TIMEOUT,
}
SECTIONS = {k.split(".")[0] for k in KEYS if "." in k}


@dataclass
class MountConfig:
    path: str
    values: dict = field(default_factory=dict)  # dotted key → parsed value, paths resolved
    not_yet: list[str] = field(default_factory=list)  # set by apply(): keys nothing honours

    @property
    def options(self) -> list[str]:
        return self.values.get("options", [])

    @property
    def log_level(self) -> str | None:
        return self.values.get("log_level")


def _flatten(doc: dict, path: str) -> dict:
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(f"{path}: unknown section [{key}] (known: {', '.join(sorted(SECTIONS))})")
            for sub, v in value.items():
                flat[f"{key}.{sub}"] = v
        else:
            flat[key] = value
    return flat


def load(path: str) -> MountConfig:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    values = {}
    for key, raw in _flatten(doc, path).items():
        if key not in KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(KEYS)})")
        parser, _ = KEYS[key]
        try:
            values[key] = parser(raw)
        except ValueError as e:
            raise ConfigError(f"{path}: {key}: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    for key in ("store", "mountpoint"):
        if key in values:
            values[key] = os.path.normpath(os.path.join(base, values[key]))
    return MountConfig(path=path, values=values)


def apply(cfg: MountConfig, args) -> None:
    """Fill what the command line left unset from the file; FUSE options from the file come first
    so that a `-o` on the command line overrides them. Keys whose argument `args` lacks go to
    cfg.not_yet."""
    cfg.not_yet = []
    for key, value in cfg.values.items():
        dest = KEYS[key][1]
        if key in HANDLED:
            continue
        if dest is None or not hasattr(args, dest):
            cfg.not_yet.append(key)
            continue
        if dest == "no_compaction":
            value = not value
        if getattr(args, dest) == UNSET.get(dest):
            setattr(args, dest, value)
    if cfg.options:
        args.options = [",".join(cfg.options)] + list(args.options)
