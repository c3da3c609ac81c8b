"""Where a study's files live: the project directory, and Ray storage (a path or a cloud URI).

Relative paths in a config are relative to the project directory. Ray Train and
Tune write checkpoints to Ray storage, which may be ``s3://`` or ``gs://`` on a
cloud cluster so that checkpoints outlive the node (a spot instance) that wrote them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from study.errors import WriteError

HOME_VARIABLE = "STUDY_HOME"


def submitted_job_id() -> str | None:
    """The submission id when this process is the entrypoint of a ``ray job submit``, else None."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    return job_config.get("metadata", {}).get("job_submission_id")


def project_dir() -> Path:
    """The directory that relative config paths and the default MLflow store are under.

    ``$STUDY_HOME`` when set, else the current directory; except in a submitted
    Ray job, whose current directory is a temporary copy of its ``--working-dir``
    that Ray deletes later: there it is ``~/study``, so results outlive the job.
    """
    if os.environ.get(HOME_VARIABLE):
        return Path(os.environ[HOME_VARIABLE]).expanduser().resolve()
    if submitted_job_id() is not None:
        return Path.home() / "study"
    return Path.cwd()


def is_uri(location: str) -> bool:
    """True for ``scheme://...`` locations (``s3://``, ``gs://``), False for file paths."""
    return "://" in location


def join(location: str | Path, *parts: str) -> str:
    """``location/part/...`` for a file path or a URI (``Path`` would collapse ``s3://``)."""
    if is_uri(str(location)):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location).joinpath(*parts))


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a hidden sibling of ``path``, then rename it to ``path``.

    A crash never leaves a half-written file under the real name, so a rerun
    trusts every file it finds. A failed write removes its temporary file and
    raises :class:`WriteError` naming ``path``. The temporary name keeps the
    suffix (``np.save`` needs it) and starts with a dot (globs such as
    ``fold*.json`` skip it).
    """
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        if not tmp.is_symlink():  # on disk before its name: a power cut leaves the old file, not an empty one
            _fsync(tmp)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself; best effort (some network file systems refuse)
            _fsync(path.parent)
    except BaseException as err:  # a full disk, an unwritable folder, Ctrl-C: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):  # numpy's short writes have no errno nor file name: say which file
            raise WriteError(err.errno, err.strerror or str(err), str(path)) from err
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold ``lock`` (a file, created) exclusively for a block, across processes (flock); when another process
    holds it, say that ``what`` is being written by another study and wait for it."""
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{what} is being written by another study; waiting for it", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_HELD: list = []  # files this process holds a lock on, until release_held or its end


def hold_shared(path: Path) -> None:
    """Mark ``path`` as in use by this process until it ends (a shared flock): see :func:`in_use`."""
    f = open(path, "rb")
    fcntl.flock(f, fcntl.LOCK_SH)
    _HELD.append(f)


def hold_exclusive(path: Path, holder: str) -> str | None:
    """Hold ``path`` (created) exclusively until :func:`release_held` or this process's end, writing ``holder``
    into it; returns None, or when another process holds it, what that one wrote (who and since when)."""
    if any(held.name == str(path) for held in _HELD):  # this process holds it already
        return None
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        return who
    f.truncate(0)
    f.write(holder)
    f.flush()
    _HELD.append(f)
    return None


def release_held() -> None:
    """Let go of every file this process holds with :func:`hold_shared` or :func:`hold_exclusive` (a study in a
    notebook has ended)."""
    while _HELD:
        _HELD.pop().close()


def in_use(path: Path) -> bool:
    """True when another process (or this one) holds ``path`` with :func:`hold_shared` or :func:`hold_exclusive`."""
    try:
        with open(path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return False
    return False


def allocate(path: Path, nbytes: int) -> None:
    """Create ``path`` with ``nbytes`` reserved on disk, before it is memory-mapped for writing.

    A sparse memmap on a disk that fills kills the process (SIGBUS) when a page
    is first written; reserved space fails here instead, as an ``OSError``.
    """
    with open(path, "wb") as f:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, nbytes)
        else:  # macOS has no posix_fallocate: a sparse file, as numpy's memmap would make
            f.truncate(nbytes)


def remove_tree(location: str | Path) -> None:
    """Delete a folder and everything in it, on a file system or in a bucket (``s3://``, ``gs://``); gone is fine."""
    if not is_uri(str(location)):
        if Path(location).exists():
            shutil.rmtree(location)
        return
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(str(location))
    if filesystem.get_file_info(root).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(root)
