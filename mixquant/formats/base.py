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
    scales: the block's stored parameters, to refit them given the codes (`BlockScales`).
    """

    family: int
    params: np.ndarray
    fit: FitBlock
    layout: CodeLayout
    values: np.ndarray
    probe: tuple[int, int]
    row_context: Callable[[np.ndarray], np.ndarray] | None = None
    scales: "BlockScales | None" = None


# (rows, type_size) uint8 -> d, dmin (rows,) float32; sc, m (rows, sub-blocks) int64
ReadScales = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
# (data, d, dmin, sc, m) -> data with those parameters stored (the codes untouched)
WriteScales = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class BlockScales:
    """A block's stored parameters, as the decoder uses them: the weight with code c in sub-block k
    decodes to f32(f32(f32(d * sc_k) * values[c]) + min_sign * f32(dmin * m_k)) (the last term only
    where `min_range` is set), with d and dmin float16 and sc_k, m_k integers in their ranges.

    Formats without sub-block scales have one sub-block of the whole block and sc = m = 1 (range
    (1, 1)); Q4_1/Q5_1's float16 min is dmin (min_sign +1), the k-quants' mins are subtracted.
    read/write: those parameters from/into the bytes of one block column (rows, type_size).
    """

    sub_block: int
    scale_range: tuple[int, int]
    min_range: tuple[int, int] | None
    min_sign: float
    read: ReadScales
    write: WriteScales


def fp16_at(data: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of each row of `data` (rows, n) uint8, as float32."""
    return np.ascontiguousarray(data[:, offset:offset + 2]).view(np.float16)[:, 0].astype(np.float32)


def put_fp16_at(data: np.ndarray, offset: int, values: np.ndarray) -> None:
    """Store float16 `values` (rows,) (exactly representable) at byte `offset` of each row."""
    data[:, offset:offset + 2] = np.asarray(values, dtype=np.float16).reshape(-1, 1).view(np.uint8)
