"""Atomic file writes: a reader (or a requeued job) never sees a half-written file; telling a full disk apart."""
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, plain_file_mode())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain_file_mode() -> int:
    """The mode a plain open() gives a new file under the user's umask. mkstemp creates 0600: temp-then-rename
    writers use this instead, because the umask decides who else reads a run (collaborators, a lab group)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes plain open() and mkdir() give under the user's umask, which
    decides who else reads a run: safetensors writes its files 0600 (through a temporary file), tempfile.mkdtemp
    makes folders 0700."""
    mask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException, folder: Path) -> bool:
    """Whether `error` came from a full disk or an exhausted quota where `folder` lives. safetensors names the
    cause only in its message, and torch.save not at all ("unexpected pos 576 vs 534"): when neither the error nor
    its causes say so, a 1 MiB write into `folder` decides."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL:
            return True
        if any(text in str(seen) for text in ("No space left on device", "Disk quota exceeded")):
            return True
        seen = seen.__cause__ or seen.__context__
    return not _has_space(folder)


def _has_space(folder: Path) -> bool:
    probe = folder / f".space-probe.{os.getpid()}"
    try:
        with probe.open("wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())  # network filesystems may report a full quota only here
        return True
    except OSError as error:
        return error.errno not in DISK_FULL
    finally:
        probe.unlink(missing_ok=True)
