"""One fairseq-train run per --save-dir.

fairseq lets two runs write the same save dir: both exit 0 and the checkpoints hold whichever saved last. The
writing rank of a run (rank 0: it alone writes checkpoints, also under expert parallelism) holds an flock on
SAVE_DIR/.stablemoe-train.lock for the whole run; the file names the holder (pid, host, start time). The kernel
drops an flock when its process dies, even by SIGKILL, so a killed run never blocks the next one; the holder's
line it leaves behind (a clean exit empties the file) tells the next run that it takes a dead run's lock over.
"""
import atexit
import datetime
import fcntl
import logging
import os
import socket
from typing import Dict

logger = logging.getLogger(__name__)

LOCK_NAME = ".stablemoe-train.lock"

_held: Dict[str, int] = {}  # save dir -> descriptor holding its lock (a process may build several models)


class SaveDirLocked(RuntimeError):
    pass


def _release(path: str, fd: int) -> None:
    os.ftruncate(fd, 0)  # a clean end: the next run finds an empty lock file, no dead holder to report
    os.close(fd)  # closing drops the flock; the file stays (unlinking it would let two runs lock two files)


def lock_save_dir(save_dir: str) -> None:
    """Hold SAVE_DIR's lock until this process exits, or raise SaveDirLocked naming the live holder.
    fairseq-train creates the save dir before it builds the model; a model built by hand in a process that
    never made that directory (a script, a test) is not a training run and takes no lock."""
    save_dir = os.path.abspath(save_dir)
    if save_dir in _held or not os.path.isdir(save_dir):
        return
    path = os.path.join(save_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not written its name yet"
        os.close(fd)
        raise SaveDirLocked(f"--save-dir {save_dir} is in use by another fairseq-train run ({holder}): wait for it "
                            f"to end, or give this run another --save-dir") from None
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
        logger.warning(f"--save-dir {save_dir}: taking over the lock of a run that ended without releasing it "
                       f"({previous}; killed?); its checkpoints stay and this run resumes from them")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    holder = f"pid {os.getpid()} on {socket.gethostname()}, started {started}".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder, 0)
    os.fsync(fd)
    _held[save_dir] = fd
    atexit.register(_release, path, fd)
