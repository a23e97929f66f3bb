"""The reference: llama.cpp's own ggml, built from the source vendored in llama-cpp-python's sdist.

Tests and benchmarks call it through ctypes as the oracle for bit-exactness; later stages use its
tools (llama-quantize, llama-perplexity, llama-imatrix) as the referee. Nothing in the product
path needs it.
"""

import ctypes
import shutil
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .cache import cache_dir

SDIST = "llama-cpp-python==0.3.36"
LLAMA_CPP_COMMIT = "0c1e570"


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed; see {log}")


def llama_cpp_source() -> Path:
    """The vendored llama.cpp tree, downloaded from PyPI and unpacked once into the cache."""
    root = cache_dir() / "llama.cpp"
    tree = root / "src"
    if (tree / "ggml" / "src" / "ggml-quants.c").exists():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    log = root / "fetch.log"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(root), SDIST], log)
    archive = next(root.glob("llama_cpp_python-*.tar.gz"))
    partial = root / "src.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(partial, members=[m for m in members if m.name], filter="data")
    partial.rename(tree)
    archive.unlink()
    return tree


def _build(targets: list[str]) -> Path:
    """Configure once (CPU only, portable flags) and build the given CMake targets; returns bin/."""
    tree = llama_cpp_source()
    build = cache_dir() / "llama.cpp" / "build"
    log = cache_dir() / "llama.cpp" / "build.log"
    if not (build / "CMakeCache.txt").exists():
        _run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON",
              "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], log)
    _run(["cmake", "--build", str(build), "-j", "2", "--target", *targets], log)
    return build / "bin"


def llama_tool(name: str) -> Path:
    """Path to a llama.cpp tool such as "llama-quantize", built on first use (minutes)."""
    path = cache_dir() / "llama.cpp" / "build" / "bin" / name
    if not path.exists():
        _build([name])
    return path


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)),
        ("from_float_ref", ctypes.c_void_p),
    ]


class Ggml:
    """ctypes access to ggml-base: `ggml_quantize_chunk` and each type's `to_float`."""

    def __init__(self, library: Path):
        self.lib = ctypes.CDLL(str(library))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]

    @staticmethod
    def _type(type_name: str) -> int:
        return int(GGMLQuantizationType[type_name])

    def quantize(self, x: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> bytes:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        t = self._type(type_name)
        out = np.zeros(rows * self.lib.ggml_row_size(t, cols), dtype=np.uint8)
        qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
        self.lib.ggml_quantize_chunk(t, x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                     None if qw is None else qw.ctypes.data)
        return out.tobytes()

    def dequantize(self, data: bytes, type_name: str, shape: tuple[int, int]) -> np.ndarray:
        if type_name == "F32":  # ggml has no to_float for F32: its storage is the value
            return np.frombuffer(data, dtype=np.float32).reshape(shape).copy()
        raw = np.frombuffer(data, dtype=np.uint8).copy()
        out = np.empty(shape, dtype=np.float32)
        self.lib.ggml_get_type_traits(self._type(type_name)).contents.to_float(raw.ctypes.data, out.ctypes.data, out.size)
        return out


@cache
def ggml() -> Ggml:
    """The reference ggml, built on first use (seconds once the source is cached)."""
    library = cache_dir() / "llama.cpp" / "build" / "bin" / "libggml-base.so"
    if not library.exists():
        _build(["ggml-base"])
    return Ggml(library)
