"""The codec contract: one `Codec` per GGUF tensor type, kept in a registry by name."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType

# (rows, cols) float32, importance (cols,) float32 or None -> (rows, row_bytes) uint8
QuantizeRows = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
# (rows, row_bytes) uint8 -> (rows, cols) float32
DequantizeRows = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Codec:
    """A GGUF tensor type: its block geometry and its row quantizer/dequantizer.

    `uses_importance` says whether ggml reads `quant_weights` for this type at all
    (Q8_0 and the float types ignore it).
    """

    name: str
    block_size: int
    type_size: int
    quantize_rows: QuantizeRows
    dequantize_rows: DequantizeRows
    uses_importance: bool = True

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_size * self.type_size


REGISTRY: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    if codec.name in REGISTRY:
        raise RuntimeError(f"codec {codec.name} registered twice")
    REGISTRY[codec.name] = codec
    return codec
