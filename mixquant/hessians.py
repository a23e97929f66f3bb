"""Second moments of every linear layer's input, H = sum_t x_t x_t^T, for error-compensated rounding.

`calibrate(..., hessians=True)` accumulates them in float64, one per distinct linear input (q/k/v
share "blk.N.attn_in", gate/up "blk.N.ffn_in"; "blk.N.attn_output_in", "blk.N.ffn_down_in" and the
output layer's "output_in": the keys of `calibrate.input_of`), over the same tokens as the imatrix,
so diag(H) / rows equals the imatrix entry of every weight reading that input. Beside each H, the
per-channel sum of |x| over the same rows (AWQ's activation magnitude, mean |x|; `mean_abs`).

The file (`hessians.safetensors`) holds one float64 (cols, cols) tensor per key and, in the
safetensors metadata, the schema, the model's shape and the row count of every key. Its size is
sum over keys of cols^2 x 8 bytes: for SmolLM2-135M (30 blocks, hidden 576, FFN 1536) 30 x (3 x 576^2
+ 1536^2) x 8 + 576^2 x 8 = 808 MB. `hessian_bytes` gives it before any work, and calibration
refuses (naming the size) when it exceeds the memory budget.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MixquantError
from .files import atomic_output

SCHEMA = "mixquant.hessians/1"
# Hessians held in memory while calibrating (and written at the end) unless the caller says otherwise.
DEFAULT_BUDGET_BYTES = 4 << 30
_ABS = "abs_sum/"  # the file's name of an input's sum of |x| ("abs_sum/blk.3.attn_in")


def hessian_bytes(input_cols: dict[str, int]) -> int:
    """Bytes of the float64 Hessians for {input key: columns}: sum of cols^2 x 8."""
    return sum(8 * c * c for c in input_cols.values())


def check_budget(input_cols: dict[str, int], budget: int, where: str) -> None:
    size = hessian_bytes(input_cols)
    if size > budget:
        raise MixquantError(f"{where}: the Hessians take {size / 2**20:,.0f} MiB ({len(input_cols)} inputs, "
                            f"sum of cols^2 x 8 bytes), over the memory budget of {budget / 2**20:,.0f} MiB")


@dataclass
class Hessians:
    """input key -> float64 (cols, cols) sum of x x^T, and the rows (tokens) summed; `abs_sums`:
    input key -> float64 (cols,) sum of |x| over the same rows (files written before it have none).

    `model` names the shape of the model they belong to ({"arch", "n_layer", "n_embd"}); a file
    read with `load` keeps the tensors on disk until `matrix(key)` asks for one.
    """

    model: dict[str, int | str]
    rows: dict[str, int]
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = None
    abs_sums: dict[str, np.ndarray] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def cols(self, key: str) -> int:
        if key in self.sums:
            return self.sums[key].shape[0]
        return int(self._shapes[key][0])

    def matrix(self, key: str) -> np.ndarray:
        """The float64 sum of x x^T for `key` (read from the file when loaded from one)."""
        if key in self.sums:
            return self.sums[key]
        if self.path is None or key not in self.rows:
            raise KeyError(key)
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="numpy") as f:
                h = f.get_tensor(key)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise MixquantError(f"{self.path}: cannot read Hessian {key}: {exc}") from None
        return h

    def mean_abs(self, key: str) -> np.ndarray:
        """mean |x| per input channel of `key` (float64), over the rows H sums."""
        if key not in self.abs_sums and self.path is not None and _ABS + key in getattr(self, "_shapes", {}):
            from safetensors import safe_open

            with safe_open(self.path, framework="numpy") as f:
                self.abs_sums[key] = f.get_tensor(_ABS + key)
        if key not in self.abs_sums:
            raise MixquantError(f"{self.path or 'Hessians'}: no mean |x| statistics for {key} (a file written "
                                "before they were collected: calibrate again)")
        return self.abs_sums[key] / max(self.rows[key], 1)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to `path` atomically (`files.atomic_output`: nothing half-written)."""
        from safetensors.numpy import save_file

        meta = {"schema": SCHEMA, "model": json.dumps(self.model), "rows": json.dumps(self.rows)}
        with atomic_output(path) as tmp:
            tensors = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in self.sums.items()}
            tensors.update({_ABS + k: np.ascontiguousarray(v, dtype=np.float64) for k, v in self.abs_sums.items()})
            save_file(tensors, tmp, metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Hessians:
        """Open a Hessians file (headers only; matrices are read one at a time by `matrix`)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MixquantError(f"{path}: no such Hessians file")
        try:
            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
                names = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
                dtypes = {k: f.get_slice(k).get_dtype() for k in names}
        except Exception as exc:  # noqa: BLE001
            raise MixquantError(f"{path}: not a readable Hessians file (safetensors): {exc}") from None
        if meta.get("schema") != SCHEMA:
            raise MixquantError(f"{path}: not a mixquant Hessians file (schema {meta.get('schema')!r}, "
                                f"expected {SCHEMA!r})")
        try:
            model = json.loads(meta["model"])
            rows = {str(k): int(v) for k, v in json.loads(meta["rows"]).items()}
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise MixquantError(f"{path}: bad Hessians metadata: {exc}") from None
        abs_shapes = {k: shapes.pop(k) for k in list(shapes) if k.startswith(_ABS)}
        for key, shape in abs_shapes.items():
            if shape != (shapes.get(key.removeprefix(_ABS), (None,))[0],) or dtypes[key] != "F64":
                raise MixquantError(f"{path}: entry {key} is {dtypes[key]} {shape}, expected F64 (cols,) beside "
                                    f"its Hessian")
        for key, shape in shapes.items():
            if len(shape) != 2 or shape[0] != shape[1] or dtypes[key] != "F64" or key not in rows:
                raise MixquantError(f"{path}: entry {key} is {dtypes[key]} {shape}, expected a square F64 "
                                    "matrix with a row count")
        if set(rows) != set(shapes):
            raise MixquantError(f"{path}: row counts and matrices name different inputs")
        size = path.stat().st_size
        if size < hessian_bytes({k: s[0] for k, s in shapes.items()}):
            raise MixquantError(f"{path}: truncated ({size:,} bytes)")
        h = cls(model=model, rows=rows, path=path)
        h._shapes = {**shapes, **abs_shapes}
        return h

    def check_model(self, model: dict[str, int | str], where: str) -> None:
        """Refuse Hessians computed on a model of another shape."""
        for k in ("arch", "n_layer", "n_embd"):
            if k in model and k in self.model and model[k] != self.model[k]:
                raise MixquantError(f"{where}: Hessians are for another model ({k} {self.model[k]}, "
                                    f"this model has {model[k]})")


def model_shape(info) -> dict[str, int | str]:
    """The fields of a `plan.ModelInfo` that identify which model Hessians belong to."""
    return {"arch": info.arch, "n_layer": int(info.n_layer), "n_embd": int(info.n_embd)}
