"""Perplexity and KL divergence of a quantized model against the full-precision one.

    ev = Evaluator("path/to/hf-folder", "eval.txt", ctx=512, chunks=20)
    ev.reference()                       # PPL of the float32 model (cached on disk)
    ev.evaluate_plan("Q4_K_M")           # quantize in memory, then PPL / KLD / top-1
    ev.evaluate_gguf("model-Q4_K_M.gguf")  # the same for a GGUF file (mixquant's or llama.cpp's)

What is measured is what llama.cpp's `llama-perplexity` measures (llama.cpp 0c1e570,
`tools/perplexity/perplexity.cpp`, `perplexity()` and `kl_divergence()`):

* the text is cut into `chunks` windows of `ctx` tokens (`mixquant.text.token_windows`: the same
  tokenization, BOS handling and chunk count as llama-perplexity), each evaluated independently;
* only the second half of each window is scored: with `first = ctx // 2`, the logits at positions
  `first .. ctx-2` predict tokens `first+1 .. ctx-1`, i.e. `ctx - 1 - first` tokens per window
  (255 for ctx 512), so every scored token has at least `ctx/2` tokens of context;
* PPL = exp(mean negative log-likelihood over all scored tokens);
* KLD per scored token = sum_v p_ref(v) * (log p_ref(v) - log p_q(v)) (the `--kl-divergence`
  statistic; we sum over the whole vocabulary where llama.cpp drops the terms with
  log p_ref < -16, which changes nothing visible); reported as mean, median and 99th percentile
  (linear interpolation, like llama.cpp's percentile);
* top-1 ("Same top p") = fraction of scored tokens whose most likely next token is the same for
  the quantized model and the reference.

The reference is the Hugging Face checkpoint run by transformers in float32, through the streaming
runtime (`mixquant.runtime`: one decoder block in memory at a time unless the whole model fits half
of `max_memory`; every window through a block before the next one loads; the numbers are those of
transformers' own forward, bit for bit). The quantized model is the *same* model run with another
weight provider, every tensor read as its dequantized value when its block loads
(`dequantize(quantize(w))` for a plan, the file's tensors for a GGUF), so a plan's numbers are those
of the GGUF file `export.write_gguf` would write from it: the bytes are identical, and a quantized
model larger than RAM is evaluated the same way. llama.cpp
computes the same function, but its CPU backend multiplies a quantized weight by activations that
it first rounds to 8 bits per value (each weight type's `vec_dot_type`: Q8_0 blocks of 32 for
Q4_0/Q5_0/Q8_0/IQ4_NL (Q8_1 for Q4_1/Q5_1, the same values), Q8_K blocks of 256 for the k-quants
and IQ4_XS, F16 for F16 weights). That costs about as much again as Q8_0 weights do, so by default
we report the error of the weights alone (what any backend shares), and with
`cpu_activations=True` (`--cpu-activations`) we round every matmul input the way ggml-cpu does and
reproduce llama-perplexity's own KLD and top-1 on the CPU.

The reference pass is cached (like llama-perplexity's `--kl-divergence-base` file) under
`cache_dir()/"eval"/<key>/`, keyed by a content hash of the model files, the token windows (so the
text, ctx, chunks and tokenizer) and the transformers version. Like llama.cpp's base file it
stores the reference's log-softmax of every scored position as 16-bit fixed point (per position:
an offset and a step; llama.cpp spans 16 nats, we span up to 40 below the most likely token, so the
tail that matters at the 1e-7 level is kept), renormalized on reading. The rounding (at most 3e-4
nats) puts a floor of ~1e-8 under the mean KLD; float16 log-probs would give ~3e-7. Size:
chunks x (ctx-1-ctx/2) x n_vocab x 2 bytes, e.g. 25 MB per 512-token chunk for a 49152-token
vocabulary (0.5 GB for the default 20 chunks), plus per-token NLL and argmax. Delete the folder to
reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Union

import gguf
import numpy as np

from .arch import unpermute_qk
from .cache import cache_dir
from .errors import MixquantError
from .files import PARTIAL_SUFFIX, atomic_output, write_text
from .source import quiet_transformers

if TYPE_CHECKING:
    import torch

    from .calibrate import Imatrix
    from .plan import ModelInfo, Plan
    from .runtime import StreamedModel
    from .source import Source

    # an importance matrix, or {GGUF name: importance vector}
    Importance = Union[Imatrix, Mapping[str, np.ndarray]]
    ModelRef = Union[Source, str, os.PathLike[str]]  # an opened source or its Hugging Face folder

__all__ = [
    "EvalResult",
    "Evaluator",
    "Reference",
    "evaluate",
    "compare",
    "format_table",
    "check_items",
    "is_gguf_item",
    "plot_results",
    "unpermute_qk",
    "activation_type",
    "round_activations",
    "DEFAULT_CTX",
    "DEFAULT_CHUNKS",
]

DEFAULT_CTX = 512
DEFAULT_CHUNKS = 20
_CACHE_VERSION = 2
# the stored log-probs span at most this many nats below each position's most likely token
_LOGPROB_SPAN = 40.0
_CODE_MAX = 65535
_ROWS = 32  # scored positions per block of log-prob arithmetic


# --------------------------------------------------------------------------------------------
# results


@dataclass
class EvalResult:
    """One evaluated model against the float32 reference.

    bytes: the GGUF file's size, or for a plan its tensor data (no header/metadata);
    bits_per_weight: tensor data bits per weight in both cases (llama-quantize's BPW);
    tokens: scored tokens (chunks x (ctx - 1 - ctx//2)); tokens_per_s: tokens run through the
    model (chunks x ctx) per second of forward passes, reading (and for a plan quantizing) the
    weights included: the runtime loads them during the pass.
    """

    label: str
    kind: str  # "plan", "gguf" or "reference"
    bytes: int
    bits_per_weight: float
    ppl: float
    ppl_ref: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    top1: float
    tokens: int
    tokens_per_s: float
    ctx: int = DEFAULT_CTX
    chunks: int = 0
    seconds: float = 0.0  # wall time of the whole evaluation, quantization included
    cpu_activations: bool = False  # matmul inputs rounded as llama.cpp's CPU backend does

    @property
    def ppl_ratio(self) -> float:
        return self.ppl / self.ppl_ref if self.ppl_ref else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ppl_ratio"] = self.ppl_ratio
        return d


# --------------------------------------------------------------------------------------------
# helpers


def _importance(imatrix: Importance | None, name: str) -> np.ndarray | None:
    """An importance vector from an Imatrix (`.importance(name)`) or a {name: vector} dict."""
    if imatrix is None:
        return None
    if hasattr(imatrix, "importance"):
        return imatrix.importance(name)
    return imatrix.get(name)


def _file_digest(path: Path, memo_path: Path) -> str:
    """sha256 of a file's content, memoized in `memo_path` by (path, size, mtime) so that big
    weights are hashed once."""
    path = path.resolve()
    st = path.stat()
    stamp = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if stamp in memo:
        return memo[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo = {k: v for k, v in memo.items() if not k.startswith(f"{path}|")}
    memo[stamp] = digest
    memo_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(memo_path, json.dumps(memo, indent=0))
    return digest


def _percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's percentile: linear interpolation at fraction * (n - 1)."""
    if values.size == 0:
        return float("nan")
    return float(np.percentile(values, 100.0 * fraction, method="linear"))



def _row_blocks(n: int) -> Iterator[slice]:
    """Scored positions in blocks of _ROWS: the float64 temporaries of a window's vocabulary-wide
    arithmetic stay small (each row's result is the same as over the whole window)."""
    return (slice(i, min(i + _ROWS, n)) for i in range(0, n, _ROWS))


def _drop_pages(codes: np.memmap, chunk: int) -> None:
    """Let one chunk's pages of the memory-mapped log-prob codes leave this process's RSS (mapped
    file pages count in it, and a whole reference is 25 MB per 512-token chunk): each chunk is
    written once by the reference pass and read once per evaluation. Written pages are flushed
    first; the file keeps them."""
    from .source import _release

    per_chunk = codes[0].nbytes
    _release(codes, codes.offset % mmap.ALLOCATIONGRANULARITY + chunk * per_chunk, per_chunk)


def _encode(logp) -> tuple[np.ndarray, np.ndarray]:
    """float64 log-probs (n, n_vocab) -> (uint16 codes, (offset, step) per row).

    The codes span [max - 40, max] (or [min, max] when narrower) in 65535 equal steps, rounded to
    nearest; lower values are clamped to the bottom (probability below 4e-18 of the top token's).
    """
    import torch

    hi = logp.max(dim=-1).values
    lo = torch.maximum(logp.min(dim=-1).values, hi - _LOGPROB_SPAN)
    step = (hi - lo) / _CODE_MAX
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = ((logp - lo[:, None]) / step[:, None]).clamp(0, _CODE_MAX).round().to(torch.int32)
    return codes.numpy().astype(np.uint16), torch.stack([lo, step], dim=1).numpy()


# ggml-cpu's vec_dot_type of each weight type (ggml-cpu.c type_traits_cpu): the format a matmul's
# activations are converted to. Q8_1 (for Q4_1/Q5_1) rounds the values exactly as Q8_0 does.
_ACT_Q8_0 = frozenset({"Q1_0", "Q2_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "IQ4_NL", "MXFP4", "NVFP4"})


def activation_type(weight_type: str) -> str | None:
    """What ggml-cpu rounds a matmul's activations to for weights of this type (None: float32)."""
    t = str(weight_type).upper()
    if t == "F32":
        return None
    if t in ("F16", "BF16"):
        return t
    return "Q8_0" if t in _ACT_Q8_0 else "Q8_K"


def round_activations(x, kind: str | None):
    """float32 activations (..., n) rounded as ggml-cpu's quantize_row_<kind> + dot product see them.

    Q8_0: per block of 32, d = amax/127, q = round(x * 127/amax), value q * fp16(d).
    Q8_K: per block of 256, with m the value of largest magnitude, iscale = -127/m,
    q = min(127, round(iscale * x)), value q / iscale (float32 scale).
    """
    import torch

    if kind is None:
        return x
    if kind == "F16":
        return x.to(torch.float16).to(x.dtype)
    if kind == "BF16":
        return x.to(torch.bfloat16).to(x.dtype)
    block = 32 if kind == "Q8_0" else 256
    shape = x.shape
    # (torch computes `scalar / tensor` as a multiplication by the reciprocal, which is not C's
    # correctly rounded division: divide tensor by tensor)
    if shape[-1] % block:
        raise MixquantError(f"activations of width {shape[-1]} cannot be rounded in blocks of {block}")
    b = x.reshape(-1, block)
    if kind == "Q8_0":
        amax = b.abs().amax(dim=-1, keepdim=True)
        c127 = torch.full_like(amax, 127.0)
        d = (amax / c127).to(torch.float16).to(x.dtype)
        inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
        return (torch.round(b * inv) * d).reshape(shape)
    m = b.gather(-1, b.abs().argmax(dim=-1, keepdim=True))
    iscale = torch.where(m != 0, torch.full_like(m, -127.0) / m, torch.zeros_like(m))
    q = torch.round(iscale * b).clamp(max=127)
    d = torch.where(m != 0, torch.ones_like(m) / iscale, torch.zeros_like(m))
    return (q * d).reshape(shape)


# --------------------------------------------------------------------------------------------
# the cached reference


@dataclass
class Reference:
    """The float32 model's scored-token statistics, as stored in the cache folder."""

    folder: Path
    nll: np.ndarray  # (chunks, n_scored) float64
    top1: np.ndarray  # (chunks, n_scored) int32: the reference's argmax token
    codes: np.ndarray  # (chunks, n_scored, n_vocab) uint16 memmap: log-softmax in fixed point
    scale: np.ndarray  # (chunks, n_scored, 2) float64: (offset, step) of each position's codes
    meta: dict

    def logprobs(self, chunk: int, rows: slice = slice(None)):
        """The reference log-softmax of one chunk's scored positions (`rows` of them), float64 torch
        (n_scored, n_vocab), renormalized after decoding."""
        import torch

        codes = torch.from_numpy(np.asarray(self.codes[chunk, rows]).astype(np.int32))
        sc = torch.from_numpy(np.array(self.scale[chunk, rows]))
        logp = sc[:, :1] + codes.double() * sc[:, 1:]
        return logp - torch.logsumexp(logp, dim=-1, keepdim=True)

    @property
    def ppl(self) -> float:
        return float(math.exp(self.nll.mean()))

    @property
    def tokens_per_s(self) -> float:
        return float(self.meta.get("tokens_per_s", float("nan")))

    @classmethod
    def load(cls, folder: Path) -> "Reference":
        meta = json.loads((folder / "meta.json").read_text())
        return cls(
            folder=folder,
            nll=np.load(folder / "nll.npy"),
            top1=np.load(folder / "top1.npy"),
            codes=np.load(folder / "logprobs.npy", mmap_mode="r"),
            scale=np.load(folder / "scale.npy"),
            meta=meta,
        )


# --------------------------------------------------------------------------------------------
# the evaluator


class _Stopwatch:
    """Accumulated wall time of the `with` blocks it times."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._start

    def rate(self, count: int) -> float:
        return count / self.seconds if self.seconds else float("nan")


class Evaluator:
    """One model, evaluated as the reference and then as quantized variants.

    src: a Hugging Face model folder (or an opened `Source` with one); text: the evaluation text
    file; ctx / chunks: as llama-perplexity's -c / --chunks (chunks None or < 0: all windows);
    threads: torch and quantization threads (default: torch's); cache: the folder that holds the
    cached references (default `cache_dir()/"eval"`); cpu_activations: round the inputs of every
    matmul with a quantized weight as llama.cpp's CPU backend does (see the module docstring);
    max_memory / device / dtype: the runtime's budget (bytes or a size; None: what the machine has
    free), device and compute precision (`mixquant.runtime.StreamedModel`).
    """

    def __init__(
        self,
        src: ModelRef,
        text: str | os.PathLike[str],
        *,
        ctx: int = DEFAULT_CTX,
        chunks: int | None = DEFAULT_CHUNKS,
        threads: int | None = None,
        cache: str | os.PathLike[str] | None = None,
        progress: bool = True,
        cpu_activations: bool = False,
        max_memory: int | str | None = None,
        device: str | None = "cpu",
        dtype: str | None = "float32",
    ):
        from .source import Source, open_source

        need_folder = ("evaluation needs the model's Hugging Face folder (the float32 reference runs in "
                       "transformers), not a GGUF file")
        if not isinstance(src, Source) and Path(src).expanduser().is_file() and Path(src).name != "config.json":
            raise MixquantError(f"{Path(src).expanduser()}: {need_folder}")
        self.source = src if isinstance(src, Source) else open_source(src)
        folder = getattr(self.source, "hf_folder", None)
        if folder is None:
            raise MixquantError(f"{self.source.path}: {need_folder}")
        self.folder = Path(folder)
        self.text_path = Path(text).expanduser()
        if not self.text_path.is_file():
            raise MixquantError(f"{self.text_path}: no such text file")
        if ctx < 4:
            raise MixquantError(f"context size must be at least 4, got {ctx}")
        if chunks == 0:
            raise MixquantError("chunks must be at least 1 (or None/-1: all of the text)")
        self.ctx = int(ctx)
        self.threads = threads
        self.progress = progress
        self.cpu_activations = bool(cpu_activations)
        self.max_memory, self.device, self.dtype = max_memory, device or "cpu", dtype or "float32"
        self.cache_root = Path(cache).expanduser() if cache is not None else cache_dir() / "eval"
        self.first = self.ctx // 2
        self.n_scored = self.ctx - 1 - self.first

        import torch

        if threads:
            torch.set_num_threads(int(threads))
        from transformers import AutoTokenizer

        from .text import adds_bos, read_text, token_windows

        try:
            with quiet_transformers():
                self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - tokenizer libraries raise anything
            raise MixquantError(f"{self.folder}: cannot load the tokenizer: {exc}") from None
        self.add_bos = adds_bos(self.tokenizer)
        self.windows = token_windows(self.tokenizer, read_text(self.text_path), self.ctx, chunks,
                                     add_bos=self.add_bos)
        self.n_chunks = int(self.windows.shape[0])
        self._model: StreamedModel | None = None
        self._dirty = False  # the runtime reads other weights than the checkpoint's
        self._reference: Reference | None = None

    # -- the model ---------------------------------------------------------------------------

    @property
    def runtime(self) -> StreamedModel:
        """The model, run one unit at a time within the memory budget (built on first use)."""
        if self._model is None:
            from .runtime import StreamedModel

            try:
                self._model = StreamedModel(self.source, device=self.device, dtype=self.dtype,
                                            max_memory=self.max_memory)
            except MixquantError as exc:
                raise MixquantError(f"{self.folder}: {exc}") from None
        return self._model

    @property
    def model(self):
        """The whole transformers model with the current weights in every module, for callers that
        run it in one piece (mixquant.activations, tests); the weights must fit half the budget."""
        from .runtime import format_size

        rt = self.runtime
        if not rt.resident:
            raise MixquantError(f"running the whole model at once needs its weights ({format_size(rt.weight_bytes)}) "
                                f"within half the memory budget ({format_size(rt.budget)})")
        for unit in rt.units:
            rt.load(unit)
        return rt.model

    @property
    def params(self) -> dict[str, Any]:
        """GGUF tensor name -> the transformers parameter holding it (tied ones appear once), loaded."""
        self.model  # noqa: B018 - loads every unit
        return self.runtime.parameters_by_name()

    def linear_weights(self) -> dict[torch.nn.Linear, str]:
        """Every nn.Linear of the model -> the GGUF weight it multiplies its input by. The modules
        keep their identity while the runtime swaps weights in and out: hooks on them last."""
        return self.runtime.linear_weights()

    def _to_hf(self, name: str, x: np.ndarray) -> np.ndarray:
        """A tensor in GGUF orientation and values -> the transformers parameter's (the adapter's
        inverse of the conversion: q/k rows un-permuted, Gemma's norm shift taken off)."""
        return self.source.adapter.from_gguf(name, x, self.source.model)

    def _use_weights(self, weights: Callable[[str], np.ndarray] | None) -> None:
        """Run the model with another weight provider (GGUF name -> float32 values in GGUF
        orientation; None: the checkpoint's own)."""
        self.runtime.set_weights(weights)
        self._dirty = weights is not None

    @contextmanager
    def _activation_hooks(self, types: dict[str, str]) -> Iterator[None]:
        """With cpu_activations: round each Linear's input for its weight's type while inside."""
        hooks = []
        if self.cpu_activations:
            for module, name in self.linear_weights().items():
                kind = activation_type(types.get(name, "F32"))
                if kind is None:
                    continue
                hooks.append(module.register_forward_pre_hook(
                    lambda mod, args, kind=kind: (round_activations(args[0], kind), *args[1:])))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def restore(self) -> None:
        """Run the checkpoint's own float32 weights again."""
        if self._dirty:
            self._use_weights(None)

    # -- forward passes ----------------------------------------------------------------------

    def _bar(self, desc: str, chunks: int | None = None):
        from tqdm import tqdm

        return tqdm(range(chunks or self.n_chunks), desc=desc, unit="chunk", leave=False,
                    disable=not self.progress, file=sys.stderr)

    def _scored(self, label: str, forward: "_Stopwatch", chunks: int | None = None):
        """Per window: (index, float32 logits of the scored positions); times the forward passes.

        Block-major through the runtime: every window through the embedding and each block in turn
        (`runtime.windows.run_windows`), then the final norm and head one window at a time, on
        positions first .. ctx-1 (the last one predicts nothing and is dropped)."""
        import torch

        from .runtime.windows import run_windows

        rt = self.runtime
        windows = self.windows[: chunks or self.n_chunks]
        with forward:
            states = run_windows(rt, windows, desc=f"{label}: blocks", progress=self.progress)
        try:
            with rt.loaded("head"):
                for c in self._bar(label, len(windows)):
                    with forward, torch.inference_mode():
                        h = states.get(slice(c, c + 1))[:, self.first:].to(rt.device, rt.dtype)
                        logits = rt.logits(h)[0, :-1].cpu()
                    yield c, logits
        finally:
            states.close()

    def _log_probs(self, c: int, logits: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, np.ndarray]]:
        """Window `c`'s scored positions in blocks (`_row_blocks`): (rows, their float64
        log-softmax, the NLL of each one's true next token)."""
        import torch

        targets = self.windows[c, self.first + 1:]
        for rows in _row_blocks(self.n_scored):
            logq = torch.log_softmax(logits[rows].double(), dim=-1)
            yield rows, logq, (-logq.gather(1, targets[rows, None]).squeeze(1)).numpy()

    # -- reference ---------------------------------------------------------------------------

    def cache_key(self) -> str:
        import transformers

        files = sorted({*self.source.input_files, self.folder / "config.json"})
        h = hashlib.sha256()
        h.update(json.dumps({
            "version": _CACHE_VERSION,
            "transformers": transformers.__version__,
            "ctx": self.ctx,
            **({} if self.dtype == "float32" else {"dtype": self.dtype}),
            "files": [[f.name, _file_digest(Path(f), self.cache_root / "file-digests.json")] for f in files],
        }, sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.windows.numpy(), dtype=np.int64).tobytes())
        return h.hexdigest()[:24]

    def reference(self) -> Reference:
        """The float32 model's statistics: from the cache, or computed (and cached) now."""
        if self._reference is not None:
            return self._reference
        self.cache_root.mkdir(parents=True, exist_ok=True)
        folder = self.cache_root / self.cache_key()
        if (folder / "meta.json").is_file():
            try:
                ref = Reference.load(folder)
                if ref.codes.shape[:2] == (self.n_chunks, self.n_scored):
                    self._reference = ref
                    return ref
            except (OSError, ValueError):
                pass
            shutil.rmtree(folder, ignore_errors=True)  # unreadable or stale: recompute
        self._reference = self._compute_reference(folder)
        return self._reference

    def _compute_reference(self, folder: Path) -> Reference:
        self.restore()
        n_vocab = int(self.runtime.model.config.vocab_size)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # an unpredictable name, created exclusively (as mixquant.files does for files)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=folder.parent))
        try:
            free = shutil.disk_usage(tmp).free
            need = self.n_chunks * self.n_scored * n_vocab * 2
            if need > free:
                raise MixquantError(f"{tmp.parent}: the reference needs {need / 1e9:.1f} GB of disk, "
                                    f"only {free / 1e9:.1f} GB free; use fewer --chunks")
            codes = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.uint16,
                                              shape=(self.n_chunks, self.n_scored, n_vocab))
            scale = np.zeros((self.n_chunks, self.n_scored, 2), dtype=np.float64)
            nll = np.zeros((self.n_chunks, self.n_scored), dtype=np.float64)
            top1 = np.zeros((self.n_chunks, self.n_scored), dtype=np.int32)
            forward = _Stopwatch()
            for c, logits in self._scored("reference", forward):
                top1[c] = logits.argmax(dim=-1).numpy()
                for rows, logq, row_nll in self._log_probs(c, logits):
                    nll[c, rows] = row_nll
                    codes[c, rows], scale[c, rows] = _encode(logq)
                codes.flush()
                _drop_pages(codes, c)
            codes.flush()
            del codes
            np.save(tmp / "scale.npy", scale)
            np.save(tmp / "nll.npy", nll)
            np.save(tmp / "top1.npy", top1)
            meta = {
                "version": _CACHE_VERSION,
                "model": str(self.folder),
                "text": str(self.text_path),
                "ctx": self.ctx,
                "chunks": self.n_chunks,
                "n_scored": self.n_scored,
                "n_vocab": n_vocab,
                "add_bos": self.add_bos,
                "dtype": self.dtype,
                "ppl": float(math.exp(nll.mean())),
                "tokens_per_s": forward.rate(self.n_chunks * self.ctx),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.replace(tmp, folder)
            except OSError:  # another process finished the same reference first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return Reference.load(folder)

    def reference_result(self) -> EvalResult:
        """The reference itself as a row of a table (KLD 0, top-1 1)."""
        ref = self.reference()
        info = self.source.model
        n_el = sum(math.prod(t.shape) for t in info.tensors)
        nbytes = sum(math.prod(t.shape) * 4 for t in info.tensors)
        return EvalResult(label="reference (float32)", kind="reference", bytes=nbytes,
                          bits_per_weight=8.0 * nbytes / n_el, ppl=ref.ppl, ppl_ref=ref.ppl, kld_mean=0.0,
                          kld_median=0.0, kld_p99=0.0, top1=1.0, tokens=int(ref.nll.size),
                          tokens_per_s=ref.tokens_per_s, ctx=self.ctx, chunks=self.n_chunks)

    # -- quantized ---------------------------------------------------------------------------

    def _score(self, label: str, kind: str, nbytes: int, bpw: float, started: float,
               types: dict[str, str]) -> EvalResult:
        """Run every window through the (modified) model and compare with the reference."""
        with self._activation_hooks(types):
            return self._score_windows(label, kind, nbytes, bpw, started)

    def score(self, label: str, chunks: int | None = None) -> EvalResult:
        """Evaluate the model as it is now, with any hooks a caller has put on it (mixquant.activations
        fake-quantizes activations this way), on the first `chunks` windows (default all)."""
        return self._score_windows(label, "model", 0, 0.0, time.perf_counter(), chunks)

    def _score_windows(self, label: str, kind: str, nbytes: int, bpw: float, started: float,
                       chunks: int | None = None) -> EvalResult:
        ref = self.reference()
        n_chunks = min(chunks or self.n_chunks, self.n_chunks)
        kld = np.zeros((n_chunks, self.n_scored), dtype=np.float64)
        nll = np.zeros((n_chunks, self.n_scored), dtype=np.float64)
        same = 0
        forward = _Stopwatch()
        for c, logits in self._scored(label, forward, n_chunks):
            same += int((logits.argmax(dim=-1).numpy() == ref.top1[c]).sum())
            for rows, logq, row_nll in self._log_probs(c, logits):
                nll[c, rows] = row_nll
                logp = ref.logprobs(c, rows)
                kld[c, rows] = (logp.exp() * (logp - logq)).sum(dim=-1).numpy()
            _drop_pages(ref.codes, c)
            del logq, logp, logits
        flat = kld.reshape(-1)
        return EvalResult(
            label=label, kind=kind, bytes=int(nbytes), bits_per_weight=float(bpw),
            ppl=float(math.exp(nll.mean())), ppl_ref=ref.ppl,
            kld_mean=float(flat.mean()), kld_median=float(np.median(flat)), kld_p99=_percentile(flat, 0.99),
            top1=same / flat.size, tokens=int(flat.size),
            tokens_per_s=forward.rate(n_chunks * self.ctx),
            ctx=self.ctx, chunks=n_chunks, seconds=time.perf_counter() - started,
            cpu_activations=self.cpu_activations,
        )

    def evaluate_plan(self, plan: Plan | Mapping[str, str] | str, imatrix: Importance | None = None,
                      label: str | None = None) -> EvalResult:
        """Quantize the model in memory to `plan` (a Plan, a {name: type} dict, or a preset/type name
        for `plan.preset_plan`), with importance vectors from `imatrix` (an Imatrix or a dict), and
        evaluate it."""
        from . import formats
        from .plan import Plan, preset_plan

        started = time.perf_counter()
        info = self.source.model
        if isinstance(plan, str):
            preset = plan
            try:
                plan = preset_plan(info, preset, has_imatrix=imatrix is not None)
            except ValueError as exc:
                raise MixquantError(str(exc)) from None
            if label is None:
                label = preset.upper() + (" +imatrix" if imatrix is not None else "")
        elif isinstance(plan, dict):
            plan = Plan(types=dict(plan), shapes={t.name: t.shape for t in info.tensors})
        types = dict(plan.types)
        missing = [t.name for t in info.tensors if t.name not in types]
        if missing:
            raise MixquantError(f"the plan has no type for tensors {', '.join(missing[:3])}")
        unknown = sorted(set(types) - {t.name for t in info.tensors})
        if unknown:
            raise MixquantError(f"the plan names tensors the model does not have: {', '.join(unknown[:3])}")
        label = label or "plan"
        threads = max(1, int(self.threads or 2))

        self.reference()  # before the weights change
        nbytes = n_el = 0
        codecs = {}
        for t in info.tensors:
            rows, cols = (math.prod(t.shape[:-1]) if len(t.shape) > 1 else 1), t.shape[-1]
            try:
                codec = formats.get(types[t.name])
            except ValueError as exc:
                raise MixquantError(f"tensor {t.name}: {exc}") from None
            if cols % codec.block_size:
                raise MixquantError(f"tensor {t.name}: type {codec.name} needs rows whose length is a multiple "
                                    f"of {codec.block_size}, but its rows have {cols} values")
            nbytes += formats.quantized_size(codec.name, (rows, cols))
            n_el += rows * cols
            codecs[t.name] = codec.name

        def roundtripped(name: str) -> np.ndarray:
            """The checkpoint's tensor through the plan's codec and back, computed when its unit loads."""
            w = self.source.tensor(name)
            if codecs[name] == "F32":
                return w
            shape = w.shape
            rows, cols = (math.prod(shape[:-1]) if len(shape) > 1 else 1), shape[-1]
            try:
                data = formats.quantize(w.reshape(rows, cols), codecs[name], importance=_importance(imatrix, name),
                                        threads=threads)
                del w  # one float32 copy at a time: the largest unit's load stays within its working share
                return formats.dequantize(data, codecs[name], (rows, cols)).reshape(shape)
            except ValueError as exc:
                raise MixquantError(f"tensor {name}: cannot quantize to {codecs[name]}: {exc}") from None

        self._use_weights(roundtripped)
        return self._score(label, "plan", nbytes, 8.0 * nbytes / n_el if n_el else 0.0, started, types)

    def evaluate_gguf(self, path: str | os.PathLike[str], label: str | None = None) -> EvalResult:
        """Evaluate the model with a GGUF file's tensors (dequantized one at a time as their unit loads)."""
        started = time.perf_counter()
        path = Path(path).expanduser()
        label = label or path.name
        tensors, reader = _open_gguf(path)
        self._check_gguf(path, reader, tensors)
        self.reference()
        tensor_bytes = sum(int(t.n_bytes) for t in tensors.values())
        n_el = sum(int(t.n_elements) for t in tensors.values())

        def dequantized(name: str) -> np.ndarray:
            from .source import _release

            t = tensors[name]
            x = _dequantize(path, t)
            _release(reader.data, int(t.data_offset), int(t.n_bytes))  # the file's pages leave RSS
            return x

        self._use_weights(dequantized)
        types = {name: t.tensor_type.name for name, t in tensors.items()}
        return self._score(label, "gguf", path.stat().st_size, 8.0 * tensor_bytes / n_el if n_el else 0.0,
                           started, types)

    def evaluate_item(self, item: str, imatrix: Importance | None = None) -> EvalResult:
        """A GGUF file path (ends in .gguf, or names an existing file) or a preset/type name."""
        if is_gguf_item(item):
            return self.evaluate_gguf(item)
        return self.evaluate_plan(item, imatrix=imatrix)

    def _check_gguf(self, path: Path, reader, tensors: dict) -> None:
        info = self.source.model
        arch = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
        arch = str(arch.contents()) if arch is not None else None
        if arch != info.arch:
            raise MixquantError(f"{path}: architecture {arch!r} does not match the model's {info.arch!r}")
        for key, want in (("attention.head_count", info.n_head), ("attention.head_count_kv", info.n_head_kv),
                          ("block_count", info.n_layer), ("embedding_length", info.n_embd)):
            f = reader.fields.get(f"{arch}.{key}")
            if f is None:
                continue
            v = f.contents()
            v = v[0] if isinstance(v, list) else v
            if int(v) != int(want):
                raise MixquantError(f"{path}: {arch}.{key} is {v} but the model has {want}; not this model's GGUF")
        want_shapes = {n: tuple(p.shape) for n, p in self.runtime.parameters_by_name().items()}
        missing = sorted(set(want_shapes) - set(tensors))
        extra = sorted(set(tensors) - set(want_shapes) - self.source.adapter.derived)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else ""))
            if extra:
                parts.append(f"unexpected {', '.join(extra[:3])}" + (f" (+{len(extra) - 3})" if len(extra) > 3 else ""))
            raise MixquantError(f"{path}: tensors do not match the model: {'; '.join(parts)}")
        for name, shape in want_shapes.items():
            got = tuple(int(d) for d in reversed(tensors[name].shape.tolist()))
            if got != shape:
                raise MixquantError(f"{path}: tensor {name} has shape {got}, the model's is {shape}")
        bos = reader.fields.get(gguf.Keys.Tokenizer.ADD_BOS)
        if bos is not None and bool(bos.contents()) != self.add_bos:
            warnings.warn(f"{path}: tokenizer.ggml.add_bos_token is {bool(bos.contents())} but the Hugging Face "
                          f"tokenizer {'adds' if self.add_bos else 'does not add'} BOS; llama-perplexity "
                          "would cut the text differently", stacklevel=3)

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
        self._model = None
        self._reference = None

    def __enter__(self) -> "Evaluator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_gguf(path: Path):
    from .files import open_gguf

    reader = open_gguf(path)
    return {t.name: t for t in reader.tensors}, reader


def _dequantize(path: Path, t) -> np.ndarray:
    """A GGUF tensor as float32 in numpy orientation: mixquant's decoders, gguf's for other types."""
    from . import formats
    from .source import bf16_to_f32

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    kind = t.tensor_type
    if kind == gguf.GGMLQuantizationType.F32:
        x = np.array(t.data, dtype=np.float32)
    elif kind == gguf.GGMLQuantizationType.F16:
        x = np.asarray(t.data).astype(np.float32)
    elif kind == gguf.GGMLQuantizationType.BF16:
        x = bf16_to_f32(np.asarray(t.data).view("<u2"))
    else:
        rows, cols = (math.prod(shape[:-1]) if len(shape) > 1 else 1), shape[-1]
        try:
            formats.get(kind.name)
            known = True
        except ValueError:
            known = False
        try:
            if known:
                x = formats.dequantize(np.asarray(t.data).reshape(-1), kind.name, (rows, cols))
            else:
                x = gguf.quants.dequantize(np.asarray(t.data), kind)
        except (ValueError, NotImplementedError, gguf.quants.QuantError) as exc:
            raise MixquantError(f"{path}: cannot dequantize tensor {t.name} ({kind.name}): {exc}") from None
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(shape)
    if not np.isfinite(x).all():
        raise MixquantError(f"{path}: tensor {t.name} contains NaN/Inf values")
    return x


# --------------------------------------------------------------------------------------------
# convenience, tables and plots


def is_gguf_item(item: str) -> bool:
    """Whether a compare item names a GGUF file (rather than a preset or type)."""
    p = Path(item).expanduser()
    return p.suffix.lower() == ".gguf" or p.is_file() or os.sep in item


def check_items(items: Iterable[str], model_info: ModelInfo, imatrix: Importance | None = None) -> None:
    """Validate compare's items before any slow work: GGUF paths exist, preset names are known and
    mixquant can write every type their plans use."""
    from . import formats
    from .plan import preset_plan

    for item in items:
        if is_gguf_item(item):
            p = Path(item).expanduser()
            if not p.is_file():
                raise MixquantError(f"{p}: no such GGUF file")
            continue
        try:
            plan = preset_plan(model_info, item, has_imatrix=imatrix is not None)
        except ValueError as exc:
            raise MixquantError(str(exc)) from None
        unsupported = sorted({t for t in plan.types.values() if t.upper() not in formats.FORMATS})
        if unsupported:
            raise MixquantError(f"{item}: its plan uses {', '.join(unsupported)}, which mixquant cannot quantize to "
                                f"(supported: {', '.join(formats.FORMATS)})")


def evaluate(src: ModelRef, text: str | os.PathLike[str], *, gguf_path: str | os.PathLike[str] | None = None,
             plan: Plan | Mapping[str, str] | str | None = None, imatrix: Importance | None = None,
             ctx: int = DEFAULT_CTX, chunks: int | None = DEFAULT_CHUNKS,
             threads: int | None = None, progress: bool = True, cpu_activations: bool = False,
             **runtime: Any) -> EvalResult:
    """Evaluate one GGUF file or one plan against the float32 model (reference cached); runtime:
    the Evaluator's max_memory / device / dtype."""
    if (gguf_path is None) == (plan is None):
        raise MixquantError("give exactly one of a GGUF file or a plan to evaluate")
    with Evaluator(src, text, ctx=ctx, chunks=chunks, threads=threads, progress=progress,
                   cpu_activations=cpu_activations, **runtime) as ev:
        if gguf_path is not None:
            return ev.evaluate_gguf(gguf_path)
        return ev.evaluate_plan(plan, imatrix=imatrix)


def compare(src: ModelRef, items: Iterable[str], text: str | os.PathLike[str], *, imatrix: Importance | None = None,
            ctx: int = DEFAULT_CTX, chunks: int | None = DEFAULT_CHUNKS, threads: int | None = None,
            progress: bool = True, cpu_activations: bool = False, **runtime: Any) -> list[EvalResult]:
    """Evaluate each item (a GGUF path or a preset/type name) against the same cached reference;
    runtime: the Evaluator's max_memory / device / dtype."""
    items = list(items)
    with Evaluator(src, text, ctx=ctx, chunks=chunks, threads=threads, progress=progress,
                   cpu_activations=cpu_activations, **runtime) as ev:
        check_items(items, ev.source.model, imatrix)
        return [ev.evaluate_item(item, imatrix=imatrix) for item in items]


def format_table(results: list[EvalResult]) -> str:
    """A fixed-width table: label, size, bits per weight, PPL (and change), KLD mean/p99, top-1."""
    if not results:
        return "(nothing evaluated)"
    r0 = results[0]
    w = max(12, *(len(r.label) for r in results))
    head = (f"{'label':<{w}}  {'size MB':>9}  {'bpw':>6}  {'PPL':>9}  {'ΔPPL':>7}  {'mean KLD':>10}  "
            f"{'median KLD':>10}  {'p99 KLD':>9}  {'top-1':>7}  {'tok/s':>6}")
    acts = ("matmul inputs rounded as llama.cpp's CPU backend does" if r0.cpu_activations
            else "weight error only, float32 activations")
    lines = [
        f"reference (float32): PPL {r0.ppl_ref:.4f} over {r0.tokens} scored tokens "
        f"({r0.chunks} chunks of {r0.ctx}); {acts}",
        head,
        "-" * len(head),
    ]
    for r in results:
        lines.append(
            f"{r.label:<{w}}  {r.bytes / 1e6:9.2f}  {r.bits_per_weight:6.3f}  {r.ppl:9.4f}  "
            f"{100 * (r.ppl_ratio - 1):+6.2f}%  {r.kld_mean:10.6f}  {r.kld_median:10.6f}  {r.kld_p99:9.5f}  "
            f"{100 * r.top1:6.2f}%  {r.tokens_per_s:6.0f}"
        )
    return "\n".join(lines)


def plot_results(results: list[EvalResult], out: str | os.PathLike[str], title: str | None = None) -> Path:
    """A PNG of mean KLD (log scale) against bits per weight, one labelled point per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out).expanduser()
    if not out.parent.is_dir():
        raise MixquantError(f"{out.parent}: output folder does not exist")
    floor = 1e-7  # a float32 plan's KLD is ~1e-8 of rounding noise: drawn at the bottom of the log axis
    # identical numbers (a plan and the GGUF file written from it) share one point and one label
    groups: dict[tuple[float, float], list[EvalResult]] = {}
    for r in results:
        groups.setdefault((round(r.bits_per_weight, 4), float(f"{r.kld_mean:.6g}")), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [bpw for bpw, _ in groups] or [0.0]
    x_mid = (min(xs) + max(xs)) / 2
    for (bpw, kld), rs in groups.items():
        y = max(kld, floor)
        color = "tab:blue" if all(r.kind == "plan" for r in rs) else "tab:orange" if all(
            r.kind == "gguf" for r in rs) else "tab:green"
        ax.scatter([bpw], [y], c=color, zorder=3)
        label = ", ".join(r.label for r in rs) + (f" (KLD < {floor:g})" if kld < floor else "")
        right = len(groups) > 1 and bpw > x_mid  # labels of right-hand points extend leftwards
        ax.annotate(label, (bpw, y), textcoords="offset points", xytext=(-4 if right else 4, 4),
                    ha="right" if right else "left", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KL divergence vs float32 (nats/token)")
    if results:
        r0 = results[0]
        ax.set_title(title or f"KLD vs size ({r0.chunks} chunks of {r0.ctx}, reference PPL {r0.ppl_ref:.3f})",
                     fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
