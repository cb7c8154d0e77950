"""All-or-nothing output folders, one policy for ``--out``, and JSON that survives NaN.

Why: a crashed, interrupted or concurrent run must never leave a ``--out`` that mixes two runs'
files, or a half-written one that a later script could mistake for a result, and sinkscope must
never delete a file it did not write. The policy, in one place:

* ``--out`` may be absent or an empty folder; or a folder sinkscope wrote before, which is then
  **replaced as a whole** once the new run succeeded. Sinkscope knows it wrote a folder from the
  manifest :data:`MANIFEST` it leaves in it (every file with its size and sha256). A folder that
  holds any file the manifest does not list, a folder without a manifest, or a file is refused
  before any work starts (:class:`OutputDirError`).
* Everything is written into a hidden staging folder next to the target
  (``.<name>.staging-<pid>-...``) and swapped into place by two renames under an exclusive lock
  on the parent folder, so two runs writing the same ``--out`` at once end with one whole result
  (the later one), and a run that fails or is interrupted (Ctrl-C, SIGTERM) leaves nothing.
* Staging folders of runs killed outright (SIGKILL: no handler runs) carry the dead process' id
  and are swept by the next run that writes next to them (:func:`sweep_stale`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from circuits.errors import SinkscopeError

#: The manifest sinkscope writes into every output folder: which files it wrote (size, sha256).
MANIFEST = ".sinkscope-output.json"
MANIFEST_SCHEMA = "sinkscope.output/1"


class OutputDirError(SinkscopeError, ValueError):
    """``--out`` cannot be written: a file, under a file, unwritable, or holding files sinkscope did not write."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine (a killed run's id no longer does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale_re(name: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(name)}\.(staging|old)-(\d+)-")


def sweep_stale(out: Path) -> list[Path]:
    """Remove staging folders next to ``out`` left by killed runs (their process is gone).

    A killed swap (``.old-``: the previous result moved aside, the new one not yet in place) is
    put back when ``out`` is missing. Returns what was removed or restored.
    """
    out = Path(out)
    parent = out.parent
    pattern = _stale_re(out.name)
    done: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m.group(2)) == os.getpid() or pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and (entry / "previous").is_dir():
            os.replace(entry / "previous", out)
        shutil.rmtree(entry, ignore_errors=True)
        done.append(entry)
    return done


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path("/")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _manifest_files(folder: Path) -> dict[str, dict] | None:
    try:
        doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable (or nested too deeply): not a manifest sinkscope wrote
        return None
    return doc.get("files") if isinstance(doc, dict) and isinstance(doc.get("files"), dict) else None


def foreign_files(folder: Path) -> list[str] | None:
    """Files in ``folder`` its manifest does not list (None: no readable manifest)."""
    listed = _manifest_files(folder)
    if listed is None:
        return None
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]
    return sorted(p for p in present if p != MANIFEST and p not in listed)


def check_output_dir(out: str | Path, *, label: str = "--out") -> Path:
    """Refuse, before any work, an ``out`` this run could not write or would have to mix.

    Allowed: a path that does not exist yet (under a writable folder), an empty folder, or a
    folder sinkscope wrote (its manifest lists every file in it). Raises :class:`OutputDirError`.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{label} {out} is an existing file, not a folder; choose a folder")
    base = _nearest_existing(out)
    if not base.is_dir():
        raise OutputDirError(f"{label} {out}: {base} is a file, so no folder can be made under it")
    try:  # root passes every os.access test; trying is the only honest check (/proc refuses even root)
        os.rmdir(tempfile.mkdtemp(prefix=".sinkscope-probe-", dir=base))
    except OSError as exc:
        raise OutputDirError(f"{label} {out}: cannot write under {base} ({exc.strerror or exc})") from None
    if out.is_dir() and any(out.iterdir()):
        foreign = foreign_files(out)
        if foreign is None:
            raise OutputDirError(
                f"{label} {out} is a non-empty folder sinkscope did not write (no {MANIFEST}); "
                "choose a new or empty folder, or empty this one yourself")
        if foreign:
            more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
            raise OutputDirError(
                f"{label} {out} holds files sinkscope did not write ({foreign[0]}{more}); sinkscope replaces "
                "only its own earlier outputs: move them, or choose another folder")
    return out


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on an existing folder, held across processes until the block ends.

    ``flock`` on the folder's own descriptor: no lock file is left behind, and the kernel
    releases the lock when its holder dies, so a killed run never blocks the next one.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def write_manifest(folder: Path, **info: Any) -> Path:
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    path = folder / MANIFEST
    path.write_text(json.dumps({"schema": MANIFEST_SCHEMA, **info, "files": files}, indent=1), encoding="utf-8")
    return path


@contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``out`` as a whole; on any error it is deleted.

    ``out`` is checked first (:func:`check_output_dir`) and again under the lock when the result
    is swapped in, so a folder that became foreign meanwhile is never replaced.
    """
    out = check_output_dir(out)
    parent = out.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out.absolute())
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the result's mode
    try:
        yield staging
        write_manifest(staging, pid=os.getpid())
        with locked(parent):
            check_output_dir(out)
            _swap_in(staging, out.absolute())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, target: Path) -> None:
    """``staging`` becomes ``target``; a previous ``target`` (sinkscope's own, checked) is removed."""
    old = None
    if target.exists():
        try:
            os.rmdir(target)  # empty: the rename below would replace it anyway
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / "previous")
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def to_jsonable(value: Any) -> Any:
    """numpy → Python, NaN/inf → None, recursively."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(data), indent=1, allow_nan=False), encoding="utf-8")
    return path
