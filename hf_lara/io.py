"""Safe output for hf_lara: nothing half-written, nothing written through a symbolic link, nothing outside the target.

- `atomic_write_bytes` / `atomic_write_text` / `atomic_save` write a file beside its target and `os.replace` it at
  the end: readers see the old file or the new one, never a partial one. `os.replace` replaces a symbolic link at
  the target by the new file instead of writing through it, so a planted link never redirects a write.
- `staged_folder` writes a whole folder the same way: the caller fills a fresh temporary folder beside the target,
  which replaces the target (and everything it held) only once complete. An exception or Ctrl-C before the end
  removes the temporary folder and leaves the target as it was.
- `check_output_file` / `check_output_folder` refuse, before any work, targets that cannot be written (a file where
  a folder is needed, a folder where a file is needed, a path under a file).
- `files_inside` lists a folder's files, reporting links that resolve outside it; `open_inside` then opens one of
  them following no link, so what is read is what was checked even if a link is planted in between.

This is what `safetensors` and `huggingface_hub` do for single files (write to a temporary name, then rename).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_existing(path: Path) -> Path:
    """`path` or its nearest existing ancestor (the current folder for a relative path with none)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def _check_parent(path: Path, name: str) -> None:
    existing = _first_existing(path.parent)
    if not existing.is_dir():
        raise ValueError(f"{name} {path} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path} cannot be created: the folder {existing} is not writable.")


def check_output_file(path: str | Path, name: str) -> Path:
    """`path` as a `Path` if a file can be written there; a `ValueError` naming `name` (e.g. `--json`) otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name} {path} is a folder; pass a file path, e.g. {path / 'report.json'}.")
    _check_parent(path, name)
    return path


def check_output_folder(path: str | Path, name: str, *, overwrite: bool | None = None) -> Path:
    """`path` as a `Path` if a folder can be (re)placed there; a `ValueError` naming `name` otherwise.

    Args:
        path (`str` or `Path`): the folder to write.
        name (`str`): how the user named it (`OUT`, `--output-dir`), for the message.
        overwrite (`bool`, *optional*): `None` when the folder is written into (its other files are kept); `False`
            or `True` when it is replaced as a whole (`staged_folder`): then a non-empty folder needs
            `overwrite=True` and must look like an earlier output (a `config.json`), so that a mistyped path
            such as `.` or a home folder is never replaced.
    """
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"{name} {path} is a symbolic link; pass the folder it points to ({path.resolve()}).")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {path} is a file; pass a folder.")
    _check_parent(path, name)
    if overwrite is not None and path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ValueError(f"{name} {path} exists and is not empty; pass --overwrite to replace it.")
        if not (path / "config.json").is_file():
            raise ValueError(
                f"{name} {path} is not empty and holds no config.json, so it is not an earlier model output; "
                "refusing to replace it. Pass a new or empty folder."
            )
    return path


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) for the duration, then raise it: the few renames inside are never split."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):
        previous(*received[0])


def _remove(path: Path) -> None:
    """Remove `path` without following links: a link is unlinked, a real folder removed with its content."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `target` that replaces `target` when the block ends without an exception.

    Everything `target` held before is removed (no stale shards or indexes); until the swap `target` is untouched,
    and an exception or Ctrl-C inside the block leaves it exactly as it was.

    >>> with staged_folder("out") as tmp:
    ...     model.save_pretrained(tmp)
    """
    # absolute and normalised (`.`, `..`), links not resolved: the rename then targets the folder asked for
    target = Path(os.path.abspath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())
        yield staging
        with _deferred_interrupt():
            old = None
            if target.exists() or target.is_symlink():
                old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
                os.rename(target, old)
            os.rename(staging, target)
        if old is not None:
            _remove(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def atomic_save(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path` (same suffix), then rename it to `path`.

    A symbolic link at `path` is replaced, not followed; on any error the temporary file is removed and `path` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_save`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())

    return atomic_save(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_save`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def files_inside(folder: str | Path) -> tuple[list[Path], list[str]]:
    """The regular files under `folder`, and a description of every entry that resolves outside it.

    Folders are walked without following links; a link to a file or folder inside `folder` is kept (as the file
    it points to), one pointing outside is reported, never read.
    """
    root = Path(folder).resolve()
    files, outside = [], []
    for current, dirs, names in os.walk(root, followlinks=False):
        for entry in [*dirs, *names]:
            path = Path(current) / entry
            if not path.is_symlink():
                continue
            resolved = path.resolve()
            if not resolved.is_relative_to(root):
                outside.append(f"{path.relative_to(root).as_posix()} -> {resolved}")
            elif resolved.is_file():
                files.append(path)
        files.extend(p for p in (Path(current) / name for name in names) if not p.is_symlink() and p.is_file())
    unique = {p.relative_to(root).as_posix(): Path(folder) / p.relative_to(root) for p in files}
    return [unique[k] for k in sorted(unique)], outside


def open_inside(folder: str | Path, path: str | Path) -> BinaryIO:
    """Open `path`, a file under `folder` (or a link to one), for reading, following no link on the way.

    `files_inside` checks a folder, but a file read later could have been swapped for a link to a file elsewhere in
    between. This opens the file the link resolves to *now*, component by component from `folder` with
    `O_NOFOLLOW`, so whatever is read was reached inside `folder` without following any link: a swapped link makes
    the path resolve outside (refused) or fails to open. Read from the returned object, not from the path again.

    Raises:
        `ValueError` when `path` resolves outside `folder`, is not a regular file, or changed while being opened.
    """
    root, target = Path(folder).resolve(), Path(path).resolve()
    if not target.is_relative_to(root) or target == root:
        raise ValueError(f"`{path}` resolves outside `{folder}` ({target}); refusing to read it.")
    parts = target.relative_to(root).parts
    if not hasattr(os, "O_NOFOLLOW") or os.open not in os.supports_dir_fd:  # pragma: no cover - not POSIX
        return open(target, "rb")
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
    except OSError as error:
        raise ValueError(
            f"`{path}` changed while it was being read ({error.strerror}); refusing to read it."
        ) from None
    finally:
        os.close(directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"`{path}` is not a regular file; refusing to read it.")
    return os.fdopen(fd, "rb")
