"""Fuzz every reader of files mixquant takes from strangers, with hypothesis.

    python tests/fuzz.py --seconds 60 [READER ...]      # `make fuzz` (FUZZ_SECONDS=60)

Each reader gets inputs mutated from a small valid seed file (bytes overwritten, inserted, deleted,
integers replaced by boundary values such as 2^62 or -1, and for JSON whole subtrees replaced by
random JSON) and must either accept the input or raise MixquantError: any other exception is a
crash, printed with the input that caused it (add it to tests/test_fuzz.py as a regression case).
The process runs under an address-space limit (RLIMIT_AS), so an allocation sized by a lying
count fails as MemoryError, which counts as a crash too. Prints executions and seconds per reader.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# what the readers may use beyond the interpreter and its libraries, on top of what is mapped at start
MEMORY_HEADROOM = 2 << 30

_BOUNDARY = [0, 1, 2, 3, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1]


# --------------------------------------------------------------------------------------------
# seeds: one small valid file per reader


def _seed_gguf(folder: Path) -> bytes:
    import gguf
    import numpy as np
    from conftest import gguf_file_bytes

    path = folder / "seed.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(2)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_array("llama.some_ints", [1, 2, 3])
    w.add_tensor("token_embd.weight", np.ones((3, 32), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    return gguf_file_bytes(w, path)


def _seed_safetensors(folder: Path) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    return save({"a.weight": np.ones((4, 8), dtype=np.float32), "b.bias": np.zeros((8,), dtype=np.float16)},
                metadata={"format": "pt"})


def _seed_imatrix(dat: bool) -> bytes:
    import numpy as np

    from mixquant.calibrate import Imatrix, _gguf_bytes, _legacy_bytes

    im = Imatrix(sums={"blk.0.attn_q.weight": np.arange(32, dtype=np.float32),
                       "blk.0.ffn_down.weight": np.ones(64, dtype=np.float32),
                       "blk.1.ffn_up_exps.weight": np.ones(2 * 32, dtype=np.float32)},
                 counts={"blk.0.attn_q.weight": 512, "blk.0.ffn_down.weight": 512, "blk.1.ffn_up_exps.weight": 0},
                 chunks=1, datasets=["calib.txt"], chunk_size=512,
                 expert_counts={"blk.1.ffn_up_exps.weight": [300, 0]})  # a MoE entry, one expert unused
    return _legacy_bytes(im) if dat else _gguf_bytes(im)


def _seed_sensitivity() -> bytes:
    from mixquant.analyze import Sensitivity, TensorSensitivity, TypeCost

    tensors = {
        "blk.0.attn_q.weight": TensorSensitivity("blk.0.attn_q.weight", (64, 64), {
            "Q4_0": TypeCost(2304, 0.01, 0.002, 0.003), "Q8_0": TypeCost(4352, 0.0001)}),
        "blk.0.attn_norm.weight": TensorSensitivity("blk.0.attn_norm.weight", (64,), {"F32": TypeCost(256, 0.0)},
                                                    fixed=True),
    }
    return json.dumps(Sensitivity(tensors, model={"arch": "llama"}).to_dict()).encode()


def _seed_recipe() -> bytes:
    return (ROOT / "mixquant" / "recipes" / "classic.yaml").read_bytes()


_CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
           "vocab_size": 32, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
_TOKENIZER = {"version": "1.0", "model": {"type": "BPE", "vocab": {chr(97 + i): i for i in range(26)}, "merges": []}}


def _hf_folder(folder: Path) -> Path:
    """A one-layer llama folder HFSource reads (the tokenizer is only checked, not run)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(exist_ok=True)
    e, f, v = 64, 128, 32
    shapes = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,)}
    for name, shape in {"input_layernorm": (e,), "post_attention_layernorm": (e,), "self_attn.q_proj": (e, e),
                        "self_attn.k_proj": (32, e), "self_attn.v_proj": (32, e), "self_attn.o_proj": (e, e),
                        "mlp.gate_proj": (f, e), "mlp.up_proj": (f, e), "mlp.down_proj": (e, f)}.items():
        shapes[f"model.layers.0.{name}.weight"] = shape
    save_file({n: np.ones(s, dtype=np.float16) for n, s in shapes.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(_CONFIG))
    (folder / "tokenizer.json").write_text(json.dumps(_TOKENIZER))
    return folder


# --------------------------------------------------------------------------------------------
# the readers: bytes in, MixquantError or a result out


def _gguf_reader(path: Path) -> None:
    from mixquant.source import open_source

    with open_source(path, allow_requantize=True) as src:
        src.metadata  # noqa: B018 - every metadata value decoded
        for t in src.model.tensors[:4]:
            src.tensor(t.name)


def _safetensors_reader(path: Path) -> None:
    from mixquant.source import _scan_safetensors

    _scan_safetensors(path)


def _imatrix_reader(path: Path) -> None:
    from mixquant.calibrate import read_imatrix

    read_imatrix(path).as_dict()


def _sensitivity_reader(path: Path) -> None:
    from mixquant.analyze import Sensitivity

    Sensitivity.load(path)


def _recipe_reader(path: Path) -> None:
    from mixquant.plan import ModelInfo, TensorInfo
    from mixquant.recipe import load_recipe

    model = ModelInfo(arch="llama", n_layer=1, n_head=4, n_head_kv=2, n_expert=0, n_embd=64, tied_output=True,
                      tensors=(TensorInfo("token_embd.weight", (32, 64), "F16"),
                               TensorInfo("blk.0.attn_q.weight", (64, 64), "F16"),
                               TensorInfo("blk.0.ffn_down.weight", (64, 128), "F16")))
    load_recipe(path).plan(model)


def _hf_reader(member: str) -> Callable[[Path], None]:
    def read(path: Path) -> None:
        from mixquant.source import HFSource

        HFSource(path.parent)

    return read


class Target:
    def __init__(self, name: str, file_name: str, seed: Callable[[Path], bytes], read: Callable[[Path], None],
                 is_json: bool = False):
        self.name, self.file_name, self.seed, self.read, self.is_json = name, file_name, seed, read, is_json


TARGETS = {t.name: t for t in [
    Target("gguf", "x.gguf", _seed_gguf, _gguf_reader),
    Target("safetensors", "x.safetensors", _seed_safetensors, _safetensors_reader),
    Target("imatrix-gguf", "imatrix.gguf", lambda d: _seed_imatrix(False), _imatrix_reader),
    Target("imatrix-dat", "imatrix.dat", lambda d: _seed_imatrix(True), _imatrix_reader),
    Target("sensitivity", "sensitivity.json", lambda d: _seed_sensitivity(), _sensitivity_reader, is_json=True),
    Target("recipe", "recipe.yaml", lambda d: _seed_recipe(), _recipe_reader),
    Target("config", "model/config.json", lambda d: json.dumps(_CONFIG).encode(), _hf_reader("config.json"),
           is_json=True),
    Target("tokenizer", "model/tokenizer.json", lambda d: json.dumps(_TOKENIZER).encode(),
           _hf_reader("tokenizer.json"), is_json=True),
]}


# --------------------------------------------------------------------------------------------
# mutation


def _strategies():
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.sampled_from(_BOUNDARY)
        | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
        lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
        max_leaves=20)

    @st.composite
    def mutated(draw, seed: bytes, is_json: bool) -> bytes:
        if is_json and draw(st.booleans()):
            doc = json.loads(seed)
            for _ in range(draw(st.integers(1, 3))):
                node = doc
                for _ in range(draw(st.integers(0, 4))):  # down to a random container
                    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
                    containers = [c for c in children if isinstance(c, (dict, list))]
                    if not containers:
                        break
                    node = draw(st.sampled_from(containers))
                if isinstance(node, dict):
                    new_key = st.text(max_size=10)
                    key = draw(st.sampled_from(sorted(node)) | new_key if node else new_key)
                    node[key] = draw(json_values)
                elif isinstance(node, list) and node:
                    node[draw(st.integers(0, len(node) - 1))] = draw(json_values)
            return json.dumps(doc).encode()
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 6))):
            op = draw(st.sampled_from(["int", "int", "byte", "insert", "delete", "truncate"]))
            pos = draw(st.integers(0, max(len(data) - 1, 0)))
            if op == "int" and len(data) >= 8:
                pos = min(pos, len(data) - 8)
                fmt = draw(st.sampled_from(["<Q", "<I", "<q", "<i"]))
                value = draw(st.sampled_from(_BOUNDARY) | st.integers(0, 2**16))
                size = struct.calcsize(fmt)
                value = value % (2 ** (8 * size))
                if fmt in ("<q", "<i") and value >= 2 ** (8 * size - 1):
                    value -= 2 ** (8 * size)
                data[pos : pos + size] = struct.pack(fmt, value)
            elif op == "byte" and data:
                data[pos] = draw(st.integers(0, 255))
            elif op == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            elif op == "delete":
                del data[pos : pos + draw(st.integers(1, 16))]
            elif op == "truncate":
                del data[pos:]
        return bytes(data)

    return mutated


# --------------------------------------------------------------------------------------------
# running


class Crash(Exception):
    pass


def fuzz(target: Target, seconds: float, workdir: Path) -> tuple[int, float, list[tuple[bytes, str]]]:
    """Run `target` for about `seconds`; (executions, seconds, crashes as (input, traceback))."""
    from hypothesis import HealthCheck, given, settings

    from mixquant.errors import MixquantError

    folder = workdir / target.name
    folder.mkdir()
    if target.file_name.startswith("model/"):
        _hf_folder(folder / "model")
    seed = target.seed(folder)
    path = folder / target.file_name
    mutated = _strategies()
    crashes: list[tuple[bytes, str]] = []
    executions = 0

    @settings(max_examples=200, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(mutated(seed, target.is_json))
    def one(data: bytes) -> None:
        nonlocal executions
        executions += 1
        path.write_bytes(data)
        try:
            target.read(path)
        except MixquantError:
            pass
        except Exception:  # noqa: BLE001 - what this looks for
            tb = traceback.format_exc(limit=-3)
            if all(tb.splitlines()[-1] != seen.splitlines()[-1] for _, seen in crashes):
                crashes.append((data, tb))
            raise Crash() from None

    start = time.monotonic()
    path.write_bytes(seed)
    target.read(path)  # the seed itself is valid
    while time.monotonic() - start < seconds and len(crashes) < 5:
        try:
            one()
        except Crash:
            pass
        except Exception:  # noqa: BLE001 - hypothesis reporting the shrunk failure
            pass
    return executions, time.monotonic() - start, crashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readers", nargs="*", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("FUZZ_SECONDS", 60)),
                        help="per reader (default $FUZZ_SECONDS or 60)")
    args = parser.parse_args(argv)
    names = args.readers or list(TARGETS)
    import mixquant.analyze  # noqa: F401 - imported before the limit: numba, numpy, gguf, yaml
    import mixquant.calibrate  # noqa: F401
    import mixquant.recipe  # noqa: F401
    import mixquant.source  # noqa: F401, I001

    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    limit = vm + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(f"address space limited to {limit / 2**30:.1f} GiB ({MEMORY_HEADROOM / 2**30:.0f} GiB above the start)")
    print(f"{'reader':<14} {'executions':>10} {'seconds':>8} {'exec/s':>8} {'crashes':>8}")
    failed = False
    with tempfile.TemporaryDirectory() as work:
        for name in names:
            n, secs, crashes = fuzz(TARGETS[name], args.seconds, Path(work))
            print(f"{name:<14} {n:>10} {secs:>8.1f} {n / secs:>8.0f} {len(crashes):>8}", flush=True)
            for data, tb in crashes[:3]:
                failed = True
                print(f"  crash on {data[:200]!r}{'...' if len(data) > 200 else ''} ({len(data)} bytes)\n{tb}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
