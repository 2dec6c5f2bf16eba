"""Atomic file writes: a crash never leaves a half-written file where a good one was. Also which
files are embeddings, told without torch (the web UI lists them and must not import torch), and a run's
log.csv read back (the LR finder's curves, the LR tab's live plot).

Write to a temp file in the same folder, flush + fsync, then os.replace (atomic on POSIX and
Windows when source and target share a filesystem). The file gets the mode a plain open() gives a
new file (0o666 minus the umask), not mkstemp's private 0o600: a web UI or ComfyUI running as another
user must be able to read the embeddings, snapshots and grids.
"""

from __future__ import annotations

import csv
import os
import struct
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

_umask_lock = threading.Lock()


@contextmanager
def atomic_path(path):
    """Yield a temp path next to `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        _chmod_like_open(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows.

    os.umask can only be read by setting it, and for that instant every file another thread creates
    gets the temporary mask; so /proc/self/status (Linux 4.7+) is read first, and the set-and-restore
    fallback runs under a lock (which keeps our own writers from racing each other, not other code)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _chmod_like_open(tmp) -> None:
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
    except OSError:  # a filesystem without POSIX modes (some network or FUSE mounts): keep what it gave
        pass


def remove_stale_temps(folder) -> list[Path]:
    """Delete the hidden `.NAME.*.tmp` files a killed writer left in `folder`; the paths removed.

    Only call this when no other process writes to the folder (a run's own folder, on resume).
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file() and not tmp.is_symlink():
            try:
                tmp.unlink()
                removed.append(tmp)
            except OSError:
                pass
    return removed


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_log_rows(path, missing_ok: bool = False) -> list[dict]:
    """A run's log.csv as one dict per row, column name -> text ('' where the trainer left a value empty;
    None for the fields of a last row a kill cut short). Bytes that are not UTF-8 are read as U+FFFD.

    missing_ok: a file that does not exist (yet) or is not CSV gives [] instead of raising: a live view
    polls a run folder before the trainer has written its log. The incremental reader of a followed run
    is ui.jobs' (it reads only what was appended since the last poll)."""
    try:
        return list(iter_log_rows(path))
    except (FileNotFoundError, csv.Error):
        if missing_ok:
            return []
        raise


def iter_log_rows(path):
    """read_log_rows one row at a time, for a log too long to hold whole (the trainer's rewrite on resume)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        yield from csv.DictReader(fh)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- embedding files, told without torch
# Every suffix embedding.load_embedding reads; the Grid tab offers the same (PNGs only with the chunk).
# .png stays last: messages list the others, then "or an A1111 embedding .png".
EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt", ".png")
MAX_EMBEDDING_FILE = 64 * 1024 * 1024   # an embedding is kilobytes (75 x 2048 fp32 = 600 kB); larger files are refused
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_EMBEDDING_KEY = b"sd-ti-embedding"  # the text chunk AUTOMATIC1111 writes an embedding card's data into


def png_has_embedding(path) -> bool:
    """Whether a PNG carries an AUTOMATIC1111 embedding (an 'sd-ti-embedding' text chunk).

    Only chunk headers and text keywords are read, no pixels and no text bodies: previews and grids
    (plain PNGs, some with large text chunks) are ruled out in a few small reads each."""
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != PNG_SIGNATURE:
                return False
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    return False
                length, ctype = struct.unpack(">I4s", head)
                if ctype == b"IEND":
                    return False
                skip = length + 4  # the body and its CRC
                if ctype in (b"tEXt", b"zTXt", b"iTXt"):
                    part = fh.read(min(length, 80))  # a keyword is 1-79 bytes, then a NUL
                    if part.partition(b"\0")[0] == PNG_EMBEDDING_KEY and b"\0" in part:
                        return True
                    skip -= len(part)
                fh.seek(skip, 1)
    except OSError:
        return False


def is_embedding_file(path) -> bool:
    """A file load_embedding may read: a known suffix, not over the size limit, and for a PNG the
    embedding chunk. Cheap (a stat, and a few reads for PNGs); whether the contents load is for
    load_embedding to say."""
    path = Path(path)
    if path.suffix.lower() not in EMBEDDING_SUFFIXES:
        return False
    try:
        if not path.is_file() or path.stat().st_size > MAX_EMBEDDING_FILE:
            return False
    except OSError:
        return False
    return path.suffix.lower() != ".png" or png_has_embedding(path)
