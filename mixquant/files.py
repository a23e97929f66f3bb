"""Every file mixquant writes, and every GGUF file it reads, goes through here.

Outputs (one API for every command):

    out = check_output(path, inputs)           # refuse before any long work
    with atomic_output(path, inputs) as tmp:    # write to `tmp` (a Path); renamed onto `path` on success
        writer(tmp)
    write_text(path, text, inputs) / write_bytes(path, data, inputs)

An output must be absent or a regular file (never a device, FIFO, folder or socket, even through a
link), in a folder that exists, and must not be, or link to, any file the command reads: the
`inputs` given (a folder stands for every file in it) plus, while a command runs
(`command_inputs()`), every file noted with `note_input` (the readers note what they read, the CLI
notes every path argument up front). The data goes to a
temporary file created exclusively (mkstemp) in the output's folder under an unpredictable name
`.<name>.<pid>.<random>.mixquant-partial`, which is renamed into place only once complete and
removed on any error, Ctrl-C or SIGTERM (`handle_sigterm`); one left by a killed run (SIGKILL,
power loss) is removed by the next run writing that output, which says so in one line.

GGUF files are opened with `open_gguf`: gguf's GGUFReader (with a plain-ndarray view, fast on
tokenizer metadata) whose every declared count and size is checked against the file's size before
anything is allocated, so a 100-byte file cannot claim 2^62 array items.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import MixquantError

__all__ = ["check_output", "atomic_output", "write_text", "write_bytes", "note_input", "command_inputs",
           "handle_sigterm", "Terminated", "open_gguf", "PARTIAL_SUFFIX"]

PARTIAL_SUFFIX = ".mixquant-partial"

PathLike = str | os.PathLike[str]

# Files (and folders) the running command reads: no output of it may be one of them.
_inputs: set[Path] | None = None


def note_input(path: PathLike | None) -> None:
    """Remember that `path` (a file, or a folder standing for its files) is read by the running
    command (the readers call this; outside `command_inputs()` it does nothing)."""
    if path is not None and _inputs is not None:
        _inputs.add(Path(path).expanduser())


@contextmanager
def command_inputs() -> Iterator[None]:
    """While a command runs: every input noted is checked against every output it writes."""
    global _inputs
    previous, _inputs = _inputs, set()
    try:
        yield
    finally:
        _inputs = previous


def _input_files(inputs: Iterable[PathLike | None]) -> list[Path]:
    files: list[Path] = []
    for f in [*inputs, *(_inputs or ())]:
        if f is None:
            continue
        p = Path(f).expanduser()
        if p.is_dir():
            files += [q for q in p.iterdir() if q.is_file()]
        files.append(p)
    return files


def _check_kind(out: Path) -> None:
    try:
        st = os.stat(out)  # follows a link: what a write would reach
    except FileNotFoundError:
        return
    except OSError as exc:
        raise MixquantError(f"{out}: cannot use as output: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise MixquantError(f"{out}: is a folder; give the path of the file to write")
    if not stat.S_ISREG(st.st_mode):
        raise MixquantError(f"{out}: not a regular file (a device, FIFO or socket); refusing to replace it")


def check_output(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> Path:
    """The output path, if a file may be written there; else a one-line MixquantError."""
    out = Path(path).expanduser()
    _check_kind(out)
    if not out.parent.is_dir():
        raise MixquantError(f"{out.parent}: output folder does not exist")
    resolved = out.resolve()
    exists = out.exists()
    for f in _input_files(inputs):
        same = resolved == f.resolve()
        if not same and exists and f.exists():
            try:
                same = os.path.samefile(out, f)
            except OSError:
                same = False
        if same:
            raise MixquantError(f"{out}: refusing to overwrite the input file {f}")
    _probe(out)
    return out


def _probe(out: Path) -> None:
    """Fail now, not after the long work, when the folder takes no new file (read-only, no permission)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=out.parent)
    except OSError as exc:
        raise MixquantError(f"{out}: cannot write: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(name)


_STALE = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+" + re.escape(PARTIAL_SUFFIX) + "$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: Path) -> None:
    """Remove partial files of `out` left by killed runs (their process is gone), saying so once."""
    removed = []
    for p in out.parent.glob(f".{_glob_escape(out.name)}.*{PARTIAL_SUFFIX}"):
        m = _STALE.fullmatch(p.name)
        if m and m["name"] == out.name and not _alive(int(m["pid"])) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    if removed:
        print(f"mixquant: removed {len(removed)} partial file(s) left by an interrupted run: {', '.join(removed)}",
              file=sys.stderr)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextmanager
def atomic_output(path: PathLike, inputs: Iterable[PathLike | None] = ()) -> Iterator[Path]:
    """Yield a fresh temporary file next to `path`; on success it is fsynced and renamed onto `path`,
    on any exception (Ctrl-C, SIGTERM included) removed. OSErrors become one-line MixquantErrors."""
    out = check_output(path, inputs)
    remove_stale_partials(out)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=out.parent)
    except OSError as exc:
        raise MixquantError(f"{out}: cannot write: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output is an ordinary file
        _check_kind(out)  # still absent or a regular file
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, MixquantError):
            if exc.errno == errno.ENOSPC:
                raise MixquantError(f"{out}: write failed: no space left on the device") from None
            raise MixquantError(f"{out}: write failed: {exc.strerror or exc}") from None
        raise


def write_bytes(path: PathLike, data: bytes, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Write `data` to `path` atomically (see atomic_output)."""
    with atomic_output(path, inputs) as tmp:
        tmp.write_bytes(data)
    return Path(path).expanduser()


def write_text(path: PathLike, text: str, inputs: Iterable[PathLike | None] = ()) -> Path:
    """Write UTF-8 `text` to `path` atomically (see atomic_output)."""
    return write_bytes(path, text.encode("utf-8"), inputs)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup that runs on Ctrl-C runs on it too."""


def _in_finalizer(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _deliver_again(signum: int) -> None:
    """Send `signum` to this process again in a moment, from another thread: an exception raised
    inside a finalizer (`__del__`) is printed as "Exception ignored" and lost, so a signal that
    lands there is delivered again once the finalizer is done."""
    def later() -> None:
        time.sleep(0.01)
        os.kill(os.getpid(), signum)

    threading.Thread(target=later, daemon=True).start()


def _on_signal(signum: int, frame: Any) -> None:
    if _in_finalizer(frame):
        _deliver_again(signum)
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def handle_sigterm() -> dict[int, Any]:
    """Turn SIGTERM into `Terminated` (and SIGINT into KeyboardInterrupt, as Python does) in this
    (main) thread, never inside a finalizer; returns {signal: the handler it replaces}."""
    return {signum: signal.signal(signum, _on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}


# --------------------------------------------------------------------------------------------
# GGUF reading, bounded


def _gguf_reader_class():
    import gguf
    from gguf import GGUFValueType

    # the smallest encoding of one item of each value type (a string is at least its 8-byte length)
    min_size = {int(GGUFValueType.STRING): 8, int(GGUFValueType.ARRAY): 12}
    for vtype, nptype in gguf.GGUFReader.gguf_scalar_to_np.items():
        min_size[int(vtype)] = np.dtype(nptype).itemsize
    array = int(GGUFValueType.ARRAY)
    get_field_parts = gguf.GGUFReader._get_field_parts

    class BoundedGGUFReader(gguf.GGUFReader):
        """gguf's reader, with every read checked against the file's end before it is made, and
        slicing a plain ndarray view of its map: numpy's memmap subclass makes each of the ~250k
        small slices a tokenizer's metadata needs slow (seconds per file otherwise)."""

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
                self._size = len(plain)
            dtype = np.dtype(dtype)
            end = offset + dtype.itemsize * int(count)
            if end > self._size or count < 0 or offset < 0:
                raise _Truncated(f"reading {int(count)} x {dtype} at byte {offset} passes the end of the file "
                                 f"({self._size} bytes)")
            arr = plain[offset:end].view(dtype)
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        def _left(self, offs: int) -> int:
            return int(self.data.shape[0]) - int(offs)

        def _get_field_parts(self, orig_offs: int, raw_type: int):
            if raw_type == array:
                sub, n = int(self._get(orig_offs, np.uint32)[0]), int(self._get(orig_offs + 4, np.uint64)[0])
                if sub not in min_size:
                    raise _Truncated(f"unknown array item type {sub} at byte {orig_offs}")
                if n * min_size[sub] > self._left(orig_offs + 12):
                    raise _Truncated(f"array at byte {orig_offs} claims {n} items, more than the file holds")
            return get_field_parts(self, orig_offs, raw_type)

        def _build_fields(self, offs: int, count: int) -> int:
            if int(count) * 13 > self._left(offs):  # key length, 1-byte key, type, 1-byte value at least
                raise _Truncated(f"header claims {int(count)} metadata entries, more than the file holds")
            return super()._build_fields(offs, count)

        def _build_tensor_info(self, offs: int, count: int):
            if int(count) * 24 > self._left(offs):  # name length, dims count, type, offset at least
                raise _Truncated(f"header claims {int(count)} tensors, more than the file holds")
            return super()._build_tensor_info(offs, count)

        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = int(self.data.shape[0])
            for field in fields:
                _, _, _, dims, raw_dtype, offset = field.parts
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                except ValueError:
                    raise _Truncated(f"tensor {field.name}: unknown ggml type {int(raw_dtype[0])}") from None
                if len(dims) > 4:
                    raise _Truncated(f"tensor {field.name}: {len(dims)} dimensions")
                n = 1
                for d in dims.tolist():
                    n *= int(d)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                begin = int(start_offs) + int(offset[0])
                if n % block or begin + n // block * type_size > size:
                    raise _Truncated(f"tensor {field.name} ({qtype.name}, {n} values) does not fit in the file")
            super()._build_tensors(start_offs, fields)

    return BoundedGGUFReader


class _Truncated(Exception):
    """A GGUF declares more than its bytes hold."""


_READER = None


def open_gguf(path: PathLike):
    """gguf's GGUFReader on `path` (read-only), bounded by the file's size; a missing, non-GGUF,
    truncated or inconsistent file is a one-line MixquantError naming it."""
    global _READER
    path = Path(path).expanduser()
    note_input(path)
    if not path.is_file():
        raise MixquantError(f"{path}: no such file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise MixquantError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if magic != b"GGUF":
        raise MixquantError(f"{path}: not a GGUF file")
    if _READER is None:
        _READER = _gguf_reader_class()
    try:
        return _READER(path, "r")
    except _Truncated as exc:
        raise MixquantError(f"{path}: not a valid GGUF file or truncated: {exc}") from None
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, OverflowError, RecursionError, OSError) as exc:
        # gguf's own checks: bad magic/version/alignment, duplicate keys, unknown value types
        raise MixquantError(f"{path}: not a valid GGUF file or truncated: {exc}") from None
