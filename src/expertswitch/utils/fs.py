"""Filesystem helpers: atomic directory replacement, output checks that protect the user's
inputs, the cache directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """$EXPERTSWITCH_CACHE, else $XDG_CACHE_HOME/expertswitch, else ~/.cache/expertswitch."""
    env = os.environ.get("EXPERTSWITCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "expertswitch"


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out` to fill; when the block succeeds it replaces
    `out`, when it fails it is removed. An existing `out` is first renamed aside, then the new
    directory renamed into place, and only then is the old one deleted: at no moment is
    neither on disk, so a crash or Ctrl-C never leaves a half-written `out`, nor loses the old
    one (after a crash between the renames it is still there, as `.NAME.old-*`)."""
    from expertswitch.errors import ConfigError

    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise ConfigError(f"cannot write beside {out}: {e.strerror or e}; choose another "
                          "--out") from None  # fmt: skip
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide the result from other users
    old = None
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # interrupted between the renames: put it back
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: str | Path, inputs: dict[str, str | Path], overwrite: bool,
                     replaceable: Callable[[Path], bool], what: str) -> Path:  # fmt: skip
    """Refuse an output directory that would destroy an input or something that is not ours.

    inputs: flag → path of each input (e.g. {"--base": ..., "--expert": ...}); `out` may not
    be one of them, nor contain one (replacing it would delete it). With `overwrite`, an
    existing non-empty `out` is replaced only when `replaceable(out)` says it is a `what` this
    program wrote. Raises ConfigError; returns `out` as a Path."""
    from expertswitch.errors import ConfigError

    out = Path(out)
    target = out.resolve()
    here = Path.cwd().resolve()
    if target == here or target in here.parents or target == target.parent:
        raise ConfigError(f"--out {out} is the current directory, one above it, or the root: "
                          "name a new directory for the output")  # fmt: skip
    if out.is_symlink() and not out.exists():
        raise ConfigError(f"--out {out} is a broken symbolic link: remove it or choose another")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not a directory this user can write in")
    for flag, path in inputs.items():
        src = Path(path).resolve()
        if target == src or target in src.parents:
            raise ConfigError(f"--out {out} {'is' if target == src else 'contains'} the {flag} "
                              f"directory {path}: writing there would destroy it; choose another "
                              "--out")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory: choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not empty; choose another --out, or pass "
                              f"--overwrite to replace the {what} in it")  # fmt: skip
        if not replaceable(out):
            raise ConfigError(f"{out} is not empty and is not a {what} written by expertswitch; "
                              "--overwrite replaces only those: choose another --out or remove "
                              "it yourself")  # fmt: skip
    return out
