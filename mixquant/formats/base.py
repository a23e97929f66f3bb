"""The codec contract: one `Codec` per GGUF tensor type, kept in a registry by name."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# (rows, cols) float32, importance (cols,) float32 or None -> (rows, row_bytes) uint8
QuantizeRows = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
# (rows, row_bytes) uint8 -> (rows, cols) float32
DequantizeRows = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Codec:
    """A GGUF tensor type: its row quantizer/dequantizer; its block geometry is gguf's
    (GGML_QUANT_SIZES, the one source of type names and sizes).

    `uses_importance` says whether ggml reads `quant_weights` for this type at all
    (Q8_0 and the float types ignore it).
    """

    name: str
    quantize_rows: QuantizeRows
    dequantize_rows: DequantizeRows
    uses_importance: bool = True
    # for the formats error-compensated rounding can take: importance used -> FrozenRounding
    frozen: "Callable[[bool], FrozenRounding] | None" = None

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def block_size(self) -> int:
        """Weights per block."""
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.ggml_type][1]

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


# ---------------------------------------------------------------------------------------------
# error-compensated rounding: the pieces of a codec that GPTQ-style quantization needs
# ---------------------------------------------------------------------------------------------


class CodeLayout:
    """Where the integer codes of one block live in its bytes, for packing and unpacking them.

    Built from fields (code index, byte, shift in the byte, first bit of the code, bits): the
    code's bits [code_shift, code_shift + bits) sit at bit `byte_shift` of `byte`. Fields with the
    same (byte_shift, code_shift, bits) touch distinct bytes and distinct codes, so each such group
    packs or unpacks with one vectorised numpy operation over all rows.
    """

    def __init__(self, block_size: int, fields: list[tuple[int, int, int, int, int]]):
        self.block_size = block_size
        groups: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        for code, byte, byte_shift, code_shift, bits in fields:
            groups.setdefault((byte_shift, code_shift, bits), []).append((code, byte))
        self.groups = []
        for (byte_shift, code_shift, bits), pairs in groups.items():
            codes, bytes_ = (np.array(v, dtype=np.intp) for v in zip(*pairs))
            if len(set(codes.tolist())) != len(codes) or len(set(bytes_.tolist())) != len(bytes_):
                raise ValueError("a code layout group must touch distinct codes and bytes")
            self.groups.append((codes, bytes_, byte_shift, code_shift, (1 << bits) - 1))
        self.code_bytes = np.unique(np.concatenate([g[1] for g in self.groups]))

    def pack(self, codes: np.ndarray, data: np.ndarray) -> np.ndarray:
        """`data` (rows, type_size) uint8 with its code bits replaced by `codes` (rows, block_size)."""
        out = data.copy()
        out[:, self.code_bytes] = 0
        codes = codes.astype(np.int64)
        for idx, byte, byte_shift, code_shift, mask in self.groups:
            out[:, byte] |= (((codes[:, idx] >> code_shift) & mask) << byte_shift).astype(np.uint8)
        return out

    def unpack(self, data: np.ndarray) -> np.ndarray:
        """The codes (rows, block_size) int64 stored in `data` (rows, type_size)."""
        codes = np.zeros((data.shape[0], self.block_size), dtype=np.int64)
        for idx, byte, byte_shift, code_shift, mask in self.groups:
            codes[:, idx] |= ((data[:, byte].astype(np.int64) >> byte_shift) & mask) << code_shift
        return codes


# fit(x (rows, block) float32, importance (block,) float32 or None, row_context or None)
#   -> (ggml's bytes of the block (rows, type_size) uint8, scale (rows, block) float32, offset (rows, block) float32)
FitBlock = Callable[[np.ndarray, np.ndarray | None, np.ndarray | None], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class FrozenRounding:
    """What error-compensated rounding needs from a format, each piece exactly as ggml does it.

    fit: ggml's own parameter search on one block (for 32-blocks: of any number of whole blocks),
        giving ggml's bytes and, per weight, the (scale, offset) its final rounding step used.
    family, params: which codec module's `frozen_code(x, scale, offset, params)` is that final
        rounding step (given the frozen block parameters); it returns -1 where ggml keeps the code
        the search gave (a zero sub-block scale), which then stays as the fit left it.
    layout: where the codes live in the block's bytes.
    values: the value of code c is (per weight) scale_c * values[c] + offset_c; `probe` names two
        codes whose decoded values give scale_c and offset_c.
    row_context: what the fit needs from the whole row (the legacy formats' sigma2), or None.
    """

    family: int
    params: np.ndarray
    fit: FitBlock
    layout: CodeLayout
    values: np.ndarray
    probe: tuple[int, int]
    row_context: Callable[[np.ndarray], np.ndarray] | None = None
