"""All-or-nothing output folders, one policy for ``--out``, and JSON that survives NaN.

Why: a crashed, interrupted or concurrent run must never leave a ``--out`` that mixes two runs'
files, or a half-written one that a later script could mistake for a result, and sinkscope must
never delete a file it did not write. The policy, in one place:

* ``--out`` may be absent or an empty folder; or a folder sinkscope wrote before, which is then
  **replaced as a whole** once the new run succeeded. Sinkscope knows it wrote a folder from the
  manifest :data:`MANIFEST` it leaves in it (every file with its size and sha256). A folder that
  is no longer as sinkscope wrote it (a file the manifest does not list, a file whose sha256
  changed, a folder sinkscope did not make, any symlink: :func:`changes`), a folder without a
  manifest, a file, and the current folder (``--out .``) or one holding it, are refused before
  any work starts, with one line naming what was found (:class:`OutputDirError`): sinkscope
  never deletes what a user changed or added.
* Everything is written into a hidden staging folder next to the target
  (``.<name>.staging-<pid>-...``) and swapped into place by two renames under an exclusive lock
  on the parent folder, so two runs writing the same ``--out`` at once end with one whole result
  (the later one), and a run that fails or is interrupted (Ctrl-C, SIGTERM) leaves nothing.
* Staging folders of runs killed outright (SIGKILL: no handler runs) carry the dead process' id
  and are swept by the next run that writes next to them, into any ``--out`` (:func:`sweep_stale`).
* A folder one run must have to itself (a training run, a resumable sweep) is held with
  :func:`exclusive`: a second run into it is refused with one line naming the first one's id.
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


#: ``.<name>.staging-<pid>-...`` / ``.<name>.old-<pid>-...``: what a run writes next to its target
_STALE = re.compile(r"^\.(.+)\.(staging|old)-(\d+)-")


def sweep_stale(out: Path) -> list[Path]:
    """Remove the staging folders next to ``out`` left by killed runs (their process is gone),
    whatever ``--out`` they were for: a run killed by SIGKILL or SIGHUP into ``a`` is swept by
    the next run into ``b`` beside it.

    A killed swap (``.old-``: the previous result moved aside, the new one not yet in place) is
    put back when its target is missing. Returns what was removed or restored.
    """
    out = Path(out)
    parent = out.parent
    done: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return done
    for entry in entries:
        m = _STALE.match(entry.name)
        if not m or int(m.group(3)) == os.getpid() or pid_alive(int(m.group(3))):
            continue
        target = parent / m.group(1)
        if m.group(2) == "old" and not target.exists() and not target.is_symlink() and (entry / "previous").is_dir():
            os.replace(entry / "previous", target)
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
    return None if _manifest_files(folder) is None else changes(folder)["a file sinkscope did not write"]


def changes(folder: Path) -> dict[str, list[str]]:
    """What in a folder sinkscope wrote is no longer as it wrote it, by kind (each a sorted list
    of paths relative to ``folder``): files it did not write, files changed since (their sha256
    differs from the manifest's), folders it did not make, and symlinks (it never makes one).
    A file deleted since is no change worth keeping: replacing the folder loses nothing."""
    listed = _manifest_files(folder) or {}
    made = {Path(name).parent.as_posix() for name in listed} | {
        parent.as_posix() for name in listed for parent in Path(name).parents}
    out: dict[str, list[str]] = {kind: [] for kind in (
        "a file sinkscope did not write", "a file changed since sinkscope wrote it", "a folder sinkscope did not make", "a symlink")}
    for root, dirs, files in os.walk(folder):  # followlinks=False: a symlink is reported, never entered
        base = Path(root)
        for name in dirs + files:
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                out["a symlink"].append(rel)
            elif name in dirs:
                if rel not in made:
                    out["a folder sinkscope did not make"].append(rel)
            elif rel == MANIFEST:
                continue
            elif rel not in listed:
                out["a file sinkscope did not write"].append(rel)
            elif not isinstance(listed[rel], dict) or path.stat().st_size != listed[rel].get("bytes") or \
                    file_digest(path) != listed[rel].get("sha256"):
                out["a file changed since sinkscope wrote it"].append(rel)
    return {kind: sorted(paths) for kind, paths in out.items()}


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
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise OutputDirError(
            f"{label} {out} is the current folder{'' if out.resolve() == here else ' or holds it'}, and an --out is "
            "replaced as a whole; name a folder for the results, such as sinkscope-out")
    if out.is_dir() and any(out.iterdir()):
        if _manifest_files(out) is None:
            raise OutputDirError(
                f"{label} {out} is a non-empty folder sinkscope did not write (no {MANIFEST}); "
                "choose a new or empty folder, or empty this one yourself")
        for kind, paths in changes(out).items():
            if not paths:
                continue
            more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
            if kind == "a file sinkscope did not write":
                what = f"files sinkscope did not write ({paths[0]}{more})"
            else:
                what = f"{kind} ({paths[0]}{more})"
            raise OutputDirError(
                f"{label} {out} holds {what}; sinkscope replaces only its own earlier outputs, as it wrote them: "
                "move what you changed or added, or choose another folder")
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


class FolderBusyError(OutputDirError):
    """A folder that one run at a time may write is in use by another live run."""


def lock_holder(folder: Path) -> int | None:
    """The id of the process holding a ``flock`` on ``folder`` (Linux' ``/proc/locks``), or None."""
    try:
        st = os.stat(folder)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        where = next((p for p in parts if p.count(":") == 2), "")
        try:
            major, minor, inode = where.split(":")
            if int(inode) == st.st_ino and (int(major, 16), int(minor, 16)) == (os.major(st.st_dev), os.minor(st.st_dev)):
                return int(parts[4])
        except ValueError:
            continue
    return None


#: folders this process holds with :func:`exclusive` ((device, inode) -> depth): a nested hold
#: (the command holds a sweep's folder, then the library's sweep asks for it) is granted
_HELD: dict[tuple[int, int], int] = {}


@contextmanager
def exclusive(folder: Path, what: str) -> Iterator[Path]:
    """Hold ``folder`` (made if missing) for this run alone until the block ends; another process
    that asks while this one lives gets :class:`FolderBusyError` at once, naming this one's id.

    A non-blocking ``flock`` on the folder's own descriptor, released by the kernel when the
    holder dies (a killed run never blocks the next); the lock is taken on the folder that is at
    ``folder`` *now* (a folder moved away while a second run waited for it is not the one it
    asked for, so it tries again). Within one process a hold nests. ``what`` names the folder in
    the message.
    """
    folder = Path(folder)
    try:
        st = os.stat(folder)
        key = (st.st_dev, st.st_ino)
    except OSError:
        key = None
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield folder
        finally:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        return
    for _ in range(100):
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(folder)
            raise FolderBusyError(f"{what} {folder} is in use by another sinkscope run"
                                  f"{f' (process {holder})' if holder else ''}; wait for it to finish, or choose another folder") from None
        try:
            same = os.stat(folder).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # moved or replaced between open and lock: lock what is there now
    else:
        raise FolderBusyError(f"{what} {folder} keeps being replaced by another run; try again")
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    _HELD[key] = 1
    try:
        yield folder
    finally:
        _HELD.pop(key, None)
        os.close(fd)


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
