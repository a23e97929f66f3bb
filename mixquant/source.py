"""Model sources: read a checkpoint lazily, one tensor at a time, as GGUF-named float32 arrays.

    src = open_source("path/to/hf-folder")          # or a .gguf file
    src.model                  -> ModelInfo (arch, sizes, tensor names and shapes)
    src.tensor("blk.0.attn_q.weight")  -> float32 (rows, cols), GGUF orientation
    src.metadata               -> {GGUF key: GGUFValue}: hyperparameters and tokenizer, ready to write

A Hugging Face folder is read the way llama.cpp's convert_hf_to_gguf.py reads it (names mapped
with gguf's TensorNameMap, q/k rows permuted for llama rope, the same metadata keys: what differs
between families is asked of the architecture's adapter, `mixquant.arch`); a GGUF file is passed
through, with already-quantized tensors dequantized only when asked to.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.gguf_writer import GGUFValue

from . import arch as arches
from .arch import permute_qk
from .errors import MixquantError
from .files import note_input, open_gguf
from .plan import ModelInfo, TensorInfo

if TYPE_CHECKING:
    from .arch import Adapter

__all__ = ["Source", "HFSource", "GGUFSource", "open_source", "permute_qk"]

logger = logging.getLogger(__name__)

# GGUF keys a writer owns: never copied from a source.
_WRITER_KEYS = (
    gguf.Keys.General.ARCHITECTURE,
    gguf.Keys.General.FILE_TYPE,
    gguf.Keys.General.QUANTIZATION_VERSION,
    gguf.Keys.General.ALIGNMENT,
)

_FLOAT_SAFETENSORS = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# Text convert_hf_to_gguf.py tokenizes to recognise a BPE pre-tokenizer, and the hashes it knows
# (llama.cpp 0c1e570, get_vocab_base_pre); the name goes into tokenizer.ggml.pre.
# Two hashes appear twice in llama.cpp's chain of plain `if`s, where the last match wins: only that one is kept.
_CHKTXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'  # noqa: E501
_BPE_PRE: dict[str, str] = {
    "b6e8e1518dc4305be2fe39c313ed643381c4da5db34a98f6a04c093f8afbe99b": "chatglm-bpe",
    "81d72c7348a9f0ebe86f23298d37debe0a5e71149e29bd283904c02262b27516": "chatglm-bpe",
    "a1336059768a55c99a734006ffb02203cd450fed003e9a71886c88acf24fdbc2": "glm4",
    "9ca2dd618e8afaf09731a7cf6e2105b373ba6a1821559f258b272fe83e6eb902": "glm4",
    "cdf5f35325780597efd76153d4d1c16778f766173908894c04afc20108536267": "glm4",
    "1431a23e583c97432bc230bff598d103ddb5a1f89960c8f1d1051aaa944d0b35": "minerva-7b",
    "7e57df22b1fe23a7b1e1c7f3dc4e3f96d43a4eb0836d0c6bdc3436d7b2f1c664": "hunyuan",
    "bba3b3366b646dbdded5dbc42d59598b849371afc42f7beafa914afaa5b70aa6": "hunyuan-dense",
    "e6ddf9c6686791c12d698d34c31ab9be1fea9af5a3d9a6909783ab382198ae1c": "hy_v4",
    "a6b57017d60e6edb4d88ecc2845188e0eb333a70357e45dcc9b53964a73bbae6": "falcon-h1",
    "60476e1243776c4fb1b993dbd7a5f15ac22f83c80afdf425fa5ae01c8d44ef86": "falcon-h1",
    "3eda48b4c4dc7de733d1a8b3e3b4a85243dbbf704da2ee9d42c6beced8897896": "falcon-h1",
    "48f8e02c0359c0bbdd82f26909171fac1c18a457bb47573ed1fe3bbb2c1cfd4b": "falcon-h1",
    "81212dc7cdb7e0c1074ca62c5aeab0d43c9f52b8a737be7b12a777c953027890": "kimi-k2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",
    "66b8d4e19ab16c3bfd89bce5d785fb7e0155e8648708a1f42077cb9fe002c273": "grok-2",
    "b3d1dd861f1d4c5c0d2569ce36baf3f90fe8a102db3de50dd71ff860d91be3df": "jina-v2-de",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "9e454714343b69b99b71795c1d27a68c2a1d15dab111f4d353109f966af29da7": "lfm2",
    "846deafc5b0fa786186fa4ae6c7b49903cf2f1d1895bdb80b9120d60be135252": "gemma4",
    "0a766d034107bc736a3f2dc4968fd62e54a3570f1454443e0c5a4cc6bd7941ed": "spark2_5",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "d772b220ace2baec124bed8cfafce0ead7d6c38a4b65ef11261cf9d5d62246d1": "tiny_aya",
    "52df12b4c8d4176e7481aab4b6e8454d1fd0a210a04a574f6d4e067d10e23c3e": "cohere2moe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
    "c7699093ba4255a91e702aa38a596aa81669f3525dae06c2953267dde580f448": "jina-v1-en",
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "jina-v2-en",
    "171aeeedd6fb548d418a7461d053f11b6f1f1fc9b387bd66640d28a4b9f5c643": "jina-v2-es",
    "27949a2493fc4a9f53f5b9b029c82689cfbe5d3a1929bb25e043089e28466de6": "jina-v2-de",
    "a023e9fdc5a11f034d3ef515b92350e56fb2af1f66c6b6811a4444ea9bf8763d": "jina-v5-nano",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "c7ea5862a53e4272c035c8238367063e2b270d51faa48c0f09e9d5b54746c360": "poro-chat",
    "7967bfa498ade6b757b064f31e964dddbb80f8f9a4d68d4ba7998fcf281c531a": "jina-v2-code",
    "7fc505bd3104ca1083b150b17d088b59534ede9bde81f0dd2090967d7fe52cee": "viking",
    "b53802fb28e26d645c3a310b34bfe07da813026ec7c7716883404d5e0f8b1901": "jais",
    "bc5108ee1eb6a3d600cadd065f63190fbd0554dbc9e4bbd6a0d977970afc8d2a": "jais-2",
    "7b3e7548e4308f52a76e8229e4e6cc831195d0d1df43aed21ac6c93da05fec5f": "codeshell",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3c30d3ad1d6b64202cd222813e7736c2db6e1bd6d67197090fc1211fbc612ae7": "bloom",
    "bc01ce58980e1db43859146dc51b1758b3b88729b217a74792e9f8d43e479d21": "gpt3-finnish",
    "4e2b24cc4770243d65a2c9ec19770a72f08cffc161adbb73fcbb6b7dd45a0aae": "exaone",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "60824e3c0d9401f89943cbb2fff727f0e2d4c545ba4df2d6e4f09a6db0f5b450": "chameleon",
    "8b5a93ed704057481f240da0be7e7dca721d7f8f4755263b6807227a2cbeae65": "roberta-bpe",
    "ad851be1dba641f2e3711822f816db2c265f788b37c63b4e1aeacb9ee92de8eb": "gigachat",
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",
    "877081d19cf6996e2c4ff0e1236341e9b7bde288f5311a56a937f0afbbb3aeb5": "deepseek-v3",
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",
    "7dec86086fcc38b66b7bc1575a160ae21cf705be7718b9d5598190d7c12db76f": "superbpe",
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",
    "96a5f08be6259352137b512d4157e333e21df7edd3fcd152990608735a65b224": "bailingmoe",
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",
    "b0a6b1c0bd5998ebd9df08611efde34a4ff03faed45ae09c43e6b31ebd4b94cf": "a.x-4.0",
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",
    "169bf0296a13c4d9b7672313f749eb36501d931022de052aad6e36f2bf34dd51": "lfm2",
    "2085e1638f6c377a0aa4ead21b27bb4cb941bf800df86ed391011769c1758dfb": "exaone4",
    "a1e163ecab2e718a4c829d1148b6e86824ec36163bb71941c3dca9cd5ac25756": "mellum",
    "a0b64b4385f123663873756336c085744376d015ff328bb1d901598f63c44152": "modern-bert",
    "49fc0303c9e0d2c2c565c510f64b2d9b271276acdcdadff733249eda9f7d59df": "afmoe",
    "9b1be57e70d20d9501b2b3186e792d81181ae36ada3903c26f9fea418cf87206": "bailingmoe2",
    "53e325976a6e142379c19b09afcae354f2f496f147afa8f9e189a33fe4e3024e": "granite-docling",
    "f4f37b6c8eb9ea29b3eac6bb8c8487c5ab7885f8d8022e67edc1c68ce8403e95": "minimax-m2",
    "4a2e2abae11ca2b86d570fc5b44be4d5eb5e72cc8f22dd136a94b37da83ab665": "kormo",
    "9d70134b369a70e5735009b6de918f7581b5211f7c074d1f89f753aea8248af1": "youtu",
    "16389f0a1f51ee53e562ffd51c371dc508639ab0e4261502071836e50e223e91": "solar-open",
    "6c81ce329e0802883b22eabab0d3fa48357337ef1ecb45443828bf1f6254833f": "exaone-moe",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "b4b8ca1f9769494fbd956ebc4c249de6131fb277a4a3345a7a92c7dd7a55808d": "joyai-llm",
    "e4d54df1ebc1f2b91acd986c5b51aa50837d5faf7c7398e73c1f9e9ee5d19869": "kanana2",
    "862f827721df956049dff5ca81a57f29e575280bc622e290d3bf4e35eca29015": "f2llmv2",
    "62f6fb0a6fd5098caeabb19b07a5c1099cafc8b9c40eab6ea89ece4ec02fbc57": "sarvam-moe",
    "f728162c1315c26e40249849799b4ba3fe584c32084b4795b03eb295e63cb5af": "talkie",
    "36f3066e97b7f3994b379aaacde306c1444c6ae84e81a5ae3cd2b7ed3b8c42d4": "minicpm5",
    "f241072145675bf8322086f115aebad05e9f869557a238bf2150a2a417d1bf60": "granite-embed-multi-97m",
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
    "9dcf830ee9990cdbf78cc523a5f7bd9ad8f3f9890c2d3581d2785ad10f07049d": "mellum2",
    "972da7b59cec44d1f0a490a86c96df53859e486e481563e5dddac155013d87ac": "laguna",
    "653660222fb704f61cbf2b618a8ae6502b7f8b20c980f9a5de07ed78e13319cd": "ufakzeka",
}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32, exactly (shifted in place: one float32 copy)."""
    bits = raw.astype(np.uint32)
    bits <<= 16
    return bits.view(np.float32)


def _release(mapped: np.memmap, start: int, nbytes: int) -> None:
    """Drop a tensor's pages from this process once it is copied out: mapped file pages count in
    RSS until unmapped, so without this the whole model would end up resident."""
    begin = start - start % mmap.PAGESIZE
    mapped._mmap.madvise(mmap.MADV_DONTNEED, begin, min(start + nbytes, len(mapped._mmap)) - begin)


def _check_finite(x: np.ndarray, name: str, where: Path) -> None:
    with np.errstate(all="ignore"):  # inf + -inf is the NaN looked for here, not worth a warning
        total = np.sum(x, dtype=np.float64)
    if np.isfinite(total):  # no temporary the size of the tensor
        return
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise MixquantError(f"{where}: tensor {name} contains {int(bad.sum())} NaN/Inf values (first at index {first})")


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise MixquantError(f"{path}: missing {what}")
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MixquantError(f"{path}: malformed {what}: {exc}") from None
    except RecursionError:
        raise MixquantError(f"{path}: malformed {what}: nested too deeply") from None


class Source:
    """A model to quantize: its shape (`model`), its tensors (lazily) and its GGUF metadata."""

    path: Path
    kind: str  # "hf" or "gguf"
    model: ModelInfo
    adapter: Adapter  # what mixquant knows about the architecture (mixquant.arch)
    hf_folder: Path | None = None

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as C-contiguous float32 in GGUF (numpy) orientation, e.g. (rows, cols)."""
        raise NotImplementedError

    def tensor_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start..stop of a 2-D tensor, as `tensor(name)[start:stop]`; a source that can read
        them without the whole tensor does (the token embedding of a large vocabulary)."""
        return np.ascontiguousarray(self.tensor(name)[start:stop])

    @property
    def metadata(self) -> dict[str, GGUFValue]:
        """GGUF key/values to write, in order (general.*, hyperparameters, tokenizer).

        Excludes what a writer sets itself: general.architecture, general.file_type,
        general.quantization_version, general.alignment.
        """
        raise NotImplementedError

    def source_type(self, name: str) -> str:
        """The tensor's stored type name: "F32", "F16", "BF16", or a GGUF quantized type."""
        raise NotImplementedError

    def raw_data(self, name: str, type_name: str) -> np.ndarray | None:
        """The tensor's stored bytes when it is already stored as `type_name` in GGUF layout, else None.

        An export copies these as they are instead of decoding and re-encoding them (as
        llama-quantize does for a tensor whose type does not change).
        """
        return None

    @property
    def tensor_names(self) -> list[str]:
        return [t.name for t in self.model.tensors]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def _info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise MixquantError(f"{self.path}: no tensor named {name!r}") from None

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.model.tensors}

    def meta(self, key: str, default: Any = None) -> Any:
        """A metadata value as plain Python (e.g. source.meta("llama.block_count"))."""
        val = self.metadata.get(key)
        return default if val is None else val.value

    @property
    def input_files(self) -> list[Path]:
        """Every file the tensors are read from (an export must never overwrite one)."""
        return [self.path]

    def close(self) -> None:
        pass

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} arch={self.model.arch} tensors={len(self.model.tensors)}>"


# --------------------------------------------------------------------------------------------
# Hugging Face folders


@dataclass(frozen=True)
class _StEntry:
    """One tensor inside a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _scan_safetensors(path: Path) -> dict[str, _StEntry]:
    """Parse and validate a safetensors header against the file's size; reads no tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise MixquantError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise MixquantError(
                    f"{path}: truncated or corrupt safetensors file: header says {n} bytes but the file has {size}"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise MixquantError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MixquantError(f"{path}: corrupt safetensors header: {exc}") from None
    except RecursionError:
        raise MixquantError(f"{path}: corrupt safetensors header: nested too deeply") from None
    if not isinstance(header, dict):
        raise MixquantError(f"{path}: corrupt safetensors header: not a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, _StEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MixquantError(f"{path}: corrupt safetensors header entry for tensor {name}") from None
        if end > data_len:
            raise MixquantError(
                f"{path}: truncated safetensors file: tensor {name} ends at byte {data_start + end} "
                f"but the file has {size}"
            )
        itemsize = _ITEMSIZE.get(dtype)
        if begin < 0 or end < begin or (itemsize is not None and end - begin != math.prod(shape) * itemsize):
            raise MixquantError(f"{path}: corrupt safetensors header: tensor {name} {dtype}{list(shape)} "
                                f"does not fit its byte range [{begin}, {end})")
        entries[name] = _StEntry(path, dtype, shape, data_start + begin, end - begin)
    return entries


def _find_hparam(hp: dict, keys: list[str]) -> Any:
    return next((hp[k] for k in keys if hp.get(k) is not None), None)


class HFSource(Source):
    """A Hugging Face checkpoint folder (config.json, tokenizer.json, *.safetensors)."""

    kind = "hf"

    def __init__(self, folder: Path):
        self.path = self.hf_folder = folder
        note_input(folder)  # every file in it: an output may not replace one
        config_path = folder / "config.json"
        config = _read_json(config_path, "config.json")
        if not isinstance(config, dict):
            raise MixquantError(f"{config_path}: malformed config.json: not a JSON object")
        if isinstance(config.get("text_config"), dict):
            config = {**config, **config["text_config"]}
        self.config = config
        self.adapter = arches.for_config(config, config_path)
        self.arch = self.adapter.name
        hp = config  # structure from the raw file; transformers' defaults only matter for metadata

        def need(keys: list[str]) -> int:
            value = _find_hparam(hp, keys)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MixquantError(f"{config_path}: malformed config.json: {keys[0]} missing or not a positive integer")
            return value

        self.n_layer = need(["num_hidden_layers", "n_layers", "n_layer", "num_layers"])
        self.n_embd = need(["hidden_size", "n_embd", "dim"])
        self.n_head = need(["num_attention_heads", "n_head", "n_heads"])
        kv_keys = ["num_key_value_heads", "n_kv_heads"]
        self.n_head_kv = self.n_head if _find_hparam(hp, kv_keys) is None else need(kv_keys)
        if self.n_head % self.n_head_kv:
            raise MixquantError(f"{config_path}: malformed config.json: {self.n_head} attention heads do not "
                                f"share {self.n_head_kv} key/value heads evenly")
        self.n_expert = int(_find_hparam(hp, ["num_local_experts", "num_experts", "n_routed_experts"]) or 0)
        need(["intermediate_size"])
        self.vocab_size = need(["vocab_size"])
        tied = hp.get("tie_word_embeddings")
        if tied is None:  # transformers' default where config.json leaves it out (Gemma 3 ties by default)
            tied = self.hparams.get("tie_word_embeddings", False)
        self.tied = bool(tied)

        # the GGUF's vocabulary: token list and embedding rows (Gemma 3 drops those beyond the tokenizer's)
        self.n_vocab = self.adapter.vocab_rows(self, self._check_tokenizer(folder))
        self._entries = self._scan_weights(folder)
        if self.n_layer > len(self._entries):  # before anything sized by it (name maps, required lists)
            raise MixquantError(f"{config_path}: num_hidden_layers is {self.n_layer} but the weights hold only "
                                f"{len(self._entries)} tensors")
        self._maps: dict[Path, np.memmap] = {}
        self._loaders: dict[str, Callable[[], np.ndarray]] = {}
        self._row_entries: dict[str, _StEntry] = {}  # 2-D tensors stored as they are: rows readable alone
        self._types: dict[str, str] = {}
        self._kept_rows: dict[str, int] = {}  # 2-D tensors of which the GGUF keeps only the first rows
        dims = ModelInfo(arch=self.arch, n_layer=self.n_layer, n_head=self.n_head, n_head_kv=self.n_head_kv,
                         n_expert=self.n_expert, n_embd=self.n_embd, tied_output=self.tied)  # no tensors yet
        infos = self._map_tensors(dims)
        self._check_shapes(infos, config_path)
        self.model = replace(dims, tensors=[self._keep_vocab(t) for t in infos])

    # -- config -----------------------------------------------------------------------------

    @cached_property
    def hparams(self) -> dict:
        """config.json with transformers' defaults filled in, as convert_hf_to_gguf.py loads it."""
        try:
            from transformers import AutoConfig

            loaded = AutoConfig.from_pretrained(self.path, trust_remote_code=False, local_files_only=True).to_dict()
        except Exception as exc:  # noqa: BLE001 - fall back to the raw file, as convert does
            logger.warning("%s: transformers could not load config.json (%s); using the raw file", self.path, exc)
            return dict(self.config)
        if isinstance(loaded.get("text_config"), dict):
            loaded = {**loaded, **loaded["text_config"]}
        return loaded

    @staticmethod
    def _check_tokenizer(folder: Path) -> dict[str, Any]:
        """tokenizer.json, checked (a usable GGUF needs it)."""
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise MixquantError(f"{path}: missing tokenizer.json (the tokenizer is needed to write a usable GGUF)")
        tok = _read_json(path, "tokenizer.json")
        if not isinstance(tok, dict) or not isinstance(tok.get("model"), dict) or "vocab" not in tok["model"]:
            raise MixquantError(f"{path}: malformed tokenizer.json: no model vocabulary")
        cfg = folder / "tokenizer_config.json"
        if cfg.exists() and not isinstance(_read_json(cfg, "tokenizer_config.json"), dict):
            raise MixquantError(f"{cfg}: malformed tokenizer_config.json: not a JSON object")
        return tok

    # -- weights ----------------------------------------------------------------------------

    @staticmethod
    def _scan_weights(folder: Path) -> dict[str, _StEntry]:
        index_path = folder / "model.safetensors.index.json"
        if index_path.is_file():
            index = _read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise MixquantError(f"{index_path}: malformed safetensors index: no weight_map")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (folder / name).is_file():
                    raise MixquantError(f"{folder / name}: missing safetensors shard (listed in {index_path.name})")
        elif (folder / "model.safetensors").is_file():
            files, weight_map = ["model.safetensors"], None
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
            if not files:
                other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pth")]
                hint = f" (found {', '.join(other[:3])}: only safetensors is supported)" if other else ""
                raise MixquantError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
        entries: dict[str, _StEntry] = {}
        for name in files:
            for tname, entry in _scan_safetensors(folder / name).items():
                if weight_map is not None and weight_map.get(tname, name) != name:
                    continue  # the index says another shard holds it
                entries[tname] = entry
        if weight_map is not None:
            missing = [t for t in weight_map if t not in entries]
            if missing:
                raise MixquantError(
                    f"{index_path}: {len(missing)} tensors listed in the index are not in their shard, e.g. {missing[0]}"
                )
        return entries

    def _map_tensors(self, dims: ModelInfo) -> list[TensorInfo]:
        adapter = self.adapter
        tmap = adapter.tensor_map(self.n_layer)
        mapped: dict[str, tuple[str, _StEntry]] = {}
        experts: dict[str, dict[int, tuple[str, _StEntry]]] = {}  # GGUF name -> {expert: tensor}
        for hf_name, entry in self._entries.items():
            if adapter.skips(hf_name):
                continue
            if self.tied and hf_name.replace("language_model.", "") in ("lm_head.weight", "model.lm_head.weight"):
                continue  # tied: llama.cpp reuses token_embd, no output.weight
            stacked, expert = adapter.expert_of(hf_name)
            new = adapter.gguf_name(stacked, tmap)
            if new is None:
                raise MixquantError(f"{entry.file}: cannot map tensor {hf_name!r} to a GGUF name for {self.arch}")
            if new in mapped or expert in experts.get(new, {}):
                raise MixquantError(f"{entry.file}: two tensors map to {new}, e.g. {hf_name!r}")
            if entry.dtype not in _FLOAT_SAFETENSORS:
                raise MixquantError(
                    f"{entry.file}: tensor {hf_name} has dtype {entry.dtype}; only F32, F16 and BF16 are supported"
                )
            if (why := adapter.check_shape(new, entry.shape, dims)) is not None:
                raise MixquantError(f"{entry.file}: {why}")
            if expert is None:
                mapped[new] = (hf_name, entry)
            else:
                experts.setdefault(new, {})[expert] = (hf_name, entry)

        missing = [n for n in adapter.required_tensors(dims) if n not in mapped and n not in experts]
        if missing:
            where = self.path / "model.safetensors.index.json" if (self.path / "model.safetensors.index.json").is_file() \
                else self._first_file()
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise MixquantError(f"{where}: missing tensors: {', '.join(missing[:3])}{more}")

        infos: dict[str, TensorInfo] = {}
        for name, (hf_name, entry) in mapped.items():
            # what convert_hf_to_gguf.py would store it as: norms and 1-D tensors always F32
            dtype = "F32" if len(entry.shape) <= 1 or name.endswith("_norm.weight") or entry.dtype == "F64" \
                else entry.dtype
            infos[name] = TensorInfo(name, entry.shape, dtype)
            self._types[name] = entry.dtype
            self._loaders[name] = self._loader(name, [(hf_name, entry)], dims)
            if len(entry.shape) == 2 and not adapter.converts(name, dims):
                self._row_entries[name] = entry
        for name, by_expert in experts.items():  # one 3-D tensor of all experts, as the converter stacks them
            parts = [by_expert[e] for e in sorted(by_expert)]
            dtypes, shapes = {e.dtype for _, e in parts}, {e.shape for _, e in parts}
            if sorted(by_expert) != list(range(self.n_expert)) or len(dtypes) > 1 or len(shapes) > 1:
                raise MixquantError(f"{parts[0][1].file}: the experts of {name} are not {self.n_expert} tensors "
                                    "of one shape and type")
            infos[name] = TensorInfo(name, (self.n_expert, *parts[0][1].shape), parts[0][1].dtype)
            self._types[name] = parts[0][1].dtype
            self._loaders[name] = self._loader(name, parts, dims)
        for name, load in adapter.derived_tensors(self).items():
            infos[name] = TensorInfo(name, load().shape, "F32")
            self._types[name] = "F32"
            self._loaders[name] = load
        return [infos[n] for n in sorted(infos, key=_tensor_order)]

    def _check_shapes(self, infos: list[TensorInfo], config_path: Path) -> None:
        """config.json against the tensors' shapes (GGUF orientation, (rows, cols)): a transposed
        weight, a wrong head count or vocabulary size would give a GGUF llama.cpp refuses."""
        head_dim = self.config.get("head_dim") or self.n_embd // self.n_head
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise MixquantError(f"{config_path}: malformed config.json: head_dim {head_dim!r}")
        n_ff = self.config.get("intermediate_size")
        e, v = self.n_embd, self.vocab_size
        expected = self.adapter.expected_shapes(e, self.n_head * head_dim, self.n_head_kv * head_dim, head_dim,
                                                n_ff, v)
        for t in infos:
            want = expected.get(t.name.split(".", 2)[-1] if t.name.startswith("blk.") else t.name)
            if want is not None and tuple(t.shape) != want:
                raise MixquantError(
                    f"{config_path}: config.json does not match the weights: {t.name} has shape {list(t.shape)}, "
                    f"the config (hidden_size {e}, {self.n_head} heads, {self.n_head_kv} KV heads, head_dim "
                    f"{head_dim}, intermediate_size {n_ff}, vocab_size {v}) gives {list(want)}")

    def _keep_vocab(self, t: TensorInfo) -> TensorInfo:
        """The token embedding (and output) cut to the GGUF's vocabulary, its first `n_vocab` rows."""
        if t.name not in ("token_embd.weight", "output.weight") or t.shape[0] <= self.n_vocab:
            return t
        self._kept_rows[t.name] = self.n_vocab
        return replace(t, shape=(self.n_vocab, *t.shape[1:]))

    def _first_file(self) -> Path:
        return next(iter(self._entries.values())).file if self._entries else self.path

    def _loader(self, name: str, parts: list[tuple[str, _StEntry]], dims: ModelInfo) -> Callable[[], np.ndarray]:
        """Read one checkpoint tensor (or stack several: experts) and convert it to GGUF values."""
        def load() -> np.ndarray:
            kept = self._kept_rows.get(name)
            xs = [self._read(entry, None if kept is None else slice(0, kept)) for _, entry in parts]
            x = xs[0] if len(xs) == 1 else np.stack(xs)
            x = np.ascontiguousarray(self.adapter.to_gguf(name, x, dims), dtype=np.float32)
            _check_finite(x, f"{name} ({parts[0][0]})", parts[0][1].file)
            return x

        return load

    def _read(self, entry: _StEntry, rows: slice | None = None) -> np.ndarray:
        """The entry's values as float32 (only `rows` of a 2-D one, when given)."""
        mm = self._maps.get(entry.file)
        if mm is None:
            mm = self._maps[entry.file] = np.memmap(entry.file, dtype=np.uint8, mode="r")
        start, nbytes, shape = entry.start, entry.nbytes, entry.shape
        if rows is not None:
            row_bytes = entry.nbytes // entry.shape[0]
            first, last, _ = rows.indices(entry.shape[0])
            start, nbytes, shape = start + first * row_bytes, max(last - first, 0) * row_bytes, \
                (max(last - first, 0), entry.shape[1])
        raw = mm[start : start + nbytes].view(_FLOAT_SAFETENSORS[entry.dtype]).reshape(shape)
        x = bf16_to_f32(raw) if entry.dtype == "BF16" else np.array(raw, dtype=np.float32, order="C")
        _release(mm, start, nbytes)
        return x

    # -- API --------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        self._info(name)
        return self._loaders[name]()

    def tensor_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        self._info(name)
        entry = self._row_entries.get(name)
        if entry is None:
            return super().tensor_rows(name, start, stop)
        x = self._read(entry, slice(start, min(stop, self.shape(name)[0])))
        _check_finite(x, name, entry.file)
        return x

    def source_type(self, name: str) -> str:
        self._info(name)
        return self._types[name]

    @property
    def input_files(self) -> list[Path]:
        return sorted({e.file for e in self._entries.values()})

    def close(self) -> None:
        self._maps.clear()

    @cached_property
    def metadata(self) -> dict[str, GGUFValue]:
        w = gguf.GGUFWriter(None, self.arch)
        total = sum(math.prod(t.shape) for t in self.model.tensors)
        meta = gguf.Metadata.load(None, self.path, None, total)
        if meta.name is None:
            meta.name = self.path.name
        if meta.size_label is None and total > 0:
            meta.size_label = gguf.size_label(total, total, 0, 0)
        w.add_type(gguf.GGUFType.MODEL)
        meta.set_gguf_meta_model(w)
        self._add_hparams(w)
        self._add_vocab(w)
        kv = dict(w.kv_data[0])
        for key in _WRITER_KEYS:
            kv.pop(key, None)
        return kv

    def _add_hparams(self, w: gguf.GGUFWriter) -> None:
        """TextModel.set_gguf_parameters of convert_hf_to_gguf.py, then the family's own keys
        (its model class's set_gguf_parameters: `Adapter.add_hparams`)."""
        hp = self.hparams
        w.add_block_count(self.n_layer)
        if (n_ctx := _find_hparam(hp, ["max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                        "max_sequence_length", "model_max_length"])) is not None:
            w.add_context_length(n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(_find_hparam(hp, ["intermediate_size", "n_inner", "hidden_dim"]))
        w.add_head_count(self.n_head)
        if _find_hparam(hp, ["num_key_value_heads", "n_kv_heads"]) is not None:
            w.add_head_count_kv(self.n_head_kv)
        if hp.get("is_causal") is False:
            w.add_causal_attention(False)
        rope = _rope_parameters(hp)
        rp = rope.get("full_attention", rope)
        if (rope_type := rp.get("rope_type")) is not None:
            factor = rp.get("factor")
            if rope_type == "linear" and factor is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                w.add_rope_scaling_factor(factor)
            elif rope_type == "yarn" and factor is not None:
                w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
                w.add_rope_scaling_factor(factor)
                w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
                if (v := rp.get("extrapolation_factor")) is not None:
                    w.add_rope_scaling_yarn_ext_factor(v)
                if (v := rp.get("attention_factor", rp.get("attn_factor"))) is not None:
                    w.add_rope_scaling_yarn_attn_factor(v)
                if (v := rp.get("beta_fast")) is not None:
                    w.add_rope_scaling_yarn_beta_fast(v)
                if (v := rp.get("beta_slow")) is not None:
                    w.add_rope_scaling_yarn_beta_slow(v)
            elif rope_type in ("su", "longrope"):
                w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
            elif rope_type not in ("default", "dynamic", "llama3"):
                logger.warning("%s: unknown RoPE type %r, written without scaling", self.path, rope_type)
        if (theta := rp.get("rope_theta")) is not None:
            w.add_rope_freq_base(theta)
        if (local_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
            w.add_rope_freq_base_swa(local_theta)
        if (eps := _find_hparam(hp, ["rms_norm_eps", "norm_eps"])) is not None:
            w.add_layer_norm_rms_eps(eps)
        if (n_experts := _find_hparam(hp, ["num_local_experts", "num_experts", "n_routed_experts"])) is not None:
            w.add_expert_count(n_experts)
        if (n_used := _find_hparam(hp, ["num_experts_per_tok", "num_experts_per_token", "top_k_experts"])) is not None:
            w.add_expert_used_count(n_used)
        if (head_dim := hp.get("head_dim")) is not None:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        gguf_log = logging.getLogger("gguf.gguf_writer")
        level = gguf_log.level
        gguf_log.setLevel(logging.ERROR)  # a family rewriting a generic key is expected, not a warning
        try:
            self.adapter.add_hparams(w, hp, self)
        finally:
            gguf_log.setLevel(level)

    def _add_vocab(self, w: gguf.GGUFWriter) -> None:
        """The family's set_vocab (`Adapter.add_vocab`)."""
        folder = self.path
        tokenizer_config = {}
        if (folder / "tokenizer_config.json").is_file():
            tokenizer_config = _read_json(folder / "tokenizer_config.json", "tokenizer_config.json")
        try:
            self.adapter.add_vocab(w, self, tokenizer_config)
        except MixquantError:
            raise
        except Exception as exc:  # noqa: BLE001 - tokenizer libraries raise anything
            raise MixquantError(f"{folder / 'tokenizer.json'}: cannot read the tokenizer: {exc}") from None

    def check_token_ids(self, top: int) -> None:
        """The tokenizer's largest token id `top` must have a row in the GGUF's vocabulary."""
        if top >= self.n_vocab:
            kept = f" ({self.n_vocab} rows kept)" if self.n_vocab != self.vocab_size else ""
            raise MixquantError(f"{self.path / 'tokenizer.json'}: tokenizer has token id {top} but config.json "
                                f"vocab_size is {self.vocab_size}{kept}")

    def _add_vocab_llama_hf(self, w: gguf.GGUFWriter) -> None:
        vocab = gguf.LlamaHfVocab(self.path)
        tokens, scores, toktypes = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            toktypes.append(toktype)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(toktypes)
        gguf.SpecialVocab(self.path, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)

    def _add_vocab_gpt2(self, w: gguf.GGUFWriter) -> None:
        from transformers import AutoTokenizer

        tok_path = self.path / "tokenizer.json"
        tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        vocab = tokenizer.vocab
        vocab_size = self.n_vocab
        self.check_token_ids(max(vocab.values()))
        chkhsh = sha256(str(tokenizer.encode(_CHKTXT)).encode()).hexdigest()
        tokpre = _BPE_PRE.get(chkhsh)
        if tokpre is None:
            warnings.warn(
                f"{tok_path}: BPE pre-tokenizer not recognised (chkhsh {chkhsh}); writing 'default', "
                "llama.cpp may tokenize some text differently",
                stacklevel=3,
            )
            tokpre = "default"
        reverse = {i: t for t, i in vocab.items()}
        added = tokenizer.get_added_vocab()
        decoder = tokenizer.added_tokens_decoder
        tokens: list[str] = []
        toktypes: list[int] = []
        for i in range(vocab_size):
            if i not in reverse:
                tokens.append(f"[PAD{i}]")
                toktypes.append(gguf.TokenType.UNUSED)
                continue
            token = reverse[i]
            if token in added:
                if not decoder[i].normalized:
                    token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
                if decoder[i].special or _looks_special(token):
                    toktypes.append(gguf.TokenType.CONTROL)
                else:
                    token = token.replace("\u2581", " ")
                    toktypes.append(gguf.TokenType.USER_DEFINED)
            else:
                toktypes.append(gguf.TokenType.NORMAL)
            tokens.append(token)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(tokpre)
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        gguf.SpecialVocab(self.path, load_merges=True).add_to_gguf(w, quiet=True)


def _looks_special(token: str) -> bool:
    """TextModel.does_token_look_special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _rope_parameters(hp: dict) -> dict:
    """TextModel.__init__'s rope_parameters: the config's rope dict with top-level values mirrored in."""
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        theta = _find_hparam(hp, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                                  "rotary_emb_base"])
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and (rope_type := rope.get("type")) is not None:
            rope["rope_type"] = rope_type
        if "original_max_position_embeddings" not in rope and hp.get("original_max_position_embeddings") is not None:
            rope["original_max_position_embeddings"] = hp["original_max_position_embeddings"]
    return rope


def _tensor_order(name: str) -> tuple:
    """token_embd and other globals first, then blocks in order, then output_norm, output."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 1 and parts[1].isdecimal():
        return (1, int(parts[1]), name)
    if name.startswith(("output_norm", "output.")):
        return (2, 0, name)
    return (0, 0, name)


# --------------------------------------------------------------------------------------------
# GGUF files


_PLAIN_FLOATS = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}


class GGUFSource(Source):
    """A GGUF file: float tensors read directly, quantized ones dequantized (only if allowed)."""

    kind = "gguf"

    def __init__(self, path: Path, allow_requantize: bool = False):
        self.path = path
        reader = open_gguf(path)
        self._reader = reader
        self._tensors = {t.name: t for t in reader.tensors}

        fields = reader.fields
        arch_field = fields.get(gguf.Keys.General.ARCHITECTURE)
        if arch_field is None:
            raise MixquantError(f"{path}: malformed GGUF: no general.architecture")
        arch = _text(bytes(arch_field.parts[-1])) if arch_field.types == [GGUFValueType.STRING] else None
        if not isinstance(arch, str):
            raise MixquantError(f"{path}: malformed GGUF: general.architecture is not a UTF-8 string")
        self.adapter = arches.for_gguf_arch(arch, path)
        self.arch = arch
        def number(f: Any) -> int:
            """A numeric field's value; of a numeric array (per-layer values), its first item."""
            scalar = f.types[-1] not in (GGUFValueType.STRING, GGUFValueType.ARRAY) if f.types else False
            per_layer = scalar and f.types[0] == GGUFValueType.ARRAY and len(f.types) == 2 and len(f.data) > 0
            v = f.contents(0) if per_layer else f.contents() if scalar and len(f.types) == 1 else None
            if not isinstance(v, (int, float)) or v != v or abs(v) > 2**62:
                raise MixquantError(f"{path}: malformed GGUF: {f.name} is not a number")
            return int(v)

        if (split := fields.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT)) is not None and number(split) > 1:
            raise MixquantError(f"{path}: split GGUF files are not supported; merge them with llama-gguf-split --merge")

        def num(key: str, default: int | None = None) -> int:
            f = fields.get(f"{arch}.{key}")
            if f is None:
                if default is None:
                    raise MixquantError(f"{path}: malformed GGUF: no {arch}.{key}")
                return default
            return number(f)

        n_head = num("attention.head_count")
        infos = [TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
                 for t in reader.tensors]
        self.model = ModelInfo(
            arch=arch, n_layer=num("block_count"), n_head=n_head, n_head_kv=num("attention.head_count_kv", n_head),
            n_expert=num("expert_count", 0), n_embd=num("embedding_length"),
            tied_output="output.weight" not in self._tensors, tensors=infos,
        )

        quantized = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in _PLAIN_FLOATS})
        if quantized:
            if not allow_requantize:
                raise MixquantError(
                    f"{path}: tensors are already quantized ({', '.join(quantized)}); requantizing loses quality, "
                    "so it needs allow_requantize (--allow-requantize)"
                )
            warnings.warn(
                f"{path}: requantizing already-quantized tensors ({', '.join(quantized)}): errors add up; "
                "quantize from the original F32/F16/BF16 weights when you can",
                stacklevel=3,
            )

    def tensor(self, name: str) -> np.ndarray:
        shape = self._info(name).shape
        t = self._tensors[name]
        if t.tensor_type == GGMLQuantizationType.F32:
            x = np.array(t.data, dtype=np.float32, order="C")
        elif t.tensor_type == GGMLQuantizationType.F16:
            x = t.data.astype(np.float32)
        elif t.tensor_type == GGMLQuantizationType.BF16:
            x = bf16_to_f32(np.asarray(t.data).view("<u2"))
        else:
            from . import formats

            cols = shape[-1]
            rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
            try:
                x = formats.dequantize(np.asarray(t.data).reshape(-1), t.tensor_type.name, (rows, cols))
            except ValueError as exc:
                raise MixquantError(f"{self.path}: cannot dequantize tensor {name} ({t.tensor_type.name}): {exc}") from None
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(shape)
        _release(self._reader.data, int(t.data_offset), int(t.n_bytes))
        _check_finite(x, name, self.path)
        return x

    def source_type(self, name: str) -> str:
        self._info(name)
        return self._tensors[name].tensor_type.name

    def raw_data(self, name: str, type_name: str) -> np.ndarray | None:
        self._info(name)
        t = self._tensors[name]
        if t.tensor_type.name != str(type_name).upper():
            return None
        return np.asarray(t.data).reshape(-1).view(np.uint8)

    def close(self) -> None:
        self._tensors.clear()
        self._reader = None

    @cached_property
    def metadata(self) -> dict[str, GGUFValue]:
        kv: dict[str, GGUFValue] = {}
        for key, field in self._reader.fields.items():
            if key.startswith(("GGUF.", "split.")) or key in _WRITER_KEYS or not field.types:
                continue
            vtype = field.types[0]
            if vtype == GGUFValueType.ARRAY:
                sub = field.types[-1]
                if len(field.types) > 2:
                    logger.warning("%s: skipping nested array metadata %s", self.path, key)
                    continue
                if sub == GGUFValueType.STRING:
                    value = [_text(bytes(field.parts[i])) for i in field.data]
                else:
                    value = field.contents()
                if not value:
                    continue
                kv[key] = GGUFValue(value, vtype, sub)
            elif vtype == GGUFValueType.STRING:
                kv[key] = GGUFValue(_text(bytes(field.parts[field.data[0]])), vtype)
            else:
                kv[key] = GGUFValue(field.contents(), vtype)
        return kv


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def open_source(path: str | Path, allow_requantize: bool = False) -> Source:
    """Open a Hugging Face folder or a .gguf file for reading, tensor by tensor."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MixquantError(f"{path}: no such file or folder")
    if path.is_dir():
        return HFSource(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return GGUFSource(path, allow_requantize=allow_requantize)
    if path.name in ("config.json", "model.safetensors.index.json") or path.suffix == ".safetensors":
        return HFSource(path.parent)
    raise MixquantError(f"{path}: neither a GGUF file nor a Hugging Face model folder")


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' loading chatter (progress bars, notices) off while loading a checkpoint."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        tlog.enable_progress_bar()
