"""Hostile input: every command and every reader, fed malformed or malicious files and arguments.

For each case: exit status 1, exactly one `mixquant: error: ...` line on stderr (other lines only
one-line warnings), no traceback, no file left behind, every input byte-identical afterwards.
Cases run in-process through mixquant.cli.main (fast); those that check memory, signals or the
real stderr of a process run as subprocesses, whose own peak RSS (VmHWM) must stay under
MEMORY_BOUND_MB. Everything is generated here from a tiny random llama (no large files).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import gguf_file_bytes, make_tiny_llama, random_text

ROOT = Path(__file__).resolve().parents[1]
# peak RSS of one `mixquant` process on a hostile input: the readers and their imports take about
# 150 MB (measured: every memory case below stops there), a whole quantize of the tiny model with
# transformers loaded about 450 MB; a reader that believed a 2^62 count would go far past it
MEMORY_BOUND_MB = 600
# how much one in-process case may raise this process's peak RSS
IN_PROCESS_GROWTH_MB = 300
CTX = ["--ctx", "16"]


# --------------------------------------------------------------------------------------------
# the world: a tiny model and every file the commands read


class World:
    def __init__(self, root: Path):
        from mixquant.analyze import Sensitivity, TensorSensitivity, TypeCost
        from mixquant.cli import main
        from mixquant import formats
        from mixquant.source import open_source

        self.root = root
        self.model = make_tiny_llama(root / "model", vocab_size=300, intermediate_size=256, tie_word_embeddings=True)
        self.other = make_tiny_llama(root / "other", vocab_size=280, intermediate_size=128, tie_word_embeddings=False)
        self.text = root / "calib.txt"
        self.text.write_text(random_text(1500, 1))
        self.gguf = root / "model-q8.gguf"
        self.imatrix = root / "imatrix.gguf"
        self.other_gguf = root / "other-q8.gguf"
        self.other_imatrix = root / "other-imatrix.gguf"
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            for src, out in ((self.model, self.gguf), (self.other, self.other_gguf)):
                assert main(["quantize", str(src), str(out), "Q8_0", "--threads", "1"]) == 0
            for src, out in ((self.model, self.imatrix), (self.other, self.other_imatrix)):
                assert main(["imatrix", str(src), "--text", str(self.text), "-o", str(out), *CTX, "--chunks", "2"]) == 0
        from mixquant.calibrate import read_imatrix, write_imatrix

        self.imatrix_dat = write_imatrix(read_imatrix(self.imatrix), root / "imatrix.dat")
        with open_source(self.model) as src:
            tensors = {}
            for t in src.model.tensors:
                rows, cols = int(np.prod(t.shape[:-1])), t.shape[-1]
                if len(t.shape) == 1 or t.name.endswith("_norm.weight"):
                    tensors[t.name] = TensorSensitivity(t.name, t.shape, {"F32": TypeCost(4 * rows * cols, 0.0)},
                                                        fixed=True)
                else:
                    tensors[t.name] = TensorSensitivity(t.name, t.shape, {
                        typ: TypeCost(formats.quantized_size(typ, (rows, cols)), err)
                        for typ, err in (("Q4_0", 1e-2), ("Q8_0", 1e-4), ("F16", 1e-7))})
        self.sensitivity = Sensitivity(tensors=tensors, model={"arch": "llama", "n_layer": 2},
                                       settings={"measure": "none"}).save(root / "sensitivity.json")
        self.recipe = root / "recipe.yaml"
        self.recipe.write_text("rules:\n  - name: '*.ffn_down.weight'\n    type: Q8_0\ndefault: Q4_0\n")
        self.cases = root / "cases"
        self.cases.mkdir()

    def case_dir(self, name: str) -> Path:
        d = self.cases / name
        d.mkdir()
        return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MIXQUANT_CACHE")
    os.environ["MIXQUANT_CACHE"] = str(cache)  # the eval reference of the tiny model goes here
    try:
        yield World(tmp_path_factory.mktemp("hostile"))
    finally:
        if old is None:
            os.environ.pop("MIXQUANT_CACHE", None)
        else:
            os.environ["MIXQUANT_CACHE"] = old


# --------------------------------------------------------------------------------------------
# the checks


def _snapshot(root: Path) -> dict[str, str]:
    """path -> sha256 (or the kind, for what is not a regular file) of everything under root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
            else:
                out[str(p)] = "special"
    return out


def _check_stderr(err: str) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("mixquant: error: ")]
    assert len(errors) == 1, err
    assert all(line.startswith(("mixquant: error: ", "mixquant: warning: ")) for line in lines), err


def run_in_process(world: World, argv: list[str]) -> str:
    """main(argv) must fail cleanly, changing nothing on disk; returns its error line."""
    from mixquant.cli import main

    before = _snapshot(world.root)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    assert code == 1, (argv, err.getvalue(), out.getvalue())
    _check_stderr(err.getvalue())
    assert _snapshot(world.root) == before, "a file was changed, created or left behind"
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    assert grown < IN_PROCESS_GROWTH_MB, f"peak RSS grew by {grown:.0f} MB"
    return err.getvalue().splitlines()[-1]


# The child reports its own peak RSS (VmHWM, which exec resets): wait4's ru_maxrss would include
# the peak RSS of this pytest process, which the child inherits through fork+exec on Linux.
_CHILD = """
import atexit, os, sys
def _report():
    with open("/proc/self/status") as fh:
        kb = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(os.environ["MIXQUANT_TEST_HWM"], "w") as fh:
        fh.write(kb)
atexit.register(_report)
sys.argv[0] = "mixquant"
from mixquant.cli import run
run()
"""


def run_subprocess(argv: list[str], *, timeout: float = 120) -> tuple[int, str, float]:
    """(exit status, stderr, peak RSS in MB) of `mixquant argv` in a fresh process."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        hwm = Path(scratch) / "hwm"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MIXQUANT_TEST_HWM": str(hwm)}
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, argv)], env=env, timeout=timeout,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"mixquant {argv} ran past {timeout} s") from None
        return proc.returncode, proc.stderr, int(hwm.read_text()) / 1024


# --------------------------------------------------------------------------------------------
# hostile files


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    raw = struct.pack("<" + fmt, value)
    return data[:offset] + raw + data[offset + len(raw):]


def _key_end(data: bytes, key: str) -> int:
    needle = struct.pack("<Q", len(key)) + key.encode()
    i = data.index(needle)
    return i + len(needle)


def _tensor_info(data: bytes, name: str) -> int:
    """Offset of the n_dims field of tensor `name`'s info."""
    return _key_end(data, name)


def small_gguf(path: Path, *, array_key: str = "hostile.array") -> bytes:
    """A tiny valid GGUF (gguf's writer): one array, one string, one F32 tensor."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_array(array_key, [1, 2, 3])
    w.add_string("hostile.string", "abc")
    w.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    return gguf_file_bytes(w, path)


def gguf_variants(valid: bytes, small: bytes) -> dict[str, bytes]:
    """Malformed GGUF files: truncations of a real model file and header fields that lie."""
    v = {
        "empty": b"",
        "magic_only": b"GGUF",
        "bad_version": _patch(valid, 4, "I", 99),
        "tensor_count_2e62": _patch(valid, 8, "Q", 2**62),
        "kv_count_2e62": _patch(valid, 16, "Q", 2**62),
        "kv_count_negative": _patch(valid, 16, "q", -1),
        "array_len_2e62": _patch(small, _key_end(small, "hostile.array") + 8, "Q", 2**62),
        "array_len_2e62_strings": _patch(valid, _key_end(valid, "tokenizer.ggml.tokens") + 8, "Q", 2**62),
        "array_of_unknown_type": _patch(small, _key_end(small, "hostile.array") + 4, "I", 77),
        "string_len_2e62": _patch(small, _key_end(small, "hostile.string") + 4, "Q", 2**62),
        "value_type_unknown": _patch(small, _key_end(small, "hostile.string"), "I", 1234),
        "key_len_2e62": _patch(small, 24, "Q", 2**62),
        "n_dims_1000": _patch(small, _tensor_info(small, "token_embd.weight"), "I", 1000),
        "dims_overflow": _patch(_patch(small, _tensor_info(small, "token_embd.weight") + 4, "Q", 2**63),
                                _tensor_info(small, "token_embd.weight") + 12, "Q", 2**63),
        "tensor_type_unknown": _patch(small, _tensor_info(small, "token_embd.weight") + 4 + 16, "I", 250),
        "tensor_offset_past_end": _patch(small, _tensor_info(small, "token_embd.weight") + 4 + 16 + 4, "Q", 2**40),
        "random_bytes": b"GGUF" + random.Random(3).randbytes(2000),
    }
    for frac in (0.001, 0.01, 0.1, 0.3, 0.5, 0.9, 0.999):
        v[f"truncated_{frac}"] = valid[: int(len(valid) * frac)]
    return v


def bad_alignment_gguf(path: Path) -> bytes:
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("general.alignment", 3)
    w.add_tensor("token_embd.weight", np.ones((4, 32), dtype=np.float32))
    return gguf_file_bytes(w, path)


def _deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def _deep_object(key: str, depth: int = 100_000) -> bytes:
    return b'{"' + key.encode() + b'": ' + b"[" * depth + b"]" * depth + b"}"


def _config(world: World, **changes) -> bytes:
    cfg = json.loads((world.model / "config.json").read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


def _safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def model_variants(world: World) -> dict[str, dict[str, bytes | None]]:
    """A copy of the tiny model folder with one file replaced (None: removed)."""
    st = (world.model / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", st[:8])
    header = json.loads(st[8 : 8 + n])
    data = st[8 + n :]
    name = "model.layers.0.mlp.down_proj.weight"

    def with_entry(**changes) -> bytes:
        h = json.loads(json.dumps(header))
        h[name].update(changes)
        return _safetensors(h, data)

    transposed = json.loads(json.dumps(header))
    transposed[name]["shape"] = list(reversed(header[name]["shape"]))
    nan_data = bytearray(data)
    begin = header[name]["data_offsets"][0]
    nan_data[begin : begin + 4] = struct.pack("<f", float("nan"))
    tok = json.loads((world.model / "tokenizer.json").read_text())
    big_id = json.loads(json.dumps(tok))
    big_id["model"]["vocab"]["zzz"] = 10**6
    return {
        "config_missing": {"config.json": None},
        "config_not_json": {"config.json": b"{not json"},
        "config_deep": {"config.json": _deep_json()},
        "config_deep_value": {"config.json": _deep_object("architectures")},
        "config_list": {"config.json": b"[1, 2]"},
        "config_not_utf8": {"config.json": b"\xff\xfe{}"},
        "config_layers_1e9": {"config.json": _config(world, num_hidden_layers=1_000_000_000)},
        "config_layers_zero": {"config.json": _config(world, num_hidden_layers=0)},
        "config_layers_string": {"config.json": _config(world, num_hidden_layers="2")},
        "config_layers_bool": {"config.json": _config(world, num_hidden_layers=True)},
        "config_layers_3": {"config.json": _config(world, num_hidden_layers=3)},
        "config_heads_wrong": {"config.json": _config(world, num_attention_heads=8, head_dim=None)},
        "config_kv_heads_wrong": {"config.json": _config(world, num_key_value_heads=4)},
        "config_head_dim_wrong": {"config.json": _config(world, head_dim=8)},
        "config_vocab_wrong": {"config.json": _config(world, vocab_size=301)},
        "config_vocab_1e12": {"config.json": _config(world, vocab_size=10**12)},
        "config_hidden_wrong": {"config.json": _config(world, hidden_size=128)},
        "config_ffn_wrong": {"config.json": _config(world, intermediate_size=512)},
        "config_arch_unknown": {"config.json": _config(world, architectures=["GPT2LMHeadModel"])},
        "config_arch_not_list": {"config.json": _config(world, architectures="LlamaForCausalLM")},
        "config_no_arch": {"config.json": _config(world, architectures=None, model_type=None)},
        "tokenizer_missing": {"tokenizer.json": None},
        "tokenizer_not_json": {"tokenizer.json": b"\x00\x01"},
        "tokenizer_deep": {"tokenizer.json": _deep_json()},
        "tokenizer_deep_value": {"tokenizer.json": _deep_object("model")},
        "tokenizer_no_vocab": {"tokenizer.json": b'{"model": {}}'},
        "tokenizer_id_past_vocab": {"tokenizer.json": json.dumps(big_id).encode()},
        "tokenizer_config_deep": {"tokenizer_config.json": _deep_json()},
        "tokenizer_config_list": {"tokenizer_config.json": b"[]"},
        "st_missing": {"model.safetensors": None},
        "st_empty": {"model.safetensors": b""},
        "st_header_len_huge": {"model.safetensors": struct.pack("<Q", 2**63) + st[8:]},
        "st_header_truncated": {"model.safetensors": st[: 8 + n // 2]},
        "st_data_truncated": {"model.safetensors": st[: len(st) - 1000]},
        "st_header_deep": {"model.safetensors": _safetensors(_deep_json())},
        "st_header_deep_value": {"model.safetensors": _safetensors(_deep_object(name))},
        "st_header_list": {"model.safetensors": _safetensors(b"[]", data)},
        "st_header_not_utf8": {"model.safetensors": _safetensors(b"\xff\xfe", data)},
        "st_entry_not_object": {"model.safetensors": _safetensors({**header, name: 5}, data)},
        "st_dtype_int": {"model.safetensors": with_entry(dtype="I32")},
        "st_dtype_unknown": {"model.safetensors": with_entry(dtype="Q9_X")},
        "st_offsets_past_end": {"model.safetensors": with_entry(data_offsets=[0, 2**62])},
        "st_offsets_reversed": {"model.safetensors": with_entry(data_offsets=[100, 50])},
        "st_offsets_negative": {"model.safetensors": with_entry(data_offsets=[-64, 0])},
        "st_shape_disagrees": {"model.safetensors": with_entry(shape=[64, 64])},
        "st_shape_huge": {"model.safetensors": with_entry(shape=[2**40, 2**40])},
        "st_shape_negative": {"model.safetensors": with_entry(shape=[-1, 256])},
        "st_transposed": {"model.safetensors": _safetensors(transposed, data)},
        "st_nan_weight": {"model.safetensors": _safetensors(header, bytes(nan_data))},
        "st_tensor_missing": {"model.safetensors": _safetensors({k: v for k, v in header.items() if k != name}, data)},
        "st_unmappable_tensor": {"model.safetensors": _safetensors({**header, "model.evil": header[name]}, data)},
        "index_no_weight_map": {"model.safetensors.index.json": b'{"metadata": {}}'},
        "index_missing_shard": {"model.safetensors.index.json":
                                json.dumps({"weight_map": {name: "model-00002.safetensors"}}).encode()},
        "index_deep": {"model.safetensors.index.json": _deep_json()},
        "only_pickle": {"model.safetensors": None, "pytorch_model.bin": b"\x80\x04not really a pickle"},
    }


def imatrix_variants(world: World) -> dict[str, bytes]:
    from mixquant.calibrate import Imatrix, _gguf_bytes, read_imatrix

    good = world.imatrix.read_bytes()
    im = read_imatrix(world.imatrix)
    first = im.names[0]

    def changed(**kw) -> bytes:
        d = dict(sums=dict(im.sums), counts=dict(im.counts), chunks=im.chunks, datasets=list(im.datasets),
                 chunk_size=im.chunk_size)
        d.update(kw)
        return _gguf_bytes(Imatrix(**d))

    nan_sums = dict(im.sums)
    nan_sums[first] = np.full_like(im.sums[first], np.nan)
    neg_sums = dict(im.sums)
    neg_sums[first] = -np.ones_like(im.sums[first])
    short = dict(im.sums)
    short[first] = im.sums[first][:32]
    renamed = {n.replace("blk.", "layers."): v for n, v in im.sums.items()}
    dat = world.imatrix_dat.read_bytes()
    return {
        "empty": b"",
        "garbage": random.Random(5).randbytes(3000),
        "truncated_gguf": good[: len(good) // 2],
        "gguf_header_only": good[:24],
        "datasets_len_2e62": _patch(good, _key_end(good, "imatrix.datasets") + 8, "Q", 2**62),
        "kv_count_2e62": _patch(good, 16, "Q", 2**62),
        "nan_sums": changed(sums=nan_sums),
        "negative_sums": changed(sums=neg_sums),
        "another_model_names": changed(sums=renamed,
                                       counts={n.replace("blk.", "layers."): c for n, c in im.counts.items()}),
        "another_model_columns": changed(sums=short),
        "model_gguf_as_imatrix": world.gguf.read_bytes(),
        "another_models_imatrix": world.other_imatrix.read_bytes(),
        "dat_entries_2e31": _patch(dat, 0, "i", 2**31 - 1),
        "dat_name_len_negative": _patch(dat, 4, "i", -5),
        "dat_name_len_huge": _patch(dat, 4, "i", 2**31 - 1),
        "dat_truncated": dat[: len(dat) // 3],
        "dat_trailing_garbage": dat + b"xyz",
    }


def sensitivity_variants(world: World) -> dict[str, bytes]:
    good = json.loads(world.sensitivity.read_text())
    quantizable = next(n for n, t in good["tensors"].items() if not t.get("fixed"))

    def changed(fn) -> bytes:
        d = json.loads(json.dumps(good))
        fn(d)
        return json.dumps(d).encode()

    def set_cost(key, value):
        return changed(lambda d: d["tensors"][quantizable]["types"]["Q4_0"].__setitem__(key, value))

    return {
        "empty": b"",
        "not_json": b"{",
        "deep": _deep_json(),
        "deep_value": _deep_object("tensors"),
        "list": b"[]",
        "schema_unknown": changed(lambda d: d.__setitem__("schema", "other/9")),
        "tensors_not_object": changed(lambda d: d.__setitem__("tensors", [1])),
        "bytes_disagree": set_cost("bytes", 10),
        "bytes_negative": set_cost("bytes", -1),
        "predicted_negative": set_cost("predicted", -1.0),
        "predicted_nan": set_cost("predicted", float("nan")),
        "predicted_inf": set_cost("predicted", float("inf")),
        "measured_negative": set_cost("measured", -0.5),
        "fisher_nan": set_cost("fisher", float("nan")),
        "type_unknown": changed(lambda d: d["tensors"][quantizable]["types"].__setitem__(
            "Q9_Z", {"bytes": 1, "predicted": 0.1})),
        "shape_another_model": changed(lambda d: d["tensors"][quantizable].__setitem__("shape", [128, 64])),
        "tensor_another_model": changed(lambda d: d["tensors"].__setitem__("blk.7.attn_q.weight",
                                                                           d["tensors"].pop(quantizable))),
        "tensor_missing": changed(lambda d: d["tensors"].pop(quantizable)),
        "shape_huge": changed(lambda d: d["tensors"][quantizable].__setitem__("shape", [2**62, 2**62])),
        "no_types": changed(lambda d: d["tensors"][quantizable].__setitem__("types", {})),
    }


_BOMB = "a: &a ['x','x','x','x','x','x','x','x','x']\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "rules: *i\n"


def recipe_variants() -> dict[str, bytes]:
    return {
        "alias_bomb": _BOMB.encode(),
        "self_alias": b"rules: &a [*a]\n",
        "deep": b"rules: " + b"[" * 10_000 + b"]" * 10_000,
        "not_yaml": b"rules: [\n  - {",
        "not_utf8": b"\xff\xfe rules",
        "python_object": b"rules: !!python/object/apply:os.system ['touch /tmp/mixquant-pwned']\n",
        "huge": b"# " + b"x" * (2 << 20),
        "rules_not_list": b"rules: 5\n",
        "rule_bad_type": b"rules:\n  - name: '*'\n    type: Q9_Z\n",
        "rule_bad_regex": b"rules:\n  - regex: '(['\n    type: Q4_0\n",
        "unknown_key": b"evil: 1\n",
    }


def text_variants() -> dict[str, bytes]:
    return {"empty": b"", "not_utf8": b"\xff\xfe\xfd" * 100, "too_short": b"one two three\n"}


# --------------------------------------------------------------------------------------------
# the cases


def _write(d: Path, name: str, data: bytes) -> Path:
    p = d / name
    p.write_bytes(data)
    return p


def _model_copy(world: World, d: Path, replace: dict[str, bytes | None]) -> Path:
    folder = d / "model"
    folder.mkdir()
    for f in world.model.iterdir():
        if f.name not in replace:
            (folder / f.name).write_bytes(f.read_bytes())
    for name, data in replace.items():
        if data is not None:
            (folder / name).write_bytes(data)
    return folder


QUANT = ["Q8_0", "--threads", "1"]


def _commands(world: World, model: Path, out: Path) -> dict[str, list]:
    """Each command reading `model`, writing (if anything) under out's folder."""
    t = world.text
    return {
        "quantize": ["quantize", model, out / "out.gguf", *QUANT],
        "imatrix": ["imatrix", model, "--text", t, "-o", out / "im.gguf", *CTX, "--chunks", "2"],
        "analyze": ["analyze", model, "--text", t, "-o", out / "analysis", *CTX, "--chunks", "2", "--windows", "1",
                    "--types", "Q8_0", "--sweep-types", "", "--no-fisher", "--no-report"],
        "eval": ["eval", model, "--plan", "Q8_0", "--text", t, *CTX, "--chunks", "2"],
        "compare": ["compare", model, "Q8_0", "--text", t, *CTX, "--chunks", "2"],
        "formats": ["formats", "--model", model, "--types", "Q8_0", "--layer", "0"],
    }


# model folder variants: read by every command that opens a model (quantize reads the most)
_MODEL_VARIANTS = [
    "config_missing", "config_not_json", "config_deep", "config_deep_value", "config_list", "config_not_utf8",
    "config_layers_1e9", "config_layers_zero", "config_layers_string", "config_layers_bool", "config_layers_3",
    "config_heads_wrong", "config_kv_heads_wrong", "config_head_dim_wrong", "config_vocab_wrong",
    "config_vocab_1e12", "config_hidden_wrong", "config_ffn_wrong", "config_arch_unknown", "config_arch_not_list",
    "config_no_arch", "tokenizer_missing", "tokenizer_not_json", "tokenizer_deep", "tokenizer_deep_value",
    "tokenizer_no_vocab", "tokenizer_id_past_vocab", "tokenizer_config_deep", "tokenizer_config_list",
    "st_missing", "st_empty", "st_header_len_huge", "st_header_truncated", "st_data_truncated", "st_header_deep",
    "st_header_deep_value", "st_header_list", "st_header_not_utf8", "st_entry_not_object", "st_dtype_int",
    "st_dtype_unknown", "st_offsets_past_end", "st_offsets_reversed", "st_offsets_negative", "st_shape_disagrees",
    "st_shape_huge", "st_shape_negative", "st_transposed", "st_nan_weight", "st_tensor_missing",
    "st_unmappable_tensor", "index_no_weight_map", "index_missing_shard", "index_deep", "only_pickle",
]


@pytest.mark.parametrize("variant", _MODEL_VARIANTS)
def test_hostile_model_folder_quantize(world, variant):
    d = world.case_dir(f"model-{variant}")
    model = _model_copy(world, d, model_variants(world)[variant])
    run_in_process(world, _commands(world, model, d)["quantize"])


# the same folders through the other commands: one config, one safetensors and one tokenizer case each
@pytest.mark.parametrize("command", ["imatrix", "analyze", "eval", "compare", "formats"])
@pytest.mark.parametrize("variant", ["config_vocab_wrong", "st_header_deep", "tokenizer_deep", "config_layers_1e9"])
def test_hostile_model_folder_other_commands(world, command, variant):
    d = world.case_dir(f"model-{command}-{variant}")
    model = _model_copy(world, d, model_variants(world)[variant])
    run_in_process(world, _commands(world, model, d)[command])


_GGUF_VARIANTS = ["empty", "magic_only", "bad_version", "tensor_count_2e62", "kv_count_2e62", "kv_count_negative",
                  "array_len_2e62", "array_len_2e62_strings", "array_of_unknown_type", "string_len_2e62",
                  "value_type_unknown", "key_len_2e62", "n_dims_1000", "dims_overflow", "tensor_type_unknown",
                  "tensor_offset_past_end", "bad_alignment", "random_bytes", "truncated_0.001", "truncated_0.01",
                  "truncated_0.1", "truncated_0.3", "truncated_0.5", "truncated_0.9", "truncated_0.999"]


def _gguf_variant(world: World, d: Path, variant: str) -> Path:
    if variant == "bad_alignment":
        data = bad_alignment_gguf(d / "scratch.gguf")
    else:
        data = gguf_variants(world.gguf.read_bytes(), small_gguf(d / "scratch.gguf"))[variant]
    (d / "scratch.gguf").unlink()
    return _write(d, "hostile.gguf", data)


@pytest.mark.parametrize("variant", _GGUF_VARIANTS)
def test_hostile_gguf_source(world, variant):
    """A GGUF as quantize's source (and, for a few, as eval's --gguf and a compare item)."""
    d = world.case_dir(f"gguf-{variant}")
    path = _gguf_variant(world, d, variant)
    run_in_process(world, ["quantize", path, d / "out.gguf", *QUANT, "--allow-requantize"])
    if variant in ("array_len_2e62", "tensor_count_2e62", "truncated_0.5", "dims_overflow"):
        run_in_process(world, ["eval", world.model, "--gguf", path, "--text", world.text, *CTX, "--chunks", "2"])
        run_in_process(world, ["compare", world.model, path, "--text", world.text, *CTX, "--chunks", "2"])


def test_hostile_gguf_of_another_model(world):
    run_in_process(world, ["eval", world.model, "--gguf", world.other_gguf, "--text", world.text, *CTX,
                           "--chunks", "2"])


@pytest.mark.parametrize("variant", ["empty", "garbage", "truncated_gguf", "gguf_header_only", "datasets_len_2e62",
                                     "kv_count_2e62", "nan_sums", "negative_sums", "another_model_names",
                                     "another_model_columns", "model_gguf_as_imatrix", "another_models_imatrix",
                                     "dat_entries_2e31", "dat_name_len_negative", "dat_name_len_huge",
                                     "dat_truncated", "dat_trailing_garbage"])
def test_hostile_imatrix(world, variant):
    d = world.case_dir(f"imatrix-{variant}")
    path = _write(d, "im.dat" if variant.startswith("dat_") else "im.gguf", imatrix_variants(world)[variant])
    run_in_process(world, ["quantize", world.model, d / "out.gguf", "Q4_K_M", "--threads", "1", "--imatrix", path])
    if variant in ("another_model_names", "another_models_imatrix", "datasets_len_2e62"):
        run_in_process(world, ["eval", world.model, "--plan", "IQ4_XS", "--imatrix", path, "--text", world.text,
                               *CTX, "--chunks", "2"])
        run_in_process(world, ["compare", world.model, "IQ4_XS", "--imatrix", path, "--text", world.text,
                               *CTX, "--chunks", "2"])


@pytest.mark.parametrize("variant", ["empty", "not_json", "deep", "deep_value", "list", "schema_unknown",
                                     "tensors_not_object", "bytes_disagree", "bytes_negative", "predicted_negative",
                                     "predicted_nan", "predicted_inf", "measured_negative", "fisher_nan",
                                     "type_unknown", "shape_another_model", "tensor_another_model", "tensor_missing",
                                     "shape_huge", "no_types"])
def test_hostile_sensitivity(world, variant):
    d = world.case_dir(f"sens-{variant}")
    path = _write(d, "sensitivity.json", sensitivity_variants(world)[variant])
    run_in_process(world, ["quantize", world.model, d / "out.gguf", "--target-bpw", "5", "--sensitivity", path,
                           "--threads", "1"])


@pytest.mark.parametrize("variant", list(recipe_variants()))
def test_hostile_recipe(world, variant):
    d = world.case_dir(f"recipe-{variant}")
    path = _write(d, "recipe.yaml", recipe_variants()[variant])
    run_in_process(world, ["quantize", world.model, d / "out.gguf", "--recipe", path, "--threads", "1"])
    assert not Path("/tmp/mixquant-pwned").exists()


@pytest.mark.parametrize("command", ["imatrix", "analyze", "eval"])
@pytest.mark.parametrize("variant", list(text_variants()))
def test_hostile_text(world, command, variant):
    d = world.case_dir(f"text-{command}-{variant}")
    path = _write(d, "text.txt", text_variants()[variant])
    argv = [a if a != world.text else path for a in _commands(world, world.model, d)[command]]
    run_in_process(world, argv)


_BAD_ARGS = {
    "target_bpw_inf": ["--target-bpw", "inf", "--sensitivity", "{sens}"],
    "target_bpw_nan": ["--target-bpw", "nan", "--sensitivity", "{sens}"],
    "target_bpw_negative": ["--target-bpw", "-3", "--sensitivity", "{sens}"],
    "target_bpw_zero": ["--target-bpw", "0", "--sensitivity", "{sens}"],
    "target_bpw_tiny": ["--target-bpw", "0.5", "--sensitivity", "{sens}"],
    "max_kld_nan": ["--max-kld", "nan", "--sensitivity", "{sens}"],
    "max_kld_negative": ["--max-kld", "-1", "--sensitivity", "{sens}"],
    "target_size_huge_digits": ["--target-size", "9" * 400, "--sensitivity", "{sens}"],
    "target_size_words": ["--target-size", "big", "--sensitivity", "{sens}"],
    "target_size_zero": ["--target-size", "0", "--sensitivity", "{sens}"],
    "threads_negative": ["Q8_0", "--threads", "-4"],
    "threads_zero": ["Q8_0", "--threads", "0"],
    "type_unknown": ["Q9_Z"],
    "tensor_type_bad": ["Q8_0", "--tensor-type", "=Q4_0"],
    "two_targets": ["--target-bpw", "4", "--max-kld", "1", "--sensitivity", "{sens}"],
}


@pytest.mark.parametrize("case", list(_BAD_ARGS))
def test_hostile_quantize_arguments(world, case):
    d = world.case_dir(f"args-{case}")
    args = [a.replace("{sens}", str(world.sensitivity)) for a in _BAD_ARGS[case]]
    run_in_process(world, ["quantize", world.model, d / "out.gguf", *args])


@pytest.mark.parametrize("argv", [
    ["imatrix", "{model}", "--text", "{text}", "--ctx", "-5"],
    ["imatrix", "{model}", "--text", "{text}", "--chunks", "0"],
    ["imatrix", "{model}", "--text", "{text}", "--ctx", "100000"],
    ["analyze", "{model}", "--text", "{text}", "-o", "{out}/a", "--threads", "-1"],
    ["analyze", "{model}", "--text", "{text}", "-o", "{out}/a", "--windows", "0"],
    ["analyze", "{model}", "--text", "{text}", "-o", "{out}/a", "--types", "Q9_Z"],
    ["eval", "{model}", "--plan", "Q8_0", "--text", "{text}", "--threads", "-2"],
    ["eval", "{model}", "--plan", "Q8_0", "--text", "{text}", "--ctx", "-1"],
    ["eval", "{model}", "--gguf", "{gguf}", "--imatrix", "{imatrix}", "--text", "{text}"],
    ["compare", "{model}", "Q9_Z", "--text", "{text}", "--ctx", "16"],
    ["formats", "--model", "{model}", "--threads", "0"],
    ["formats", "--model", "{model}", "--layer", "-1"],
    ["formats", "--model", "{model}", "--layer", "99"],
], ids=lambda a: "-".join(x.strip("-{}") for x in a[:1] + a[-2:]))
def test_hostile_other_arguments(world, argv):
    d = world.case_dir("args-" + "-".join(x.strip("-{}/") for x in argv[:1] + argv[-2:]))
    subst = {"{model}": world.model, "{text}": world.text, "{gguf}": world.gguf, "{imatrix}": world.imatrix}
    run_in_process(world, [str(subst.get(a, a)).replace("{out}", str(d)) for a in argv])


# -- outputs: never an input, never a special file, never in a folder that is not there -----


def _output_targets(world: World, d: Path) -> dict[str, Path]:
    """Paths an output must refuse, each created here as the hostile user would."""
    hard = d / "hardlink"
    os.link(world.text, hard)
    sym = d / "symlink-to-weights"
    sym.symlink_to(world.model / "model.safetensors")
    null_link = d / "link-to-devnull"
    null_link.symlink_to("/dev/null")
    fifo = d / "fifo"
    os.mkfifo(fifo)
    folder = d / "a-folder"
    folder.mkdir()
    return {
        "weights": world.model / "model.safetensors",
        "config": world.model / "config.json",
        "tokenizer": world.model / "tokenizer.json",
        "tokenizer_config": world.model / "tokenizer_config.json",
        "generation_config": world.model / "generation_config.json",
        "text": world.text,
        "hardlink_to_text": hard,
        "symlink_to_weights": sym,
        "dev_null": Path("/dev/null"),
        "symlink_to_dev_null": null_link,
        "fifo": fifo,
        "folder": folder,
        "missing_folder": d / "no" / "such" / "out",
        "unwritable_folder": Path("/sys/mixquant-out"),
    }


_TARGETS = ["weights", "config", "tokenizer", "tokenizer_config", "generation_config", "text", "hardlink_to_text",
            "symlink_to_weights", "dev_null", "symlink_to_dev_null", "fifo", "folder", "missing_folder",
            "unwritable_folder"]


# quantize does not read the text, so writing over it is the user's call, not an input destroyed
@pytest.mark.parametrize("command, target", [(c, t) for c in ("quantize", "imatrix", "compare_plot") for t in _TARGETS
                                             if c != "quantize" or "text" not in t])
def test_hostile_output_path(world, command, target):
    d = world.case_dir(f"out-{command}-{target}")
    out = _output_targets(world, d)[target]
    argv = {
        "quantize": ["quantize", world.model, out, *QUANT],
        "imatrix": ["imatrix", world.model, "--text", world.text, "-o", out, *CTX, "--chunks", "2"],
        "compare_plot": ["compare", world.model, "Q8_0", "--text", world.text, *CTX, "--chunks", "2", "--plot", out],
    }[command]
    run_in_process(world, argv)


@pytest.mark.parametrize("target", ["text", "symlink_to_weights", "fifo", "dev_null", "folder"])
@pytest.mark.parametrize("member", ["imatrix.gguf", "sensitivity.json"])
def test_hostile_analyze_output_members(world, member, target):
    """analyze's output folder holding a hostile imatrix.gguf or sensitivity.json."""
    d = world.case_dir(f"out-analyze-{member}-{target}")
    out = d / "analysis"
    out.mkdir()
    hostile = _output_targets(world, d)[target]
    (out / member).symlink_to(hostile)
    run_in_process(world, _commands(world, world.model, d)["analyze"])


@pytest.mark.parametrize("flag", ["--imatrix", "--sensitivity", "--recipe"])
def test_quantize_output_naming_an_input_argument(world, flag):
    target = {"--imatrix": world.imatrix, "--sensitivity": world.sensitivity, "--recipe": world.recipe}[flag]
    extra = ["--target-bpw", "6"] if flag == "--sensitivity" else []
    run_in_process(world, ["quantize", world.model, target, *([] if extra or flag == "--recipe" else ["Q8_0"]),
                           flag, target, *extra, "--threads", "1"])


def test_read_only_file_system(world, monkeypatch):
    """EROFS at the temporary file's creation: one line, nothing written."""
    import errno
    import tempfile

    def erofs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    d = world.case_dir("erofs")
    assert "Read-only file system" in run_in_process(
        world, ["imatrix", world.model, "--text", world.text, "-o", d / "im.gguf", *CTX, "--chunks", "2"])
    assert "Read-only file system" in run_in_process(world, ["quantize", world.model, d / "out.gguf", *QUANT])


def test_disk_full_mid_write(world, monkeypatch):
    """ENOSPC while the GGUF is written: one line, the temporary file removed, no output."""
    import errno

    from mixquant import export

    real = export.formats.quantize
    calls = []

    def quantize(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*a, **k)

    monkeypatch.setattr(export.formats, "quantize", quantize)
    d = world.case_dir("enospc")
    assert "no space left" in run_in_process(world, ["quantize", world.model, d / "out.gguf", *QUANT])


# -- subprocesses: real stderr, memory bound -------------------------------------------------


_MEMORY_CASES = ["gguf:array_len_2e62", "gguf:array_len_2e62_strings", "gguf:tensor_count_2e62", "gguf:dims_overflow",
                 "model:config_layers_1e9", "model:config_vocab_1e12", "model:st_header_len_huge",
                 "model:st_shape_huge", "model:config_deep", "recipe:alias_bomb", "imatrix:datasets_len_2e62",
                 "imatrix:dat_entries_2e31", "sensitivity:shape_huge"]


@pytest.mark.parametrize("case", _MEMORY_CASES)
def test_hostile_memory_bounded(world, case):
    """The tiny files that claim huge sizes, in a fresh process: one line, bounded peak RSS."""
    kind, variant = case.split(":")
    d = world.case_dir(f"mem-{kind}-{variant}")
    out = d / "out.gguf"
    if kind == "gguf":
        argv = ["quantize", _gguf_variant(world, d, variant), out, *QUANT, "--allow-requantize"]
    elif kind == "model":
        argv = ["quantize", _model_copy(world, d, model_variants(world)[variant]), out, *QUANT]
    elif kind == "recipe":
        argv = ["quantize", world.model, out, "--recipe", _write(d, "r.yaml", recipe_variants()[variant])]
    elif kind == "imatrix":
        name = "im.dat" if variant.startswith("dat_") else "im.gguf"
        argv = ["quantize", world.model, out, "Q4_K_M", "--imatrix", _write(d, name, imatrix_variants(world)[variant])]
    else:
        argv = ["quantize", world.model, out, "--target-bpw", "5", "--sensitivity",
                _write(d, "s.json", sensitivity_variants(world)[variant])]
    before = _snapshot(world.root)
    code, err, peak_mb = run_subprocess(argv)
    assert code == 1, err
    _check_stderr(err)
    assert _snapshot(world.root) == before
    print(f"{case}: peak RSS {peak_mb:.0f} MB")  # shown with pytest -s
    assert peak_mb < MEMORY_BOUND_MB, f"peak RSS {peak_mb:.0f} MB"


def test_pickle_beside_safetensors_never_loaded(world, monkeypatch, capsys):
    """A pytorch_model.bin next to the safetensors: imatrix (which loads the model through
    transformers) succeeds without ever calling torch.load."""
    import pickle

    import torch

    from mixquant.cli import main

    d = world.case_dir("pickle")
    model = _model_copy(world, d, {"pytorch_model.bin": pickle.dumps({"payload": "never read"})})
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    assert main(["imatrix", str(model), "--text", str(world.text), "-o", str(d / "im.gguf"), *CTX,
                 "--chunks", "2"]) == 0, capsys.readouterr().err
    assert calls == []


def test_real_bug_shows_traceback(world, monkeypatch, capsys):
    """An internal error is not dressed up as a user error."""
    from mixquant import cli

    def broken(args):
        raise ValueError("an internal bug")

    monkeypatch.setattr(cli, "_cmd_formats", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        cli.main(["formats", "--model", str(world.model)])


def test_stale_partial_files_removed(world, capsys):
    """A partial file of a killed run (its process gone) is removed by the next run, which says so."""
    from mixquant.cli import main
    from mixquant.files import PARTIAL_SUFFIX

    d = world.case_dir("stale")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = d / f".im.gguf.{dead.pid}.x1y2z3{PARTIAL_SUFFIX}"
    stale.write_bytes(b"half")
    other = d / f".im.gguf.{os.getpid()}.live{PARTIAL_SUFFIX}"  # a live process's: kept
    other.write_bytes(b"busy")
    assert main(["imatrix", str(world.model), "--text", str(world.text), "-o", str(d / "im.gguf"), *CTX,
                 "--chunks", "2"]) == 0
    err = capsys.readouterr().err
    assert not stale.exists() and other.exists()
    assert sum("removed 1 partial file" in line for line in err.splitlines()) == 1
    other.unlink()


# --------------------------------------------------------------------------------------------
# interrupts: SIGINT, SIGTERM, SIGKILL at random points of quantize, imatrix and analyze writes


_INTERRUPTED = {
    "quantize": lambda w, d: ["quantize", w.model, d / "out.gguf", "Q8_0", "--threads", "1"],
    "imatrix": lambda w, d: ["imatrix", w.model, "--text", w.text, "-o", d / "out.gguf", *CTX, "--chunks", "4"],
    "analyze": lambda w, d: ["analyze", w.model, "--text", w.text, "-o", d, *CTX, "--chunks", "2",
                             "--windows", "1", "--types", "Q8_0,Q4_0", "--sweep-types", "", "--no-fisher"],
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
@pytest.mark.parametrize("command", list(_INTERRUPTED))
def test_interrupted_write(world, command, sig):
    """Signal the command at a random moment; afterwards the old output is intact (or replaced by a
    complete new one) and no partial file is left (after the next run, for SIGKILL)."""
    from mixquant.files import PARTIAL_SUFFIX

    d = world.case_dir(f"interrupt-{command}-{sig.name}")
    output = d / ("imatrix.gguf" if command == "analyze" else "out.gguf")
    old = b"old output, must survive\n"
    output.write_bytes(old)
    inputs = _snapshot(world.model) | {str(world.text): hashlib.sha256(world.text.read_bytes()).hexdigest()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "mixquant.cli", *map(str, _INTERRUPTED[command](world, d))]
    rng = random.Random(f"{command}{sig}")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # wait for the process to reach its output folder's work, then a random moment more
    deadline = time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline and not any(
            p.name.endswith(PARTIAL_SUFFIX) for p in d.iterdir()):
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    replaced = output.read_bytes() != old
    if replaced:  # written before the signal: then it is complete
        gguf.GGUFReader(output)
    elif sig != signal.SIGKILL:  # stopped before writing it: through mixquant's own handler
        assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    if sig == signal.SIGKILL and any(p.name.endswith(PARTIAL_SUFFIX) for p in d.iterdir()):
        code, err2, _ = run_subprocess(_INTERRUPTED[command](world, d))  # the next run cleans up
        assert code == 0, err2
        assert "partial file" in err2
    assert not [p.name for p in d.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
    assert _snapshot(world.model) | {str(world.text): hashlib.sha256(world.text.read_bytes()).hexdigest()} == inputs
