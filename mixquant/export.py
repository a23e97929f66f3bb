"""Write a GGUF file from a source and a plan, one tensor at a time.

    result = write_gguf(open_source(folder), preset_plan(model, "Q4_K_M"), "out.gguf")

The header, metadata and every tensor's info go first (gguf's GGUFWriter), then each tensor is
read, quantized to its planned type and appended; only one tensor and its quantized bytes are in
memory at a time. The file is written through mixquant.files.atomic_output: under a temporary name
in the destination folder, moved into place only once complete, never over an input.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
from gguf.gguf_writer import GGUFValue
from tqdm import tqdm

from . import formats
from .errors import MixquantError
from .files import atomic_output, check_output
from .source import Source

__all__ = ["ExportResult", "write_gguf", "gguf_file_size", "file_type_for"]


@dataclass
class ExportResult:
    """What was written: the file, its size, and the types its tensors got."""

    path: Path
    bytes: int
    n_tensors: int
    n_elements: int
    tensor_bytes: int  # tensor data only (no header, metadata or padding)
    file_type: int
    seconds: float
    type_counts: dict[str, int] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits per weight, as llama-quantize reports it."""
        return 8.0 * self.tensor_bytes / self.n_elements if self.n_elements else 0.0

    def __str__(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.type_counts.items(), key=lambda kv: -kv[1]))
        return (
            f"{self.path}: {self.bytes / 2**20:.2f} MiB, {self.n_tensors} tensors ({types}), "
            f"{self.bits_per_weight:.3f} bits per weight, {self.seconds:.1f} s"
        )


def file_type_for(types: dict[str, str], shapes: dict[str, tuple[int, ...]], preset: str | None = None) -> int:
    """general.file_type: the llama_ftype of `preset` when it names one, else the type holding most weights.

    A plan with a single quantized type maps to that type's ftype (Q8_0 -> MOSTLY_Q8_0, Q4_K ->
    MOSTLY_Q4_K_M as llama-quantize's Q4_K alias); an all-float plan to ALL_F32/MOSTLY_F16/BF16.
    """
    ftypes = gguf.LlamaFileType.__members__
    aliases = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
    if preset is not None:
        key = aliases.get(str(preset).upper(), str(preset).upper())
        for name in (f"ALL_{key}", f"MOSTLY_{key}"):
            if name in ftypes:
                return int(ftypes[name])
    weights: Counter[str] = Counter()
    for name, t in types.items():
        shape = shapes.get(name, ())
        if len(shape) >= 2:
            weights[t.upper()] += math.prod(shape)
    if not weights:
        return int(gguf.LlamaFileType.ALL_F32)
    quantized = Counter({t: n for t, n in weights.items() if t not in ("F32", "F16", "BF16")})
    dominant = (quantized or weights).most_common(1)[0][0]
    key = aliases.get(dominant, dominant)
    for name in (f"ALL_{key}", f"MOSTLY_{key}", f"MOSTLY_{key}_M", f"MOSTLY_{key}_S"):
        if name in ftypes:
            return int(ftypes[name])
    return int(gguf.LlamaFileType.GUESSED)


def _gguf_value(key: str, value: Any) -> GGUFValue:
    if isinstance(value, GGUFValue):
        return value
    VT = gguf.GGUFValueType
    if isinstance(value, str):
        return GGUFValue(value, VT.STRING)
    if isinstance(value, bool):
        return GGUFValue(value, VT.BOOL)
    if isinstance(value, (int, np.integer)):
        return GGUFValue(int(value), VT.INT32)
    if isinstance(value, (float, np.floating)):
        return GGUFValue(float(value), VT.FLOAT32)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return GGUFValue(list(value), VT.ARRAY, VT.STRING)
    raise MixquantError(f"metadata {key!r}: cannot store a {type(value).__name__} value; pass a gguf GGUFValue")


def _check_plan(source: Source, plan: Any, importance: dict[str, np.ndarray] | None) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, type) for every tensor, in the source's order; errors name the tensor."""
    types: dict[str, str] = dict(plan.types)
    names = [t.name for t in source.model.tensors]
    missing = [n for n in names if n not in types]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise MixquantError(f"plan has no type for tensors {', '.join(missing[:3])}{more}")
    unknown = [n for n in types if n not in set(names)]
    if unknown:
        raise MixquantError(f"plan names tensors the model does not have: {', '.join(unknown[:3])}")
    out = []
    for t in source.model.tensors:
        try:
            codec = formats.get(types[t.name])
        except ValueError as exc:
            raise MixquantError(f"tensor {t.name}: {exc}") from None
        cols = t.shape[-1]
        if cols % codec.block_size:
            raise MixquantError(
                f"tensor {t.name}: type {codec.name} needs rows whose length is a multiple of "
                f"{codec.block_size}, but its rows have {cols} values"
            )
        if importance is not None and importance.get(t.name) is not None:
            vec = np.asarray(importance[t.name])
            n_mat = math.prod(t.shape[:-2])  # a stack of experts: one slice per expert, as llama-quantize
            if vec.ndim != 1 or vec.shape[0] != cols * n_mat:
                raise MixquantError(
                    f"tensor {t.name}: importance vector has shape {vec.shape}, expected ({cols * n_mat},) "
                    f"(one per input column{f' of each of its {n_mat} experts' if n_mat > 1 else ''})"
                )
        out.append((t.name, t.shape, codec.name))
    return out


def _resolve_file_type(plan: Any, file_type: int | str | None, types: dict[str, str],
                       shapes: dict[str, tuple[int, ...]]) -> int:
    if file_type is None:
        file_type = getattr(plan, "file_type", None)
    if file_type is None or isinstance(file_type, str):
        preset = file_type if isinstance(file_type, str) else getattr(plan, "preset", None)
        file_type = file_type_for(types, shapes, preset)
    return int(file_type)


def _write_header(path: Path, source: Source, tensors: list[tuple[str, tuple[int, ...], str]], file_type: int,
                  name: str | None, alignment: int | None, extra_metadata: dict[str, Any] | None) -> gguf.GGUFWriter:
    """Open a GGUFWriter on `path` and write everything before the tensor data."""
    metadata = source.metadata
    extra = {k: _gguf_value(k, v) for k, v in (extra_metadata or {}).items()}
    writer = gguf.GGUFWriter(path, source.model.arch)
    if alignment is not None and alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
        writer.add_custom_alignment(alignment)
    # convert_hf_to_gguf.py's order: general.*, hyperparameters, file type, tokenizer
    items = list(metadata.items())
    split = next((i for i, (k, _) in enumerate(items) if k.startswith("tokenizer.")), len(items))
    if name:
        writer.add_name(name)
    for key, val in items[:split]:
        if key == gguf.Keys.General.NAME and name:
            continue
        writer.add_key_value(key, val.value, val.type, val.sub_type)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, val in [*items[split:], *extra.items()]:
        writer.add_key_value(key, val.value, val.type, val.sub_type)
    for tname, shape, type_name in tensors:
        nbytes = formats.quantized_size(type_name, (math.prod(shape[:-1]), shape[-1]))
        writer.add_tensor_info(tname, shape, np.dtype(np.float32), nbytes, raw_dtype=formats.get(type_name).ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def gguf_file_size(source: Source, plan: Any, *, file_type: int | str | None = None, name: str | None = None,
                   alignment: int | None = None, extra_metadata: dict[str, Any] | None = None) -> int:
    """The exact size of the file `write_gguf` would write for this plan, without quantizing anything
    (the header is written to a scratch file in the system's temporary folder to measure it)."""
    tensors = _check_plan(source, plan, None)
    types = {n: t for n, _, t in tensors}
    file_type = _resolve_file_type(plan, file_type, types, {n: s for n, s, _ in tensors})
    align = alignment or gguf.GGUF_DEFAULT_ALIGNMENT
    with tempfile.TemporaryDirectory() as scratch:
        writer = _write_header(Path(scratch) / "header.gguf", source, tensors, file_type, name, alignment, extra_metadata)
        writer.close()
        size = (Path(scratch) / "header.gguf").stat().st_size
    for _, shape, type_name in tensors:
        size += -size % align + formats.quantized_size(type_name, (math.prod(shape[:-1]), shape[-1]))
    return size


def write_gguf(
    source: Source,
    plan: Any,
    out_path: str | os.PathLike[str],
    importance: dict[str, np.ndarray] | None = None,
    threads: int = 2,
    progress: bool = True,
    *,
    file_type: int | str | None = None,
    name: str | None = None,
    alignment: int | None = None,
    extra_metadata: dict[str, Any] | None = None,
    quantizer: Callable[[str, np.ndarray, str, np.ndarray | None], bytes] | None = None,
) -> ExportResult:
    """Quantize every tensor of `source` to `plan.types[name]` and write a GGUF llama.cpp loads.

    importance: per-tensor importance vectors (llama-imatrix's, one value per input column),
        passed to the quantizer for the types that use one.
    file_type: general.file_type as a llama_ftype number or preset name ("Q4_K_M"); by default
        the plan's `preset`/`file_type` attribute if it has one, else inferred from the types.
    name: general.name to write instead of the source's.
    alignment: tensor data alignment (default GGUF's 32; another value is written as general.alignment).
    extra_metadata: more keys to write (after the source's), e.g. llama-quantize's
        "quantize.imatrix.file"; a value is a gguf GGUFValue, or a str, bool, int (written as
        INT32, as llama-quantize does), float (FLOAT32) or list of str.
    quantizer: (name, (rows, cols) float32, type, importance) -> bytes, instead of round-to-nearest
        (e.g. `mixquant.quantize.HessianQuantizer` for GPTQ).
    """
    start = time.perf_counter()
    out = check_output(out_path, [source.path])

    tensors = _check_plan(source, plan, importance)
    shapes = {n: s for n, s, _ in tensors}
    types = {n: t for n, _, t in tensors}
    file_type = _resolve_file_type(plan, file_type, types, shapes)
    _ = source.metadata  # reads the tokenizer: a bad one fails before any file is created

    writer = None
    bar = None
    tensor_bytes = 0
    try:
        with atomic_output(out, [source.path]) as tmp:
            writer = _write_header(tmp, source, tensors, file_type, name, alignment, extra_metadata)
            bar = tqdm(tensors, desc=f"writing {out.name}", unit="tensor", disable=not progress, leave=False)
            for tname, shape, tname_type in bar:
                bar.set_postfix_str(f"{tname} -> {tname_type}", refresh=False)
                raw = source.raw_data(tname, tname_type)
                if raw is not None:  # already stored in this type: copied as it is, as llama-quantize does
                    writer.write_tensor_data(raw)
                    tensor_bytes += raw.nbytes
                    continue
                x = source.tensor(tname)
                if tuple(x.shape) != tuple(shape):
                    raise MixquantError(f"{source.path}: tensor {tname} has shape {x.shape}, expected {shape}")
                x2 = x.reshape(math.prod(shape[:-1]), shape[-1])
                imp = importance.get(tname) if importance is not None else None
                try:
                    if quantizer is None:
                        data = formats.quantize(x2, tname_type, importance=imp, threads=threads)
                    else:
                        data = quantizer(tname, x2, tname_type, imp)
                except ValueError as exc:
                    raise MixquantError(f"tensor {tname}: cannot quantize to {tname_type}: {exc}") from None
                del x, x2
                writer.write_tensor_data(np.frombuffer(data, dtype=np.uint8))
                tensor_bytes += len(data)
                del data
            writer.close()
            writer = None
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already failing; the original error matters
                pass

    return ExportResult(
        path=out,
        bytes=out.stat().st_size,
        n_tensors=len(tensors),
        n_elements=sum(math.prod(s) for s in shapes.values()),
        tensor_bytes=tensor_bytes,
        file_type=file_type,
        seconds=time.perf_counter() - start,
        type_counts=dict(Counter(types.values())),
    )
