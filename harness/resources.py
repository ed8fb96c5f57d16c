"""
Running out of disk or of memory ends as bad input does: in one line that names the folder or the
flags and how to go on, never a traceback, and nothing is left written half.

    room_for        around a write that may not fit: a full disk (ENOSPC, or a quota's EDQUOT)
                    removes what the write left half, then raises NoRoom: one line naming the
                    folder, the bytes the write needed and those free
    write_whole     a file written whole (a temporary file beside it, renamed into place) or not
                    at all: the file before it stays as it was
    append_whole    a line added whole to the end of a file, or the file as it was
    print_whole     text to stdout whole, or (stdout a file on a full disk) that file as it was
    out_of_memory   is an error torch's out of memory (CUDA's, or the CPU allocator's)?
    peak_memory     the CUDA memory the step that failed took at its peak (new_step resets it)
    memory_bound_by around work whose memory one flag bounds (eval.py's --batch_size): out of
                    memory ends in one line naming the flag, its value and a value to try

A trainer's line (faults.what_ran_out) also names the flags of the phase that ran out and the
checkpoint that --resume continues from; checkpoint.check_room checks the disk before the first
step.
"""
import contextlib
import errno
import os
import shutil
import stat
import sys
from pathlib import Path

from harness.cli import error_line, fail

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
# A full disk in errors that carry no errno: Rust's (safetensors: "... (os error 28)"), and the
# operating system's words inside another error's text (torch.distributed.checkpoint's)
FULL_DISK_TEXT = ("(os error 28)", "(os error 122)", os.strerror(errno.ENOSPC),
                  os.strerror(errno.EDQUOT))


def size(n_bytes) -> str:
    """Bytes for a person: 7.2 GiB, 310.5 MiB, 12.0 KiB, 18 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes} bytes"


# Out of disk --------------------------------------------------------------------------------------


class NoRoom(SystemExit):
    """A write that did not fit on its disk, ending the program in one line as cli.fail does (a
    SystemExit): the folder, what was written, the bytes it needed (None: not known) and those
    free once what it left half is gone, then how to go on (`then`; a trainer's names the
    command that continues, faults.what_ran_out)."""

    def __init__(self, folder, what: str, needed=None, then="free space there and run it again"):
        self.folder = Path(folder) if str(folder) not in ("", ".") else Path.cwd()  # named
        self.what = what
        self.needed = needed
        self.free = shutil.disk_usage(nearest_folder(self.folder)).free
        super().__init__(error_line(f"{self.problem()}; {then}"))

    def problem(self) -> str:
        """The line's first half: the folder, what did not fit, the bytes."""
        needed = "" if self.needed is None else f"it needed {size(self.needed)}, "
        return (f"{self.folder}: no room left on its disk for {self.what} ({needed}"
                f"{size(self.free)} free)")


def nearest_folder(path: Path) -> Path:
    """path, or the nearest folder above it that exists (disk_usage needs one)."""
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def disk_full(error) -> bool:
    """Is this error, or one it was raised from, a full disk or a full quota?"""
    while error is not None:
        if getattr(error, "errno", None) in FULL_DISK:
            return True
        if any(words in str(error) for words in FULL_DISK_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def room_for(folder, what: str, needed=None, partial=()):
    """Around a write of about `needed` bytes into folder: if the disk is full, the paths in
    `partial` (what the write leaves half: a temporary file or folder) are removed and NoRoom
    ends the program in one line. Any other error passes as it is."""
    try:
        yield
    except Exception as error:
        if not disk_full(error):
            raise
        for path in map(Path, partial):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise NoRoom(folder, what, needed) from None


def write_whole(path, text, what=None):
    """Write text (str or bytes) to path whole: to a temporary file beside it (.tmp-NAME), then
    renamed into place. A failure leaves an earlier file at path as it was; a full disk removes
    the temporary file and raises NoRoom."""
    path = Path(path)
    data = text.encode() if isinstance(text, str) else text
    tmp = path.with_name(f".tmp-{path.name}")
    with room_for(path.parent, what or path.name, needed=len(data), partial=[tmp]):
        tmp.write_bytes(data)
        os.replace(tmp, path)


def append_whole(path, text: str, what=None):
    """Add text (a line) to the end of path whole: a full disk cuts the file back to its length
    before and raises NoRoom."""
    path = Path(path)
    data = text.encode()
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush after a failure
        with room_for(path.parent, what or f"a line of {path.name}", needed=len(data)):
            write_or_cut_back(f.fileno(), data)


def print_whole(text: str):
    """Print text to stdout whole. Where stdout is a file (`> table.md`) on a full disk, that file
    is cut back to where it was and NoRoom names its folder."""
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture): as print does
        print(text)
        return
    folder = Path(os.path.realpath(f"/proc/self/fd/{fd}")).parent  # Linux: the file's folder
    with room_for(folder, "the printed text", needed=len(text.encode()) + 1):
        write_or_cut_back(fd, (text + "\n").encode())


def write_or_cut_back(fd: int, data: bytes):
    """Write data at the end of the open file fd, all of it; a failure cuts a regular file back
    to its length before, so that no half of it stays."""
    before = os.fstat(fd)
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        if stat.S_ISREG(before.st_mode):  # (a pipe or a terminal cannot be cut back)
            os.ftruncate(fd, before.st_size)
        raise


# Out of memory ------------------------------------------------------------------------------------


def out_of_memory(error) -> bool:
    """Is this error torch's out of memory: torch.OutOfMemoryError (CUDA's, and wherever else
    torch raises it) or the CPU allocator's RuntimeError?"""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    cpu_allocator = isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    return isinstance(error, torch.OutOfMemoryError) or cpu_allocator


def new_step():
    """A training step begins (MetricsLog, after each step): peak_memory measures from here."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> str:
    """For the line: ", peak 21.3 GiB of the GPU's 23.6 GiB" (the most CUDA memory allocated
    since the step began, torch.cuda.max_memory_allocated); "" where it is not known (CPU)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return ""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return f", peak {size(torch.cuda.max_memory_allocated())} of the GPU's {size(total)}"


@contextlib.contextmanager
def memory_bound_by(flag: str, value: int, what: str):
    """Around work (`what`) whose memory flag's value bounds (eval.py's --batch_size): out of
    memory ends in one line naming the flag, its value and half of it to try."""
    try:
        yield
    except Exception as error:
        if not out_of_memory(error):
            raise
        advice = (f"try {flag} {value // 2}" if value > 1 else
                  f"{flag} is 1 already: the model alone does not fit; use a device with more "
                  "memory")
        fail(f"out of memory in {what}{peak_memory()}: {flag} {value} sequences at once; "
             f"{advice}")
