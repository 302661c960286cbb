"""Engine versions: which arithmetic this release can run, and the code path of each.

An LM block decodes only with the exact frequencies its encoder saw, so the arithmetic is part of
the data format. The engine's arithmetic has a version (engine.ENGINE_VERSION); every model file
(modelfile.py) names the version its weights were prepared for and whose frequencies its blocks
were coded with.

The rule (README, "Blocks stay readable"): a change to any integer the engine produces adds a NEW
version; the old version keeps a code path here until a user retires it (`llmfs compact --recode`
moves a store's blocks to the current version, after which its old model files can be dropped).
Each entry of SUPPORTED maps a version to a function (config, tensors, device) -> engine. Today
one class implements version 5; a later release that changes the arithmetic keeps version 5's
class (or a spec of its tables and rounding) reachable from this table.

A model file of a version not in SUPPORTED is refused with UnsupportedEngine, whose message says
which release wrote it: that release or a later one decodes it.
"""

from __future__ import annotations

from collections.abc import Callable


class UnsupportedEngine(Exception):
    """A model needs an engine version this release does not have."""


def _v5(config, tensors, device="cpu"):
    from . import engine

    if engine.ENGINE_VERSION != 5:  # the class below changed its arithmetic: keep a v5 path here
        raise UnsupportedEngine("engine version 5's code path is missing from this release")
    return engine.Engine(config, tensors, device)


SUPPORTED: dict[int, Callable] = {5: _v5}


def current_version() -> int:
    from .engine import ENGINE_VERSION

    return ENGINE_VERSION


def check(version: int, written_by: str = "") -> None:
    """UnsupportedEngine unless this release can run engine `version`."""
    if version not in SUPPORTED:
        have = ", ".join(str(v) for v in sorted(SUPPORTED))
        by = f" (written by {written_by})" if written_by else ""
        newer = version > max(SUPPORTED)
        raise UnsupportedEngine(
            f"blocks need LM engine version {version}{by}; this llmfs decodes versions {have}: "
            + (
                f"install {written_by or 'a newer llmfs'} or later"
                if newer
                else "install the last llmfs release that decodes it and run `llmfs compact --recode`"
            )
        )


def build(version: int, config, tensors, device="cpu", written_by: str = ""):
    """An engine of `version` on these tensors."""
    check(version, written_by)
    return SUPPORTED[version](config, tensors, device)


__all__ = ["SUPPORTED", "UnsupportedEngine", "check", "build", "current_version"]
