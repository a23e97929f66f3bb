"""The analysis itself: which pairs to quantize and measure, the Fisher pass, the layer sweep,
and the fit (`analyze`)."""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Union

import numpy as np

from ..calibrate import weight_distribution
from ..errors import MixquantError
from ..plan import layer_of
from .measure import _Measurer, setup_measurer
from .sensitivity import (
    LayerResult,
    Sensitivity,
    TensorSensitivity,
    TypeCost,
    candidate_types,
    predicted_error,
)

if TYPE_CHECKING:
    import torch

    from ..calibrate import Imatrix
    from ..plan import ModelInfo, TensorInfo
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
    """
    import torch
    from tqdm import tqdm

    from .. import formats
    from ..plan import allows_quantization
    from ..source import Source, open_source

    started = time.perf_counter()
    if measure not in ("probe", "all", "none"):
        raise MixquantError(f"measure must be 'probe', 'all' or 'none', got {measure!r}")
    src = source if isinstance(source, Source) else open_source(source)
    info = src.model
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
    measurer = None
    settings: dict[str, Any] = {"measure": measure, "types": type_list, "threads": threads, "fisher": fisher,
                                "layer_sweep_types": sweep_types}
    try:
        # -- the reference pass ---------------------------------------------------------------
        if measure != "none" or fisher or sweep_types:
            measurer = setup_measurer(src, text, windows, n_windows, ctx, score_from, settings)
        settings["seconds_reference"] = round(time.perf_counter() - started, 2)

        # -- the work list --------------------------------------------------------------------
        plan: list[tuple[str, list[str], set[str]]] = []
        for name in selected:
            t = by_name[name]
            if name in src.adapter.derived or not allows_quantization(t, info.arch):
                plan.append((name, [], set()))
                continue
            cands = candidate_types(t.shape, type_list)
            if "F32" not in cands:
                cands = ["F32", *cands]
            if measure == "all":
                to_measure = {c for c in cands if c != "F32"}
            elif measure == "probe" and name in validate_set:  # float types: damage too small to matter
                to_measure = {c for c in cands if c not in ("F32", "F16", "BF16")}
            elif measure == "probe":
                avail = [p for p in probes if p in cands]
                if not avail:  # no probe fits: the cheapest quantized type that does
                    quant = sorted((c for c in cands if c not in ("F32", "F16", "BF16")),
                                   key=lambda c: formats.get(c).bits_per_weight)
                    avail = quant[:1]
                to_measure = set(avail)
            else:
                to_measure = set()
            if measurer is not None and name not in measurer.params:
                to_measure = set()  # not a model parameter (derived): nothing to swap
            plan.append((name, cands, to_measure))

        # -- the Fisher diagonal --------------------------------------------------------------
        tf = time.perf_counter()
        fisher_diag = None
        if fisher:
            # whole parameters only: a view into a fused one (MoE experts' gate/up) has no gradient of
            # its own; those pairs get no Fisher estimate
            fisher_diag = measurer.runner.fisher({n: measurer.params[n] for n, c, _ in plan
                                                  if c and isinstance(measurer.params.get(n), torch.nn.Parameter)},
                                                 progress)
        settings["seconds_fisher"] = round(time.perf_counter() - tf, 2)

        n_quant = sum(len(c) for _, c, _ in plan)
        n_meas = sum(len(m) for _, _, m in plan)
        settings.update(candidates=n_quant, measured_pairs=n_meas)
        bar = tqdm(total=n_quant + 4 * n_meas, desc="sensitivity", unit="step", disable=not progress,
                   file=sys.stderr, smoothing=0.05)
        out: dict[str, TensorSensitivity] = {}
        seconds_quant = seconds_measure = 0.0
        try:
            for name, cands, to_measure in plan:
                t = by_name[name]
                f = None if fisher_diag is None else fisher_diag.pop(name, None)
                unchanged = None if fisher_diag is None else 0.0  # the Fisher estimate of a weight kept as is
                if not cands:
                    kept = TypeCost(bytes=_bytes(t.dtype, t.shape), predicted=0.0, measured=0.0, fisher=unchanged)
                    out[name] = TensorSensitivity(name=name, shape=t.shape, fixed=True, types={t.dtype: kept})
                    continue
                bar.set_postfix_str(name, refresh=False)
                rows, cols = math.prod(t.shape[:-1]), t.shape[-1]
                w = np.ascontiguousarray(src.tensor(name), dtype=np.float32).reshape(rows, cols)
                imp = _importance(imatrix, name)
                costs: dict[str, TypeCost] = {}
                for typ in cands:
                    tq = time.perf_counter()
                    nbytes = formats.quantized_size(typ, (rows, cols))
                    if typ == "F32":
                        costs[typ] = TypeCost(bytes=nbytes, predicted=0.0, measured=0.0, fisher=unchanged)
                        bar.update(1)
                        continue
                    q = _roundtrip(w, typ, imp, qthreads)
                    cost = TypeCost(bytes=nbytes, predicted=predicted_error(w, q, imp))
                    if f is not None:
                        d = measurer.delta_to_hf(name, w - q)  # a row permutation: exact on the difference
                        rows_sum = np.einsum("ij,ij->i", f.reshape(d.shape), d * d)  # float64 across rows
                        cost.fisher = 0.5 * float(rows_sum.sum(dtype=np.float64))
                    seconds_quant += time.perf_counter() - tq
                    bar.update(1)
                    if typ in to_measure:
                        tm = time.perf_counter()
                        cost.measured = measurer.measure({name: q.reshape(t.shape)})[0]
                        seconds_measure += time.perf_counter() - tm
                        bar.update(4)
                    costs[typ] = cost
                    del q
                out[name] = TensorSensitivity(name=name, shape=t.shape, types=costs, weights=weight_distribution(w))
        finally:
            bar.close()
        del fisher_diag

        # -- the layer sweep ------------------------------------------------------------------
        ts = time.perf_counter()
        sweep = _layer_sweep(src, info, measurer, imatrix, sweep_types, qthreads, progress) if sweep_types else []
        settings["seconds_layer_sweep"] = round(time.perf_counter() - ts, 2)
        reference = None if measurer is None else {"nll": measurer.runner.ref_nll,
                                                    "ppl": math.exp(measurer.runner.ref_nll)}
    finally:
        torch.set_num_threads(saved_threads)
        if measurer is not None:
            del measurer
    settings.update(
        validate=sorted(validate_set) if measure == "probe" else [],
        probe_types=probes if measure == "probe" else [],
        imatrix=_imatrix_note(imatrix),
        seconds_quantize=round(seconds_quant, 2),
        seconds_measure=round(seconds_measure, 2),
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
    sens.fit()
    if measure != "none":
        settings["fit"] = sens.fit_report()
    return sens


def _roundtrip(w: np.ndarray, type_name: str, importance: np.ndarray | None, threads: int) -> np.ndarray:
    """dequantize(quantize(w)): the values a GGUF would hold."""
    from .. import formats

    return formats.dequantize(formats.quantize(w, type_name, importance=importance, threads=threads),
                              type_name, w.shape)


def _layer_sweep(src: Source, info: ModelInfo, measurer: _Measurer, imatrix: Importance | None, types: list[str],
                 qthreads: int, progress: bool) -> list[LayerResult]:
    """Each block's quantizable tensors at each type (shape fallbacks as llama.cpp), all else float32."""
    from tqdm import tqdm

    from ..plan import allows_quantization, fallback_type

    blocks: dict[int, list[TensorInfo]] = {}
    for t in info.tensors:
        il = layer_of(t.name)
        if il is not None and t.name in measurer.params and allows_quantization(t, info.arch):
            blocks.setdefault(il, []).append(t)
    out = []
    with tqdm(total=len(blocks) * len(types), desc="layer sweep", unit="rerun", disable=not progress,
              file=sys.stderr) as bar:
        for il in sorted(blocks):
            ws = {t.name: np.ascontiguousarray(src.tensor(t.name), dtype=np.float32).reshape(-1, t.shape[-1])
                  for t in blocks[il]}
            for typ in types:
                try:
                    used = {t.name: fallback_type(typ, t.shape[-1]) for t in blocks[il]}
                except ValueError as exc:
                    raise MixquantError(f"layer sweep: {exc}") from None
                swaps = {t.name: _roundtrip(ws[t.name], used[t.name], _importance(imatrix, t.name), qthreads)
                         .reshape(t.shape) for t in blocks[il]}
                kld, nll = measurer.measure(swaps)
                out.append(LayerResult(layer=il, type=typ, kld=kld, ppl=math.exp(nll),
                                       delta_ppl=math.expm1(nll - measurer.runner.ref_nll), types_used=used))
                bar.update(1)
    return out


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



