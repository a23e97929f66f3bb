"""The analysis itself: which pairs to quantize and measure, the Fisher pass, the layer sweep,
and the fit (`analyze`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Union

import numpy as np

from ..calibrate import Distribution, weight_distribution, weight_distribution_rows
from ..errors import MixquantError
from ..plan import layer_of
from ..quantize.gptq import GptqOptions
from ..runtime import RowSlices, StreamedModel
from ..runtime.model import SLICED_BYTES, slice_rows
from .measure import Measurer, Reference, Swap, measurement_windows, reference_pass, unit_of
from .sensitivity import (
    LayerResult,
    Sensitivity,
    TensorSensitivity,
    ErrorSums,
    TypeCost,
    candidate_types,
    predicted_error,
)

if TYPE_CHECKING:
    import torch

    from ..calibrate import Imatrix
    from ..hessians import Hessians
    from ..plan import ModelInfo, TensorInfo
    from ..runtime.executor import WorkItem
    from ..source import Source

    Importance = Union[Imatrix, Mapping[str, np.ndarray]]  # an imatrix or {GGUF name: vector}

# held-out windows x tokens: 2 x 256 tokens (446 scored) keep a full analysis of the 135M test
# model near 10 minutes on one CPU core
DEFAULT_WINDOWS = 2
DEFAULT_CTX = 256
DEFAULT_PROBES = ("Q4_0", "Q5_1")
# the layer sweep's classic pair: a legacy 4-bit type and the coarsest k-quant (Q4_0 where 256 does
# not divide the row, as in llama.cpp)
DEFAULT_SWEEP_TYPES = ("Q4_0", "Q2_K")

# --------------------------------------------------------------------------------------------
# the analysis


def _importance(imatrix: Importance | None, name: str) -> np.ndarray | None:
    if imatrix is None:
        return None
    if hasattr(imatrix, "importance"):
        return imatrix.importance(name)
    v = imatrix.get(name)
    return None if v is None else np.asarray(v, dtype=np.float32)


def _auto_validate(info: ModelInfo) -> list[str]:
    """The token embedding and output projection, and every tensor of blocks n/2 and n-1."""
    names = [t.name for t in info.tensors]
    out = [n for n in ("token_embd.weight", "output.weight") if n in names]
    layers = sorted({info.n_layer // 2, info.n_layer - 1})
    out += [n for n in names if layer_of(n) in layers]
    return out


def analyze(
    source: Source | str | os.PathLike[str],
    imatrix: Importance | None = None,
    *,
    text: str | os.PathLike[str] | None = None,
    windows: torch.Tensor | np.ndarray | None = None,
    n_windows: int = DEFAULT_WINDOWS,
    ctx: int = DEFAULT_CTX,
    score_from: int | None = None,
    types: Iterable[str] | None = None,
    measure: str = "probe",
    probe_types: Iterable[str] = DEFAULT_PROBES,
    validate: Iterable[str] | str = "auto",
    tensors: Iterable[str] | None = None,
    fisher: bool = False,
    layer_sweep_types: Iterable[str] = (),
    threads: int | None = None,
    progress: bool = True,
    max_memory: int | str | None = None,
    device: str | None = "cpu",
    dtype: str | None = "float32",
    ray: str | None = None,
    state_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    method: str = "rtn",
    hessians: Hessians | str | os.PathLike[str] | None = None,
    gptq_options: GptqOptions | Mapping[str, Any] | None = None,
) -> Sensitivity:
    """Sensitivity of every tensor of `source` (a Hugging Face folder, or a `Source`) to every type.

    imatrix: an `Imatrix` (or {name: vector}); its importance vectors go to the quantizer and weight
        the predicted error. None: quantize without, weight uniformly.
    text: the calibration text file; the measurement uses its last `n_windows` windows of `ctx`
        tokens (or pass `windows`, a (n, ctx) LongTensor of token ids). Needed unless measure="none".
    score_from: the first scored position of each window (default ctx // 8): positions
        score_from .. ctx-2 predict the next token.
    types: the candidate types (default every mixquant format); each tensor gets those its row
        length allows. F32 is always a candidate (damage 0).
    measure: "probe" (default: `probe_types` for every tensor, every type for `validate`), "all"
        (every pair; slow) or "none" (predicted error only).
    validate: tensor names measured at every quantized type under "probe" (they fit the type
        factors); "auto" (token_embd/output and every tensor of blocks n/2 and n-1) or an iterable
        (empty: none).
    tensors: analyse only these (default: all); the others are left out of the result.
    fisher: also compute the Fisher estimate of every analysed pair (`TypeCost.fisher`; one
        forward and backward pass per window, and the Fisher diagonal, 4 bytes per weight, held
        while the pairs are quantized).
    layer_sweep_types: for each block and each of these types, quantize all of the block's
        quantizable tensors (llama.cpp's shape fallback where the type's block does not fit a row)
        and measure KLD and perplexity (`Sensitivity.layer_sweep`); e.g. `DEFAULT_SWEEP_TYPES`.
        Covers every block, whatever `tensors` selects. Empty (default): skipped.
    threads: torch threads and quantization threads (default: torch's own setting). On a busy
        machine one thread can be much faster than oversubscribed ones.
    progress: tqdm bars on stderr for the long stages.
    max_memory, device, dtype: the runtime's budget (bytes or "2GB"; default what is free), device
        and forward precision (`mixquant.runtime.StreamedModel`): beyond the budget the model runs one
        block at a time.
    ray: run the measurement's work items (one per block: its candidates quantized, predicted and
        measured together) as Ray tasks on this cluster ("local", "auto" or HOST:PORT); None: here.
    state_dir: each finished work item is written there; with `resume`, items already there (from
        an interrupted run with the same settings) are not redone. None: nothing kept.
    method: the rounding every candidate is quantized with, as `mixquant quantize --method` would
        write it: "rtn" (ggml's round-to-nearest, the default) or "gptq" (error feedback through
        `hessians`, `quantize.gptq`), so the damages are those of the bytes that method writes.
        With "gptq" the predicted error is H-weighted (`predicted_error`'s `hessian`), and
        `settings["method"]` records it (`quantize --target-*` refuses a sensitivity of another method).
    hessians: the inputs' Hessians for "gptq" (a `Hessians`, or a hessians.safetensors file).
    gptq_options: GPTQ's options for "gptq" (a `GptqOptions`, or {"damp": 0.1, ...} by its field
        names; default GPTQ's defaults), as `quantize --method gptq --gptq-*` takes them; every one
        is recorded in `settings` (damp, act_order, refit, resweeps) and in --resume's fingerprint.
    """
    import torch

    from .. import formats
    from ..plan import allows_quantization
    from ..source import Source, open_source

    started = time.perf_counter()
    if measure not in ("probe", "all", "none"):
        raise MixquantError(f"measure must be 'probe', 'all' or 'none', got {measure!r}")
    src = source if isinstance(source, Source) else open_source(source)
    info = src.model
    hess = _method_hessians(method, hessians, info, ray)
    if gptq_options is not None and method != "gptq":
        raise MixquantError("GPTQ's options go with method 'gptq'")
    options = None if hess is None else gptq_options if isinstance(gptq_options, GptqOptions) \
        else GptqOptions(**(gptq_options or {}))
    by_name = {t.name: t for t in info.tensors}
    if tensors is None:
        selected = [t.name for t in info.tensors]
    else:
        selected = list(dict.fromkeys(tensors))
        unknown = [n for n in selected if n not in by_name]
        if unknown:
            raise MixquantError(f"the model has no tensor {unknown[0]!r}")
    type_list = None if types is None else [formats.get(t).name for t in types]
    probes = [formats.get(t).name for t in probe_types]
    sweep_types = [formats.get(t).name for t in layer_sweep_types]
    if measure == "probe" and not probes:
        raise MixquantError("measure='probe' needs at least one probe type")
    if validate == "auto":
        validate_set = set(_auto_validate(info)) if measure == "probe" else set()
    else:
        validate_set = set(validate)
        unknown = [n for n in validate_set if n not in by_name]
        if unknown:
            raise MixquantError(f"validate: the model has no tensor {unknown[0]!r}")

    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    qthreads = max(1, int(threads or torch.get_num_threads()))
    settings: dict[str, Any] = {"measure": measure, "types": type_list, "threads": threads, "fisher": fisher,
                                "layer_sweep_types": sweep_types, "dtype": str(dtype or "float32"), "method": method}
    if hess is not None:
        settings.update(asdict(options), hessians=None if hess.path is None else str(hess.path))
    reference = None
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, saved_threads)
        # -- the reference pass ---------------------------------------------------------------
        measurer = None
        if measure != "none" or fisher or sweep_types:
            windows_np, first = measurement_windows(src, text, windows, n_windows, ctx, score_from, settings)
            model = StreamedModel(src, device=device, dtype=dtype, max_memory=max_memory)
            settings["resident"] = model.resident
            measurer = Measurer(model, reference_pass(model, windows_np, first, progress))
            reference = {"nll": measurer.ref.nll, "ppl": math.exp(measurer.ref.nll)}
        settings["seconds_reference"] = round(time.perf_counter() - started, 2)

        # -- the work list --------------------------------------------------------------------
        plan: list[tuple[str, list[str], list[str]]] = []
        for name in selected:
            t = by_name[name]
            if name in src.adapter.derived or not allows_quantization(t, info.arch):
                plan.append((name, [], []))
                continue
            cands = candidate_types(t.shape, type_list)
            if "F32" not in cands:
                cands = ["F32", *cands]
            if measure == "all":
                to_measure = [c for c in cands if c != "F32"]
            elif measure == "probe" and name in validate_set:  # float types: damage too small to matter
                to_measure = [c for c in cands if c not in ("F32", "F16", "BF16")]
            elif measure == "probe":
                avail = [p for p in probes if p in cands]
                if not avail:  # no probe fits: the cheapest quantized type that does
                    quant = sorted((c for c in cands if c not in ("F32", "F16", "BF16")),
                                   key=lambda c: formats.get(c).bits_per_weight)
                    avail = quant[:1]
                to_measure = avail
            else:
                to_measure = []
            plan.append((name, cands, to_measure))

        settings.update(candidates=sum(len(c) for _, c, _ in plan), measured_pairs=sum(len(m) for _, _, m in plan))
        importance = {n: v for n, c, _ in plan if c and (v := _importance(imatrix, n)) is not None}
        results_dir = None
        if state_dir is not None:
            results_dir = _state(Path(state_dir), _fingerprint(src, settings, plan, sweep_types, importance,
                                                               None if measurer is None else measurer.ref, hess),
                                 resume)
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="mixquant-fisher-"))

        # -- the Fisher diagonal, one file per unit -------------------------------------------
        tf = time.perf_counter()
        fisher_files = measurer.fisher({n for n, c, _ in plan if c}, results_dir or Path(scratch), progress) \
            if fisher else None
        settings["seconds_fisher"] = round(time.perf_counter() - tf, 2)

        # -- quantize, predict and measure, one work item per unit ------------------------------
        n_layer = measurer.n_layer if measurer is not None else info.n_layer
        items = _work_items(plan, sweep_types, info, n_layer, fisher_files, measurer is not None)
        context = _Context(source=str(src.path), threads=qthreads, importance=importance,
                           runtime={"max_memory": max_memory, "device": device, "dtype": dtype},
                           reference=None if measurer is None else measurer.ref,
                           token=_register(src, measurer, hess), method=method,
                           hessians=None if hess is None or hess.path is None else str(hess.path), gptq=options)
        tm = time.perf_counter()
        try:
            from ..runtime.executor import execute

            results = execute(items, _run_item, context, results_dir, ray_address=ray, progress=progress,
                              desc="sensitivity")
        finally:
            _PROCESS.pop(context.token, None)
            _HESSIANS.pop(context.token, None)
        settings["seconds_measure"] = round(time.perf_counter() - tm, 2)
        settings["seconds_quantize"] = round(sum(r["seconds_quantize"] for r in results.values()), 2)

        out: dict[str, TensorSensitivity] = {}
        found: dict[str, dict[str, Any]] = {}
        for r in results.values():
            found.update(r["tensors"])
        for name, cands, _ in plan:
            t = by_name[name]
            if not cands:
                kept = TypeCost(bytes=_bytes(t.dtype, t.shape), predicted=0.0, measured=0.0,
                                fisher=0.0 if fisher else None)
                out[name] = TensorSensitivity(name=name, shape=t.shape, fixed=True, types={t.dtype: kept})
                continue
            r = found[name]
            out[name] = TensorSensitivity(name=name, shape=t.shape, weights=Distribution.from_dict(r["weights"]),
                                          types={typ: TypeCost(**c) for typ, c in r["types"].items()})
        sweep = sorted((LayerResult(**x) for r in results.values() for x in r["sweep"]),
                       key=lambda x: (x.layer, sweep_types.index(x.type)))
        if reference is not None:
            for x in sweep:
                x.delta_ppl = x.ppl / reference["ppl"] - 1
    settings.update(
        validate=sorted(validate_set) if measure == "probe" else [],
        probe_types=probes if measure == "probe" else [],
        imatrix=_imatrix_note(imatrix),
        seconds=round(time.perf_counter() - started, 2),
        torch=torch.__version__,
    )
    sens = Sensitivity(
        tensors=out,
        model={"arch": info.arch, "n_layer": info.n_layer, "n_elements": sum(t.n_elements for t in info.tensors),
               "n_tensors": len(info.tensors), "tied_output": bool(info.tied_output), "source": str(src.path)},
        settings=settings,
        reference=reference,
        layer_sweep=sweep,
    )
    if results_dir is not None:
        shutil.rmtree(results_dir, ignore_errors=True)  # done: the sensitivity holds it all
    sens.fit()
    if measure != "none":
        settings["fit"] = sens.fit_report()
    return sens


# --------------------------------------------------------------------------------------------
# work items: one per unit (token embedding, each block, head), each quantizing its tensors to
# every candidate type, predicting, and measuring its measured pairs and layer sweep together


@dataclass
class _Context:
    """What every work item shares (sent once to other processes): picklable."""

    source: str
    threads: int
    importance: dict[str, np.ndarray]
    runtime: dict[str, Any]
    reference: Reference | None
    token: str  # the measurer already built in this process, if any
    method: str = "rtn"
    hessians: str | None = None  # the Hessians file, for another process (method "gptq")
    gptq: GptqOptions | None = None  # method "gptq"'s options


_PROCESS: dict[str, Measurer | None] = {}  # token -> this process's measurer (built on first use)
_SOURCES: dict[str, Source] = {}
_HESSIANS: dict[str, Hessians] = {}


def _register(src: Source, measurer: Measurer | None, hessians: Hessians | None) -> str:
    token = uuid.uuid4().hex
    _PROCESS[token] = measurer
    _SOURCES[token] = src
    if hessians is not None:
        _HESSIANS[token] = hessians
    return token


def _method_hessians(method: str, hessians: Hessians | str | os.PathLike[str] | None, info: ModelInfo,
                     ray: str | None) -> Hessians | None:
    """The Hessians `method` rounds with (None for rtn), checked against the model before any work."""
    from ..hessians import Hessians
    from ..quantize import METHODS, HessianQuantizer

    if method not in METHODS:
        raise MixquantError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "rtn":
        if hessians is not None:
            raise MixquantError("Hessians go with method 'gptq'")
        return None
    if hessians is None:
        raise MixquantError("method 'gptq' needs the inputs' Hessians (hessians.safetensors)")
    hess = hessians if isinstance(hessians, Hessians) else Hessians.load(hessians)
    HessianQuantizer(hess, info)  # refuses Hessians of another model or shape
    if ray is not None and hess.path is None:
        raise MixquantError("method 'gptq' on Ray needs the Hessians in a file (other processes read them)")
    return hess


class _Rounding:
    """dequantize(quantize(w)) of one work item's tensors with the analysis's method: rtn, or
    `quantize --method gptq`'s own quantizer with every input's factor of H^-1 kept for the item's
    lifetime (shared by every type and by the tensors reading that input: q/k/v, gate/up)."""

    def __init__(self, ctx: _Context, info: ModelInfo):
        from ..hessians import Hessians
        from ..quantize import HessianQuantizer

        self.threads = ctx.threads
        self.gptq: HessianQuantizer | None = None
        if ctx.method == "gptq":
            if ctx.token not in _HESSIANS:
                _HESSIANS[ctx.token] = Hessians.load(ctx.hessians)
            self.gptq = HessianQuantizer(_HESSIANS[ctx.token], info, **asdict(ctx.gptq), threads=ctx.threads,
                                         keep_factors=True)

    def hessian(self, name: str) -> np.ndarray | None:
        """H of the tensor's input where it is rounded with GPTQ (its predicted error is H-weighted)."""
        return None if self.gptq is None else self.gptq.hessian(name)

    def __call__(self, name: str, w: np.ndarray, type_name: str, importance: np.ndarray | None) -> np.ndarray:
        from .. import formats

        data = formats.quantize(w, type_name, importance=importance, threads=self.threads) if self.gptq is None \
            else self.gptq(name, w, type_name, importance)
        return formats.dequantize(data, type_name, w.shape)


def _context_measurer(ctx: _Context) -> tuple[Source, Measurer | None]:
    """The source and measurer of this process (another process opens its own from the files)."""
    from ..source import open_source

    if ctx.token not in _SOURCES:
        _SOURCES[ctx.token] = open_source(ctx.source)
        _PROCESS[ctx.token] = None if ctx.reference is None else \
            Measurer(StreamedModel(_SOURCES[ctx.token], **ctx.runtime), ctx.reference)
    return _SOURCES[ctx.token], _PROCESS[ctx.token]


def _work_items(plan: list[tuple[str, list[str], list[str]]], sweep_types: list[str], info: ModelInfo,
                n_layer: int, fisher_files: dict[str, str] | None, measuring: bool) -> list[WorkItem]:
    from ..runtime.executor import WorkItem

    units: dict[int, dict[str, Any]] = {}
    for name, cands, to_measure in plan:
        if not cands:
            continue
        u = unit_of(name, n_layer)
        entry = units.setdefault(u, {"unit": u, "tensors": [], "sweep": []})
        entry["tensors"].append({"name": name, "types": cands, "measure": to_measure if measuring else [],
                                 "fisher": None if fisher_files is None else fisher_files.get(name)})
    if sweep_types:
        for il in range(n_layer):
            units.setdefault(il, {"unit": il, "tensors": [], "sweep": []})["sweep"] = list(sweep_types)
    items = []
    for u, payload in sorted(units.items()):
        measured = sum(len(t["measure"]) for t in payload["tensors"]) + len(payload["sweep"])
        blocks_after = n_layer - max(u, 0) + 4  # the head costs about as much as a few blocks
        key = "embed" if u < 0 else "head" if u >= n_layer else f"blk.{u}"
        items.append(WorkItem(key=key, cost=float(measured * blocks_after + len(payload["tensors"])), payload=payload))
    return items


def _run_item(payload: dict[str, Any], ctx: _Context) -> dict[str, Any]:
    """One unit's tensors: every candidate quantized (predicted error, Fisher estimate), the
    measured ones and the layer sweep's whole-block variants carried through the rest of the model
    together, quantized a chunk at a time as the measurement asks for them. JSON-ready."""
    import torch

    from .. import formats
    from ..plan import allows_quantization, fallback_type

    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    src, measurer = _context_measurer(ctx)
    info = src.model
    by_name = {t.name: t for t in info.tensors}
    rounding = _Rounding(ctx, info)
    seconds = {"quantize": 0.0}
    tensors: dict[str, dict[str, Any]] = {}
    weights: dict[str, np.ndarray] = {}  # float32 (rows, cols) of the tensors quantized later
    fishers: dict[str, np.ndarray | None] = {}

    sliced: dict[str, dict[str, _Sliced]] = {}  # large 2-D tensors: type -> its slices, never held whole

    def quantized(name: str, typ: str) -> np.ndarray | RowSlices:
        """The tensor's values at `typ`; its predicted error and Fisher estimate recorded (for a
        sliced tensor, once the first pass over its slices is done)."""
        if name in sliced:
            cand = sliced[name][typ] = _Sliced(src, name, by_name[name].shape, typ, ctx, rounding, fishers[name],
                                               tensors[name]["types"][typ], seconds)
            return cand.values()
        w, f, imp = weights[name], fishers[name], ctx.importance.get(name)
        tq = time.perf_counter()
        q = rounding(name, w, typ, imp)
        cost = tensors[name]["types"][typ]
        cost["predicted"] = predicted_error(w, q, imp, hessian=rounding.hessian(name))
        if f is not None:
            d = src.adapter.delta_to_hf(name, w - q, info)  # a row permutation: exact on the difference
            cost["fisher"] = 0.5 * float(_fisher_rows(f.reshape(d.shape), d).sum(dtype=np.float64))
        seconds["quantize"] += time.perf_counter() - tq
        return q

    swaps: list[Callable[[], Swap]] = []
    owners: list[tuple[str, str]] = []  # (tensor, type) or ("sweep", type) of each swap
    swap_bytes = 0
    for entry in payload["tensors"]:
        name = entry["name"]
        t = by_name[name]
        rows, cols = math.prod(t.shape[:-1]), t.shape[-1]
        if len(t.shape) == 2 and 4 * rows * cols > SLICED_BYTES and not src.adapter.converts(name, info):
            sliced[name] = {}
            fishers[name] = entry["fisher"]  # the path of its file, read a slice at a time
            step = _Sliced.rows_per_slice(cols)
            dist = weight_distribution_rows(lambda start, stop, name=name: src.tensor_rows(name, start, stop),
                                            rows, step)
            held = 4 * step * cols
        else:
            weights[name] = w = np.ascontiguousarray(src.tensor(name), dtype=np.float32).reshape(rows, cols)
            fishers[name] = None if entry["fisher"] is None else _read_fisher(entry["fisher"], name)
            dist = weight_distribution(w)
            held = w.nbytes
        costs = {typ: {"bytes": formats.quantized_size(typ, (rows, cols)), "predicted": 0.0,
                       "measured": 0.0 if typ == "F32" else None,
                       "fisher": None if fishers[name] is None or typ != "F32" else 0.0} for typ in entry["types"]}
        tensors[name] = {"types": costs, "weights": asdict(dist)}
        for typ in entry["types"]:
            if typ == "F32":
                continue
            if typ in entry["measure"]:
                swaps.append(lambda name=name, typ=typ, shape=t.shape: {name: _shaped(quantized(name, typ), shape)})
                owners.append((name, typ))
                swap_bytes = max(swap_bytes, held)
            elif name in sliced:
                quantized(name, typ)
                sliced[name][typ].finish()
            else:
                quantized(name, typ)

    block = [t for t in info.tensors if layer_of(t.name) == payload["unit"] and t.name not in src.adapter.derived
             and allows_quantization(t, info.arch)] if payload["sweep"] else []
    sweep_used: list[dict[str, str]] = []
    for typ in payload["sweep"]:
        try:
            used = {t.name: fallback_type(typ, t.shape[-1]) for t in block}
        except ValueError as exc:
            raise MixquantError(f"layer sweep: {exc}") from None
        sweep_used.append(used)
        swaps.append(lambda used=used: _sweep_swap(src, block, used, weights, ctx, rounding, seconds))
        owners.append(("sweep", typ))
        swap_bytes = max(swap_bytes, sum(4 * t.n_elements for t in block))

    measured = measurer.measure(payload["unit"], swaps, swap_bytes) if swaps else []
    for by_type in sliced.values():
        for cand in by_type.values():
            cand.finish()  # a no-op after a swap's pass over all rows
    sweep = []
    for (name, typ), (kld, nll) in zip(owners, measured):
        if name == "sweep":
            sweep.append({"layer": payload["unit"], "type": typ, "kld": kld, "ppl": math.exp(nll), "delta_ppl": 0.0,
                          "types_used": sweep_used[len(sweep)]})
        else:
            tensors[name]["types"][typ]["measured"] = kld
    return {"tensors": tensors, "sweep": sweep, "seconds_quantize": seconds["quantize"]}


def _read_fisher(path: str, name: str, rows: slice | None = None) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        return f.get_tensor(name) if rows is None else f.get_slice(name)[rows]


def _fisher_rows(f: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Per row, sum_j f_ij d_ij^2 (Fisher diagonal f, weight change d, same layout), float32."""
    step = max(1, (1 << 21) // d.shape[-1])  # row slices: no second tensor-sized temporary
    return np.concatenate([np.einsum("ij,ij->i", f[r:r + step], d[r:r + step] * d[r:r + step])
                           for r in range(0, d.shape[0], step)])


def _shaped(values: np.ndarray | RowSlices, shape: tuple[int, ...]) -> np.ndarray | RowSlices:
    return values if isinstance(values, RowSlices) else values.reshape(shape)


class _Sliced:
    """A large 2-D tensor (a big vocabulary's embedding or output) at one candidate type, made a
    slice of rows at a time: each slice read from the source and quantized when asked for. The
    first pass over all rows, in order, also sums the predicted error and the Fisher estimate into
    `cost`, equal bit for bit to the whole tensor's (slices are whole multiples of ErrorSums'
    step, and the Fisher estimate is summed over all rows at the end)."""

    @staticmethod
    def rows_per_slice(cols: int) -> int:
        return slice_rows(cols, ErrorSums(cols).step)

    def __init__(self, src: Source, name: str, shape: tuple[int, ...], typ: str, ctx: _Context,
                 rounding: _Rounding, fisher_file: str | None, cost: dict[str, Any], seconds: dict[str, float]):
        self.src, self.name, self.typ, self.cost, self.seconds = src, name, typ, cost, seconds
        self.importance, self.rounding, self.fisher_file = ctx.importance.get(name), rounding, fisher_file
        rows, cols = shape
        self.shape, self.step = (rows, cols), self.rows_per_slice(cols)
        self._errors = ErrorSums(cols, hessian=rounding.hessian(name))
        self._fisher: list[np.ndarray] = []
        self._next = 0  # rows summed so far

    def rows(self, start: int, stop: int) -> np.ndarray:
        tq = time.perf_counter()
        w = self.src.tensor_rows(self.name, start, stop)
        q = self.rounding(self.name, w, self.typ, self.importance)  # rows are rounded independently
        if start == self._next < self.shape[0]:
            self._errors.add(w, q)
            if self.fisher_file is not None:
                self._fisher.append(_fisher_rows(_read_fisher(self.fisher_file, self.name, slice(start, stop)), w - q))
            self._next = stop
            if stop == self.shape[0]:
                self.cost["predicted"] = self._errors.value(self.importance)
                if self.fisher_file is not None:
                    self.cost["fisher"] = 0.5 * float(np.concatenate(self._fisher).sum(dtype=np.float64))
                    self._fisher = []
        self.seconds["quantize"] += time.perf_counter() - tq
        return q

    def values(self) -> RowSlices:
        return RowSlices(shape=self.shape, step=self.step, rows=self.rows)

    def finish(self) -> None:
        """Sum whatever rows no pass has yet (all of them for a candidate not swapped in)."""
        for start in range(self._next, self.shape[0], self.step):
            self.rows(start, min(start + self.step, self.shape[0]))


def _sweep_swap(src: Source, block: list[TensorInfo], used: dict[str, str], known: dict[str, np.ndarray],
                ctx: _Context, rounding: _Rounding, seconds: dict[str, float]) -> Swap:
    """One layer-sweep variant: every quantizable tensor of the block at its type of `used`
    (llama.cpp's shape fallback of the swept type), all else float32."""
    tq = time.perf_counter()
    swap = {}
    for t in block:
        w = known.get(t.name)
        if w is None:
            w = np.ascontiguousarray(src.tensor(t.name), dtype=np.float32).reshape(-1, t.shape[-1])
        swap[t.name] = rounding(t.name, w, used[t.name], ctx.importance.get(t.name)).reshape(t.shape)
    seconds["quantize"] += time.perf_counter() - tq
    return swap


# --------------------------------------------------------------------------------------------
# resuming


def _fingerprint(src: Source, settings: dict[str, Any], plan: list, sweep_types: list[str],
                 importance: dict[str, np.ndarray], ref: Reference | None, hessians: Hessians | None) -> str:
    """A digest of everything a work item's result depends on."""
    h = hashlib.sha256()
    for f in src.input_files:
        st = Path(f).stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    keep = {k: settings.get(k) for k in ("measure", "types", "fisher", "dtype", "windows", "ctx", "score_from",
                                         "method", *(f.name for f in fields(GptqOptions)))}
    h.update(json.dumps([keep, plan, sweep_types], sort_keys=True, default=str).encode())
    for name in sorted(importance):
        h.update(name.encode())
        h.update(np.ascontiguousarray(importance[name]).tobytes())
    if ref is not None:
        h.update(ref.windows.tobytes())
    if hessians is not None:  # every matrix, one at a time (the row counts alone could repeat)
        for key in sorted(hessians.rows):
            h.update(f"{key}:{hessians.rows[key]}\n".encode())
            h.update(np.ascontiguousarray(hessians.matrix(key)).tobytes())
    return h.hexdigest()


def _state(folder: Path, fingerprint: str, resume: bool) -> Path:
    """The folder finished work items go to: kept from an earlier run with `resume` (same
    fingerprint), else started afresh."""
    from ..files import write_text

    stamp = folder / "fingerprint"
    if folder.exists():
        if resume and stamp.is_file() and stamp.read_text().strip() == fingerprint:
            done = len(list(folder.glob("*.json")))
            print(f"resuming: {done} finished work items in {folder}", file=sys.stderr)
            return folder
        if resume:
            raise MixquantError(f"{folder}: the saved state is from a run with other settings, model or text; "
                                "rerun without --resume to start again")
        shutil.rmtree(folder)
    elif resume:
        print(f"--resume: nothing saved in {folder}; starting from the beginning", file=sys.stderr)
    folder.mkdir(parents=True)
    write_text(stamp, fingerprint + "\n")
    return folder


def _bytes(type_name: str, shape: tuple[int, ...]) -> int:
    from ..plan import tensor_bytes

    return tensor_bytes(type_name, shape)


def _imatrix_note(imatrix: Importance | None) -> dict[str, Any] | None:
    if imatrix is None:
        return None
    if hasattr(imatrix, "chunks"):
        return {"chunks": getattr(imatrix, "chunks", None), "chunk_size": getattr(imatrix, "chunk_size", None),
                "datasets": list(getattr(imatrix, "datasets", []) or []), "tensors": len(getattr(imatrix, "sums", {}))}
    return {"tensors": len(imatrix)}



