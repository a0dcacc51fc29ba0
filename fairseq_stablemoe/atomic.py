"""Every file the plugin writes goes through a temporary file beside it and a rename: a reader, or the next run
after a kill -9 or a full disk, sees the old file or the new one, never a cut one."""
import contextlib
import os
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file in `path`'s folder; on a clean exit it is flushed to disk and renamed to `path`; on an
    error it is removed and `path` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, on disk
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def move_aside(path: str, suffix: str) -> str:
    """Rename `path` to `path.SUFFIX` (`.SUFFIX2`, ... if taken: nothing is overwritten); returns the new name."""
    aside, n = f"{path}.{suffix}", 1
    while os.path.exists(aside):
        n += 1
        aside = f"{path}.{suffix}{n}"
    os.replace(path, aside)
    return aside
