"""The importance matrix and the activation statistics (mixquant.calibrate), and the token windows
(mixquant.text).

Fast tests: file formats (round trips, layouts, bad files), importance semantics, which tokens
llama-imatrix collects, window cutting; weight and activation statistics against numpy on
synthetic arrays and on a tiny llama's activations captured by the tests' own hooks. Slow tests
use the real test model and llama.cpp's own tools as the referee: llama-imatrix's files read and
rewritten byte for byte, ours accepted by llama-quantize with exactly the quant_weights we say,
our imatrix agreeing with llama-imatrix's, and our tokenization equal to llama.cpp's.
"""

from __future__ import annotations

import copy
import ctypes
import json
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama, random_text

from mixquant.calibrate import (
    ACTIVATIONS_SCHEMA,
    LEGACY_CHUNK_SIZE,
    ActivationStats,
    Imatrix,
    StreamingStats,
    calibrate,
    compute_imatrix,
    imatrix_token_mask,
    input_of,
    read_imatrix,
    weight_distribution,
    write_imatrix,
)
from mixquant.errors import MixquantError
from mixquant.text import adds_bos, read_text, token_windows, tokenize


# --------------------------------------------------------------------------------------------
# fast: files


def _random_imatrix(seed: int = 0, chunk_size: int = 512) -> Imatrix:
    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    for _i, (kind, cols) in enumerate([("attn_q", 64), ("attn_output", 64), ("ffn_down", 96), ("ffn_up", 64)]):
        for layer in (0, 1, 10):
            name = f"blk.{layer}.{kind}.weight"
            count = int(rng.integers(1, 5)) * chunk_size - int(rng.integers(0, 7))
            sums[name] = (np.exp(rng.normal(0, 3, cols)) * count).astype(np.float32)
            counts[name] = count
    sums["blk.1.ffn_up.weight"][:5] = 0.0  # dead columns
    return Imatrix(sums=sums, counts=counts, chunks=3, datasets=["calib.txt", "ünïcode/data set.txt"],
                   chunk_size=chunk_size)


def test_gguf_round_trip_is_exact(tmp_path):
    im = _random_imatrix()
    path = write_imatrix(im, tmp_path / "x.gguf")
    back = read_imatrix(path)
    assert back.names == im.names
    for name in im.names:
        assert back.sums[name].tobytes() == im.sums[name].tobytes()
        assert back.counts[name] == im.counts[name]
        assert back.importance(name).tobytes() == im.importance(name).tobytes()
    assert (back.chunks, back.datasets, back.chunk_size) == (im.chunks, im.datasets, im.chunk_size)
    write_imatrix(back, tmp_path / "y.gguf")
    assert (tmp_path / "y.gguf").read_bytes() == path.read_bytes()
    # any other suffix is GGUF too (llama-imatrix only warns)
    write_imatrix(im, tmp_path / "x.imatrix")
    assert (tmp_path / "x.imatrix").read_bytes() == path.read_bytes()


def test_gguf_layout_as_llama_imatrix_writes_it(tmp_path):
    import gguf

    im = _random_imatrix()
    reader = gguf.GGUFReader(write_imatrix(im, tmp_path / "x.gguf"))
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == im.datasets
    assert reader.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert reader.fields["imatrix.chunk_size"].contents() == 512
    expected = [f"{n}.{part}" for n in sorted(im.names) for part in ("in_sum2", "counts")]
    assert [t.name for t in reader.tensors] == expected
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        name, part = t.name.rsplit(".", 1)
        if part == "counts":
            assert t.shape.tolist() == [1] and float(t.data[0]) == im.counts[name]
        else:
            assert t.shape.tolist() == [im.sums[name].size]
            assert np.asarray(t.data).tobytes() == im.sums[name].tobytes()


def _parse_dat(path: Path) -> tuple[dict[str, tuple[int, np.ndarray]], int, str]:
    raw = path.read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, raw, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0] if len(v) == 1 else v

    entries = {}
    for _ in range(take("i")):
        n = take("i")
        name = raw[pos:pos + n].decode()
        pos += n
        ncall, nval = take("ii")
        entries[name] = (ncall, np.frombuffer(raw, "<f4", nval, pos).copy())
        pos += 4 * nval
    chunks, n = take("ii")
    dataset = raw[pos:pos + n].decode()
    assert pos + n == len(raw)
    return entries, chunks, dataset


def test_legacy_layout_and_importance(tmp_path):
    im = _random_imatrix()
    im.counts["blk.10.ffn_up.weight"] = 0  # no data: skipped, as llama-imatrix does
    path = write_imatrix(im, tmp_path / "x.dat")
    entries, chunks, dataset = _parse_dat(path)
    assert sorted(entries) == [n for n in im.names if im.counts[n] > 0]
    assert (chunks, dataset) == (im.chunks, im.datasets[-1])
    for name, (ncall, values) in entries.items():
        count = im.counts[name]
        assert ncall == -(-count // im.chunk_size)
        expected = (im.sums[name] / np.float32(count)) * np.float32(ncall)
        assert values.tobytes() == expected.astype(np.float32).tobytes()

    back = read_imatrix(path)
    assert back.names == sorted(entries)
    assert (back.chunks, back.datasets, back.chunk_size) == (im.chunks, [im.datasets[-1]], LEGACY_CHUNK_SIZE)
    for name, (ncall, values) in entries.items():
        # exactly llama-quantize's legacy quant_weights: values / ncall in float32
        assert back.importance(name).tobytes() == (values / np.float32(ncall)).tobytes()
        # and within an ulp or two of the original importance (the format rounds (s/c)*n)
        np.testing.assert_allclose(back.importance(name), im.importance(name), rtol=3e-7)
        assert back.counts[name] == ncall * LEGACY_CHUNK_SIZE
    # .dat -> .gguf -> read: the same importance
    again = read_imatrix(write_imatrix(back, tmp_path / "y.gguf"))
    for name in back.names:
        assert again.importance(name).tobytes() == back.importance(name).tobytes()


def test_legacy_without_trailer_and_zero_ncall(tmp_path):
    values = np.array([1.5, 0.0, 3.0], dtype="<f4")
    name = b"blk.0.attn_q.weight"
    raw = struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", 0, 3) + values.tobytes()
    (tmp_path / "x.dat").write_bytes(raw)
    im = read_imatrix(tmp_path / "x.dat")
    # llama-quantize uses the values as they are when ncall is 0
    assert im.importance("blk.0.attn_q.weight").tobytes() == values.tobytes()
    assert (im.chunks, im.datasets) == (0, [])


def _moe_imatrix() -> Imatrix:
    """A dense entry and a 3-expert stack whose second expert got no token."""
    rng = np.random.default_rng(3)
    sums = {"blk.0.ffn_gate_inp.weight": (np.exp(rng.normal(0, 2, 64)) * 600).astype(np.float32),
            "blk.0.ffn_down_exps.weight": (np.exp(rng.normal(0, 2, 3 * 64)) * 300).astype(np.float32)}
    sums["blk.0.ffn_down_exps.weight"][64:128] = 0
    return Imatrix(sums=sums, counts={n: 600 for n in sums}, chunks=1, datasets=["calib.txt"], chunk_size=512,
                   expert_counts={"blk.0.ffn_down_exps.weight": [700, 0, 500]})


def test_moe_entries_per_expert(tmp_path):
    """llama-imatrix's MUL_MAT_ID layout: in_sum2 [n_cols, n_expert] and counts [1, n_expert];
    importance per expert (ones for an expert without tokens), as llama-quantize slices it."""
    import gguf

    im = _moe_imatrix()
    name = "blk.0.ffn_down_exps.weight"
    assert im.counts[name] == 700  # the largest expert count
    per_expert = im.sums[name].reshape(3, 64)
    expected = np.concatenate([per_expert[0] / np.float32(700), np.ones(64, np.float32), per_expert[2] / np.float32(500)])
    assert im.importance(name).tobytes() == expected.tobytes()

    path = write_imatrix(im, tmp_path / "x.gguf")
    shapes = {t.name: t.shape.tolist() for t in gguf.GGUFReader(path).tensors}
    assert shapes[f"{name}.in_sum2"] == [64, 3] and shapes[f"{name}.counts"] == [1, 3]
    assert shapes["blk.0.ffn_gate_inp.weight.counts"] == [1]
    back = read_imatrix(path)
    assert back.expert_counts[name].tolist() == [700, 0, 500] and list(back.expert_counts) == [name]
    assert back.sums[name].tobytes() == im.sums[name].tobytes() and back.counts == im.counts
    assert write_imatrix(back, tmp_path / "y.gguf").read_bytes() == path.read_bytes()

    # legacy: one ncall from the largest count, each expert's slice scaled by its own count, 1 * ncall without tokens
    entries, _, _ = _parse_dat(write_imatrix(im, tmp_path / "x.dat"))
    ncall, values = entries[name]
    assert ncall == 2
    per_expert = np.where(np.arange(3)[:, None] == 1, np.float32(1), im.sums[name].reshape(3, 64))
    counts = np.array([700, 1, 500], np.float32)[:, None]
    assert values.tobytes() == ((per_expert / counts) * np.float32(2)).astype(np.float32).reshape(-1).tobytes()
    legacy = read_imatrix(tmp_path / "x.dat")
    np.testing.assert_allclose(legacy.importance(name), im.importance(name), rtol=3e-7)

    # for the model it was collected on: one slice per expert of the stacked tensor
    from types import SimpleNamespace

    from mixquant.calibrate import check_imatrix
    from mixquant.plan import TensorInfo

    def model(down_shape):
        return SimpleNamespace(tensors=[TensorInfo("blk.0.ffn_gate_inp.weight", (3, 64)),
                                        TensorInfo(name, down_shape)])

    check_imatrix(im, model((3, 32, 64)))
    with pytest.raises(MixquantError, match="has 192 values, the tensor has 256 columns"):
        check_imatrix(im, model((4, 32, 64)))
    with pytest.raises(MixquantError, match="counts for 3 experts, the tensor has 6"):
        check_imatrix(im, model((6, 32, 32)))


def test_per_expert_importance_quantizes_each_expert_with_its_slice():
    """formats.quantize with n importance vectors: each matrix of the stack with its own, threaded
    or not, exactly as one call per matrix; predicted_error weighs each expert's rows alike."""
    from mixquant import formats
    from mixquant.analyze import predicted_error

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (3 * 100, 256)).astype(np.float32)
    imp = np.exp(rng.normal(0, 2, 3 * 256)).astype(np.float32)
    one_by_one = b"".join(formats.quantize(x[100 * e:100 * (e + 1)], "Q4_K", imp[256 * e:256 * (e + 1)])
                          for e in range(3))
    assert formats.quantize(x, "Q4_K", imp) == formats.quantize(x, "Q4_K", imp, threads=3) == one_by_one
    assert formats.quantize(x, "Q4_K", np.tile(imp[:256], 3)) != one_by_one  # the slices matter
    for bad in (np.ones(7 * 256, np.float32), imp[:300]):  # 7 matrices do not split 300 rows; nor 300 columns
        with pytest.raises(ValueError, match="stack of n matrices"):
            formats.quantize(x, "Q4_K", bad)
    q = formats.dequantize(one_by_one, "Q4_K", x.shape)
    err = [np.sum(imp[256 * e:256 * (e + 1)] * (q - x)[100 * e:100 * (e + 1)] ** 2) for e in range(3)]
    ref = [np.sum(imp[256 * e:256 * (e + 1)] * x[100 * e:100 * (e + 1)] ** 2) for e in range(3)]
    assert predicted_error(x, q, imp) == pytest.approx(sum(err) / sum(ref), rel=1e-6)


def test_importance_semantics():
    im = Imatrix(sums={"a": np.array([1.0, 2.0, 0.0], np.float32), "b": np.array([5.0, 7.0], np.float32)},
                 counts={"a": 3, "b": 0}, chunks=0)
    ia = im.importance("a")
    assert ia.dtype == np.float32
    assert ia.tobytes() == (np.array([1, 2, 0], np.float32) / np.float32(3)).tobytes()
    assert im.importance("b").tolist() == [1.0, 1.0]  # zero count: all ones (quantize.cpp)
    assert im.importance("blk.0.nope.weight") is None
    assert set(im.as_dict()) == {"a", "b"}


def _gguf_with(tmp_path, name, tensors, kv=True, counts_value=None):
    """A GGUF written by gguf-py (not by us) with the given F32 tensors."""
    import gguf

    path = tmp_path / name
    w = gguf.GGUFWriter(path, "llama")
    if kv:
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", ["x.txt"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 512)
    for tname, arr in tensors.items():
        w.add_tensor(tname, np.asarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_foreign_gguf_writer_is_read(tmp_path):
    path = _gguf_with(tmp_path, "ok.gguf", {"blk.0.ffn_down.weight.in_sum2": [[2.0, 4.0]],
                                            "blk.0.ffn_down.weight.counts": [[2.0]]})
    im = read_imatrix(path)
    assert im.importance("blk.0.ffn_down.weight").tolist() == [1.0, 2.0]


def _one_line_error(path, match):
    with pytest.raises(MixquantError) as info:
        read_imatrix(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert re.search(match, message), message


def test_bad_files(tmp_path):
    good = write_imatrix(_random_imatrix(), tmp_path / "good.gguf").read_bytes()
    legacy = write_imatrix(_random_imatrix(), tmp_path / "good.dat").read_bytes()
    cases = {
        "missing.gguf": (None, "cannot read"),
        "empty.dat": (b"", "too short"),
        "text.txt": (b"hello, this is not an imatrix at all\n" * 3, "not an imatrix"),
        "cut_header.gguf": (good[:50], "truncated"),
        "cut_data.gguf": (good[: len(good) - 100], "truncated"),
        "cut.dat": (legacy[:300], "truncated"),
        "tail.dat": (legacy + b"\0\0\0", "unexpected bytes"),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        _one_line_error(path, match)

    nan = _random_imatrix()
    nan.sums["blk.0.ffn_down.weight"][3] = np.nan
    _one_line_error(write_imatrix(nan, tmp_path / "nan.gguf"), r"NaN.*blk\.0\.ffn_down\.weight")
    _one_line_error(write_imatrix(nan, tmp_path / "nan.dat"), r"NaN.*blk\.0\.ffn_down\.weight")
    inf = _random_imatrix()
    inf.sums["blk.1.attn_q.weight"][0] = np.inf
    _one_line_error(write_imatrix(inf, tmp_path / "inf.gguf"), r"NaN/Inf.*blk\.1\.attn_q\.weight")
    neg = _random_imatrix()
    neg.sums["blk.1.attn_q.weight"][0] = -1
    _one_line_error(write_imatrix(neg, tmp_path / "neg.gguf"), "negative")

    model_like = _gguf_with(tmp_path, "model.gguf", {"blk.0.attn_q.weight": np.ones((4, 8))}, kv=False)
    _one_line_error(model_like, "not an imatrix")
    no_meta = _gguf_with(tmp_path, "nometa.gguf", {"a.in_sum2": [[1.0]], "a.counts": [[1.0]]}, kv=False)
    _one_line_error(no_meta, "missing imatrix metadata")
    unpaired = _gguf_with(tmp_path, "unpaired.gguf", {"a.in_sum2": [[1.0]]})
    _one_line_error(unpaired, "no matching")


# --------------------------------------------------------------------------------------------
# fast: which tokens count, how the text is cut


def test_token_mask_default_batching():
    assert imatrix_token_mask(4, 512).all()  # 4 windows, micro-batches of 4 x 128 tokens
    assert imatrix_token_mask(7, 256).all()
    # 3 windows of 512 decoded together: micro-batches of 3 x 170 tokens, then 3 x 2 = 6 < 16
    mask = imatrix_token_mask(3, 512)
    assert (~mask).sum() == 6 and not mask[:, -2:].any() and mask[:, :-2].all()
    # 4 + 3 windows: only the second group loses tokens
    mask = imatrix_token_mask(7, 512)
    assert mask[:4].all() and (~mask[4:]).sum() == 6
    # one window longer than a micro-batch: 512 + 512 + 6 tokens, the last 6 dropped
    mask = imatrix_token_mask(2, 1030)
    assert mask[:, :1024].all() and not mask[:, 1024:].any()
    # windows longer than the logical batch: two llama_decode calls of 2048 + 952 tokens
    assert imatrix_token_mask(1, 3000).all()
    assert imatrix_token_mask(1, 2048 + 520)[0, -8:].sum() == 0
    # tiny windows: 5 x 8-token windows go into one 40-token micro-batch and are kept
    assert imatrix_token_mask(5, 8).all()
    assert not imatrix_token_mask(1, 8).any()


def _toy_tokenizer(with_bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def test_token_windows_without_bos():
    tok = _toy_tokenizer(with_bos=False)
    assert not adds_bos(tok)
    text = " ".join(f"w{i % 100}" for i in range(23))
    ids = [i % 100 + 2 for i in range(23)]
    assert tokenize(tok, text) == ids
    w = token_windows(tok, text, 5)
    assert w.dtype == torch.long and w.shape == (4, 5)  # 23 // 5 windows, the remainder dropped
    assert w.reshape(-1).tolist() == ids[:20]
    assert token_windows(tok, text, 5, 2).reshape(-1).tolist() == ids[:10]
    assert token_windows(tok, text, 5, 99).shape == (4, 5)
    assert token_windows(tok, text, 5, -1).shape == (4, 5)
    assert token_windows(tok, text, 11).shape == (2, 11)
    with pytest.raises(MixquantError, match="only 23 tokens.*at least 24"):
        token_windows(tok, text, 12)


def test_token_windows_with_bos():
    tok = _toy_tokenizer(with_bos=True)
    assert adds_bos(tok)
    text = " ".join(f"w{i}" for i in range(11))
    ids = [0] + [i + 2 for i in range(11)]  # BOS + 11 tokens = 12
    assert tokenize(tok, text) == ids
    w = token_windows(tok, text, 4)
    # every window starts with BOS; the token it replaces is lost (llama.cpp does the same)
    assert w.tolist() == [[0, 2, 3, 4], [0, 6, 7, 8], [0, 10, 11, 12]]
    assert token_windows(tok, text, 4, add_bos=False).tolist() == [[2, 3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(MixquantError, match="at least 14"):
        token_windows(tok, text, 7)


def test_read_text_like_llama_cpp(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("a\r\nb \n\n".encode())
    assert read_text(path) == "a\r\nb \n"  # bytes kept, one trailing newline dropped
    path.write_bytes(b"no newline")
    assert read_text(path) == "no newline"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(MixquantError, match="not UTF-8"):
        read_text(path)


# --------------------------------------------------------------------------------------------
# slow: the real model, with llama.cpp's tools as the referee

CHUNKS = 4
CTX = 512


@pytest.fixture(scope="module")
def smol() -> dict:
    """The test model, its texts and llama.cpp's tools."""
    from mixquant.reference import llama_tool
    from mixquant.testdata import build_test_model, build_test_text

    return {"folder": build_test_model(), "texts": build_test_text(),
            "imatrix_tool": llama_tool("llama-imatrix"), "quantize_tool": llama_tool("llama-quantize"),
            "perplexity_tool": llama_tool("llama-perplexity")}


@pytest.fixture(scope="module")
def f32_gguf(smol, tmp_path_factory) -> Path:
    from mixquant.export import write_gguf
    from mixquant.plan import preset_plan
    from mixquant.source import open_source

    path = tmp_path_factory.mktemp("calibrate") / "smol-F32.gguf"
    src = open_source(smol["folder"])
    write_gguf(src, preset_plan(src.model, "F32"), path, progress=False, file_type="F32")
    return path


def _run(cmd: list, timeout: int = 900) -> str:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{Path(str(cmd[0])).name} failed:\n{out[-3000:]}"
    return out


@pytest.fixture(scope="module")
def llama_imatrix(smol, f32_gguf) -> Path:
    out = f32_gguf.parent / "llama-imatrix.gguf"
    calib = smol["texts"][0]
    _run([smol["imatrix_tool"], "-m", f32_gguf, "-f", calib, "-c", CTX, "--chunks", CHUNKS, "-o", out, "-t", 2,
          "--no-ppl"])
    return out


@pytest.fixture(scope="module")
def our_imatrix(smol) -> Imatrix:
    calib = smol["texts"][0]
    return compute_imatrix(smol["folder"], read_text(calib), ctx=CTX, chunks=CHUNKS, progress=True,
                           dataset=str(calib))


@pytest.mark.slow
def test_llama_imatrix_files_are_read_and_rewritten_byte_for_byte(smol, f32_gguf, llama_imatrix, tmp_path):
    theirs = read_imatrix(llama_imatrix)
    # what llama-imatrix collects on this model: q/k/v/o, gate/up/down of all 30 layers, no output
    assert len(theirs.names) == 30 * 7 and all(n.startswith("blk.") for n in theirs.names)
    assert set(theirs.counts.values()) == {CHUNKS * CTX}
    assert (theirs.chunks, theirs.chunk_size, theirs.datasets) == (CHUNKS, CTX, [str(smol["texts"][0])])
    # GGUF: our writer reproduces llama-imatrix's file exactly
    assert write_imatrix(theirs, tmp_path / "ours.gguf").read_bytes() == llama_imatrix.read_bytes()
    # legacy: llama-imatrix's own GGUF -> .dat conversion equals ours
    # (-m is required by the argument parser but not loaded when there is no -f)
    _run([smol["imatrix_tool"], "-m", f32_gguf, "--in-file", llama_imatrix, "--output-format", "dat",
          "-o", tmp_path / "theirs.dat"])
    ours_dat = write_imatrix(theirs, tmp_path / "ours.dat")
    assert ours_dat.read_bytes() == (tmp_path / "theirs.dat").read_bytes()
    # and its .dat -> GGUF conversion of our .dat equals our reading of it written as GGUF
    _run([smol["imatrix_tool"], "-m", f32_gguf, "--in-file", ours_dat, "-o", tmp_path / "back.gguf"])
    back = write_imatrix(read_imatrix(ours_dat), tmp_path / "ours-back.gguf")
    assert back.read_bytes() == (tmp_path / "back.gguf").read_bytes()


def _quantized_tensors(path: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".gguf", ".dat"])
def test_llama_quantize_uses_our_importance_exactly(smol, f32_gguf, our_imatrix, suffix, tmp_path):
    """llama-quantize accepts our file, and the tensors it writes are exactly what ggml's quantizer
    gives with `importance(name)` as quant_weights: the vectors are the same, bit for bit."""
    from mixquant.reference import ggml
    from mixquant.source import open_source

    imatrix_file = write_imatrix(our_imatrix, tmp_path / f"imatrix{suffix}")
    out = tmp_path / "Q4_K_M.gguf"
    log = _run([smol["quantize_tool"], "--imatrix", imatrix_file, f32_gguf, out, "Q4_K_M", 2])
    assert re.search(rf"loaded {len(our_imatrix.names)} importance matrix entries from .* computed on {CHUNKS} chunks",
                     log), log[-3000:]
    assert "did not find weights for blk." not in log  # (token_embd has no entry: llama-imatrix skips it)
    im = read_imatrix(imatrix_file)
    written = _quantized_tensors(out)
    src = open_source(f32_gguf)
    checked = set()
    for layer in (0, 4, 29):  # ffn_down: Q6_K in 0 and 29 (use_more_bits), Q4_K in 4
        for name in [n for n in im.names if n.startswith(f"blk.{layer}.")]:
            type_name, data = written[name]
            assert ggml().quantize(src.tensor(name), type_name, im.importance(name)) == data, name
            checked.add(type_name)
    # 576-column tensors fall back from Q4_K to Q5_0; Q6_K and Q8_0 tensors come from the mix's bumps
    assert {"Q4_K", "Q5_0", "Q6_K"} <= checked, checked


def _relative_difference(ours: Imatrix, theirs: Imatrix) -> np.ndarray:
    return np.concatenate([np.abs(ours.importance(n).astype(np.float64) - theirs.importance(n))
                           / np.maximum(theirs.importance(n).astype(np.float64), 1e-30) for n in theirs.names])


@pytest.mark.slow
def test_our_imatrix_agrees_with_llama_imatrix(our_imatrix, llama_imatrix):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from mixquant.reference import ggml

    theirs = read_imatrix(llama_imatrix)
    ours = our_imatrix
    assert ours.names == theirs.names
    assert ours.counts == theirs.counts
    assert (ours.chunks, ours.chunk_size, ours.datasets) == (theirs.chunks, theirs.chunk_size, theirs.datasets)
    rel = _relative_difference(ours, theirs)
    print(f"\nimatrix vs llama-imatrix, {rel.size} columns: relative difference median {np.median(rel):.2e}, "
          f"p99 {np.quantile(rel, 0.99):.2e}, max {rel.max():.2e}")
    # measured (llama.cpp 0c1e570, SmolLM2-135M, 4 x 512): median 1.2e-5, p99 1.9e-4, max 1.6e-3
    assert np.median(rel) < 5e-5
    assert np.quantile(rel, 0.99) < 1e-3
    assert rel.max() < 1e-2

    # Quantizing with either importance: how often do the bytes agree? (llama.cpp's heuristic
    # quantizers are discontinuous, so a 1e-5 change flips a few blocks; no tensor of 576 x 576
    # comes out identical, but almost every block does.)
    src_names = {"Q4_K": [n for n in theirs.names if "ffn_down" in n],  # the only 256-divisible rows
                 "IQ4_NL": [n for n in theirs.names if n.startswith(("blk.0.", "blk.15.", "blk.29."))]}
    from mixquant.source import open_source
    from mixquant.testdata import build_test_model

    src = open_source(build_test_model())
    for type_name, names in src_names.items():
        block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]
        same_tensors = same_blocks = blocks = 0
        for name in names:
            w = src.tensor(name)
            a = np.frombuffer(ggml().quantize(w, type_name, ours.importance(name)), np.uint8).reshape(-1, block_bytes)
            b = np.frombuffer(ggml().quantize(w, type_name, theirs.importance(name)), np.uint8).reshape(-1, block_bytes)
            equal = (a == b).all(axis=1)
            same_tensors += bool(equal.all())
            same_blocks += int(equal.sum())
            blocks += equal.size
        print(f"{type_name}: identical tensors {same_tensors}/{len(names)}, identical blocks "
              f"{same_blocks}/{blocks} ({same_blocks / blocks:.2%})")
        # measured: Q4_K 97.1% of blocks, IQ4_NL 99.86% (no imatrix: 0%; 3 instead of 4 chunks: 4%)
        assert same_blocks / blocks > (0.95 if type_name == "Q4_K" else 0.99)


@pytest.mark.slow
def test_imatrix_short_last_group(smol, f32_gguf, tmp_path):
    """3 windows of 512 decoded together lose a 6-token micro-batch in llama-imatrix: same counts."""
    out = tmp_path / "three.gguf"
    _run([smol["imatrix_tool"], "-m", f32_gguf, "-f", smol["texts"][0], "-c", CTX, "--chunks", 3, "-o", out, "-t", 2,
          "--no-ppl"])
    theirs = read_imatrix(out)
    assert set(theirs.counts.values()) == {int(imatrix_token_mask(3, CTX).sum())} == {3 * CTX - 6}
    assert theirs.chunks == (3 * CTX - 6) // CTX == 2


# tokenization -------------------------------------------------------------------------------


class _ModelParams(ctypes.Structure):
    """struct llama_model_params of llama.cpp 0c1e570 (include/llama.h)."""

    _fields_ = [("devices", ctypes.c_void_p), ("tensor_buft_overrides", ctypes.c_void_p),
                ("n_gpu_layers", ctypes.c_int32), ("split_mode", ctypes.c_int32), ("load_mode", ctypes.c_int32),
                ("lazy_mode", ctypes.c_int32), ("main_gpu", ctypes.c_int32), ("tensor_split", ctypes.c_void_p),
                ("progress_callback", ctypes.c_void_p), ("progress_callback_user_data", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p), ("vocab_only", ctypes.c_bool), ("check_tensors", ctypes.c_bool),
                ("use_extra_bufts", ctypes.c_bool), ("no_host", ctypes.c_bool), ("no_alloc", ctypes.c_bool),
                ("load_mtp", ctypes.c_bool)]


def _llama_tokenizer(gguf_path: Path, tool: Path):
    """llama.cpp's own `common_tokenize(text, add_special=true, parse_special=false)`, via libllama."""
    lib = ctypes.CDLL(str(tool.parent / "libllama.so"))
    lib.llama_model_default_params.restype = _ModelParams
    lib.llama_model_load_from_file.restype = ctypes.c_void_p
    lib.llama_model_load_from_file.argtypes = [ctypes.c_char_p, _ModelParams]
    lib.llama_model_get_vocab.restype = ctypes.c_void_p
    lib.llama_model_get_vocab.argtypes = [ctypes.c_void_p]
    lib.llama_tokenize.restype = ctypes.c_int32
    lib.llama_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32,
                                   ctypes.c_bool, ctypes.c_bool]
    lib.llama_backend_init()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(gguf_path).encode(), params)
    assert model, f"libllama could not load {gguf_path}"
    vocab = lib.llama_model_get_vocab(model)

    def tokenize_(text: str) -> list[int]:
        raw = text.encode("utf-8")
        out = np.zeros(len(raw) + 2, dtype=np.int32)
        n = lib.llama_tokenize(vocab, raw, len(raw), out.ctypes.data, out.size, True, False)
        assert n >= 0
        return out[:n].tolist()

    return tokenize_


TRICKY = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
          "🦙🦙 3 33 333 3333 33333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
          "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
          "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL\r\nWindows line\r\n, Press,  2004\n"
          "nerves \n13th century <|im_start|>user literal <|endoftext|> and <repo_name> x<|im_end|>\n")


@pytest.mark.slow
def test_tokenization_matches_llama_cpp(smol, f32_gguf, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smol["folder"], local_files_only=True)
    llama_tokenize = _llama_tokenizer(f32_gguf, smol["imatrix_tool"])
    calib, evaluation = smol["texts"]

    # the ctypes path agrees with the tool itself: llama-perplexity reports the count of a short text
    tricky = read_text(smol["texts"][0])[:3000] + TRICKY
    (tmp_path / "tricky.txt").write_text(tricky + "\n", encoding="utf-8", newline="")
    done = subprocess.run([str(smol["perplexity_tool"]), "-m", str(f32_gguf), "-f", str(tmp_path / "tricky.txt"),
                           "-c", "4096", "-t", "2"], capture_output=True, text=True, timeout=600)
    m = re.search(r"tokenizes to only (\d+) tokens", done.stdout + done.stderr)
    assert m, (done.stdout + done.stderr)[-3000:]
    assert int(m.group(1)) == len(llama_tokenize(tricky))

    for path, text in [("tricky", tricky), (calib, read_text(calib)), (evaluation, read_text(evaluation))]:
        ours, theirs = tokenize(tokenizer, text), llama_tokenize(text)
        if ours != theirs:
            i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            pytest.fail(
                f"{path}: {len(ours)} tokens (transformers) vs {len(theirs)} (llama.cpp), first difference at "
                f"token {i}: {tokenizer.convert_ids_to_tokens(ours[i:i + 4])} vs "
                f"{tokenizer.convert_ids_to_tokens(theirs[i:i + 4])} in {tokenizer.decode(ours[max(0, i - 8):i + 4])!r}"
            )
        ctx = 512
        windows = token_windows(tokenizer, text, ctx) if len(ours) >= 2 * ctx else None
        if windows is not None:
            assert windows.reshape(-1).tolist() == theirs[: windows.numel()]
            assert windows.shape[0] == len(theirs) // ctx


# --------------------------------------------------------------------------------------------
# fast: activation and weight statistics (synthetic arrays and a tiny llama)


def _moments(x: np.ndarray) -> tuple[float, float, float]:
    """numpy's mean, std and Pearson kurtosis of all values, in float64."""
    x = np.asarray(x, dtype=np.float64).ravel()
    mean, std = x.mean(), x.std()
    return mean, std, float(np.mean((x - mean) ** 4) / std**4)


def _histogram(x: np.ndarray, edges: list[float]) -> np.ndarray:
    """Counts below, in each [edge, next edge) and at or above the last edge."""
    x, edges = np.asarray(x, dtype=np.float64).ravel(), np.asarray(edges)
    inner = np.histogram(x, edges)[0]
    inner[-1] -= np.sum(x == edges[-1])  # np.histogram's last bin includes its right edge
    return np.concatenate([[np.sum(x < edges[0])], inner, [np.sum(x >= edges[-1])]])


def test_weight_distribution_matches_numpy():
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, (300, 96)) * 0.02).astype(np.float32)
    w[7, 3] = 0.9
    d = weight_distribution(w)
    mean, std, kurtosis = _moments(w)
    assert d.count == w.size and d.absmax == np.float32(0.9) == np.abs(w).max()
    assert d.mean == pytest.approx(mean, abs=1e-7 * std)
    assert d.std == pytest.approx(std, rel=1e-6) and d.kurtosis == pytest.approx(kurtosis, rel=1e-5)
    assert 0 < d.outlier_fraction == np.mean(np.abs(w.astype(np.float64) - mean) > 6 * std)
    np.testing.assert_allclose(d.hist_edges, np.linspace(mean - 8 * std, mean + 8 * std, 65), atol=1e-6 * std)
    assert len(d.hist_counts) == 66 and sum(d.hist_counts) == w.size
    assert np.abs(np.array(d.hist_counts) - _histogram(w, d.hist_edges)).sum() <= 2  # bins found in float32
    # any shape; constant values: std 0, kurtosis 0 (undefined), no outliers
    assert weight_distribution(w.ravel()).kurtosis == pytest.approx(kurtosis, rel=1e-5)
    flat = weight_distribution(np.full(10, -2.0))
    assert (flat.mean, flat.std, flat.kurtosis, flat.outlier_fraction, flat.absmax) == (-2.0, 0.0, 0.0, 0.0, 2.0)


def test_kurtosis_and_histogram_of_known_distributions():
    rng = np.random.default_rng(1)
    gauss = weight_distribution(rng.standard_normal((1000, 1000)).astype(np.float32))
    assert gauss.kurtosis == pytest.approx(3.0, abs=0.02) and gauss.outlier_fraction < 1e-5
    within_1_std = sum(gauss.hist_counts[1 + 28 : 1 + 36]) / gauss.count  # 0.25-std bins
    assert within_1_std == pytest.approx(0.6827, abs=0.002)
    assert weight_distribution(rng.uniform(-1, 1, (1000, 200))).kurtosis == pytest.approx(1.8, abs=0.01)


def test_streaming_stats_match_numpy_on_the_whole_stream():
    rng = np.random.default_rng(2)
    chunks = [(rng.standard_normal((rows, 48)) * scale + shift).astype(np.float32)
              for rows, scale, shift in [(50, 1.0, 0.5), (130, 2.0, 0.0), (300, 0.5, -1.0), (7, 10.0, 3.0)]]
    stats = StreamingStats()
    for chunk in chunks:
        stats.add(chunk)
    st = stats.activation_stat()
    x = np.concatenate(chunks)
    d, (mean, std, kurtosis) = st.dist, _moments(x)
    assert (st.n_tokens, st.n_channels, d.count, d.absmax) == (487, 48, x.size, np.abs(x).max())
    assert d.mean == pytest.approx(mean, abs=1e-7 * std)
    assert d.std == pytest.approx(std, rel=1e-6) and d.kurtosis == pytest.approx(kurtosis, rel=1e-5)
    absmax = np.abs(x).max(axis=0)
    assert [c.channel for c in st.top_channels] == np.argsort(-absmax, kind="stable")[:8].tolist()
    assert [c.absmax for c in st.top_channels] == sorted(absmax.tolist(), reverse=True)[:8]
    assert st.dynamic_range == pytest.approx(absmax.max() / np.median(absmax))
    # the outlier test and the histogram's edges are the first chunk's; the rest spills over
    mean0, std0 = chunks[0].astype(np.float64).mean(), chunks[0].astype(np.float64).std()
    assert d.hist_edges[0] == pytest.approx(mean0 - 8 * std0) and d.hist_edges[-1] == pytest.approx(mean0 + 8 * std0)
    assert d.outlier_fraction == np.mean(np.abs(x - mean0) > 6 * std0) > 0
    expected = _histogram(x, d.hist_edges)
    assert d.hist_counts[0] == expected[0] > 0 and d.hist_counts[-1] == expected[-1] > 0
    assert np.abs(np.array(d.hist_counts) - expected).sum() <= 2


def test_an_outlier_channel_is_found_with_its_fire_rate():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    fires = rng.random(2000) < 0.1
    x[fires, 17] = 40.0  # 6 std of the whole input is about 11
    stats = StreamingStats()
    for part in np.array_split(x, 5):
        stats.add(part)
    st = stats.activation_stat()
    top = st.top_channels[0]
    assert (top.channel, top.absmax, top.fire_rate) == (17, 40.0, fires.mean())
    assert len(st.top_channels) == 8 and all(c.fire_rate == 0 for c in st.top_channels[1:])
    assert st.dynamic_range == pytest.approx(40.0 / np.median(np.abs(x).max(axis=0)))
    assert st.dist.outlier_fraction == fires.sum() / x.size


def test_non_finite_values_are_an_error():
    x = np.ones((4, 8), dtype=np.float32)
    x[2, 3] = np.inf
    stats = StreamingStats("blk.0.attn_in")
    stats.add(np.ones((4, 8), dtype=np.float32))
    with pytest.raises(MixquantError, match="blk.0.attn_in: non-finite values"):
        stats.add(x)
    x[2, 3] = np.nan
    with pytest.raises(MixquantError, match="non-finite"):
        weight_distribution(x)


def test_input_of():
    kinds = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert [input_of(f"blk.12.{k}.weight") for k in kinds] == (
        ["blk.12.attn_in"] * 3 + ["blk.12.attn_output_in"] + ["blk.12.ffn_in"] * 2 + ["blk.12.ffn_down_in"])
    assert input_of("output.weight") == "output_in" == input_of("token_embd.weight", tied_output=True)
    for name in ("token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.bias"):
        assert input_of(name) is None


TINY_CTX, TINY_CHUNKS = 34, 3
# 4 windows per batch, micro-batches of 16 tokens from each of the 3: the last 2 tokens of every
# window fall in a 6-token micro-batch that llama-imatrix does not collect
TINY_BATCH = {"n_batch": 136, "n_ubatch": 48}


def _tiny_calibrate(folder: Path, text: str, **kw):
    # kv_f16=False: the plain model the tests run themselves gives the same activations
    return calibrate(folder, text, TINY_CTX, TINY_CHUNKS, progress=False, kv_f16=False, **TINY_BATCH, **kw)


def _captured_activations(folder: Path, text: str) -> dict[str, np.ndarray]:
    """(tokens, channels) of every input the statistics cover, captured with our own hooks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    windows = token_windows(AutoTokenizer.from_pretrained(folder), text, TINY_CTX, TINY_CHUNKS)
    seen: dict[str, list[np.ndarray]] = {}

    def keep(key: str):
        def hook(_module, args, out=None):  # a pre-hook keeps the input, a forward hook the output
            x = args[0] if out is None else out
            seen.setdefault(key, []).append(x.reshape(-1, x.shape[-1]).numpy().copy())
        return hook

    hooks = [model.lm_head.register_forward_pre_hook(keep("output_in"))]
    for i, layer in enumerate(model.model.layers):
        hooks += [layer.self_attn.q_proj.register_forward_pre_hook(keep(f"blk.{i}.attn_in")),
                  layer.self_attn.o_proj.register_forward_pre_hook(keep(f"blk.{i}.attn_output_in")),
                  layer.mlp.gate_proj.register_forward_pre_hook(keep(f"blk.{i}.ffn_in")),
                  layer.mlp.down_proj.register_forward_pre_hook(keep(f"blk.{i}.ffn_down_in")),
                  layer.register_forward_hook(keep(f"blk.{i}.residual"))]
    with torch.inference_mode():
        for window in windows:
            model(input_ids=window[None])
    for h in hooks:
        h.remove()
    return {key: np.concatenate(parts) for key, parts in seen.items()}


@pytest.fixture(scope="module")
def tiny_cal(tmp_path_factory) -> dict:
    """A tied tiny llama and an untied one, calibrated; the tied one's activations captured."""
    root = tmp_path_factory.mktemp("tiny_calibrate")
    text = random_text(300, 1)
    tied, untied = (make_tiny_llama(root / name, vocab_size=300, intermediate_size=96, tie_word_embeddings=t)
                    for name, t in (("tied", True), ("untied", False)))
    return {"text": text, "tied": tied, "untied": untied,
            "cal": _tiny_calibrate(tied, text, output_importance=True),
            "acts": _captured_activations(tied, text)}


def test_activation_statistics_of_every_input(tiny_cal):
    cal, acts = tiny_cal["cal"], tiny_cal["acts"]
    stats = cal.activations
    per_block = ("attn_in", "attn_output_in", "ffn_in", "ffn_down_in", "residual")
    assert list(stats.stats) == [f"blk.{i}.{k}" for i in range(2) for k in per_block] + ["output_in"]
    assert (stats.chunks, stats.ctx, stats.tokens) == (TINY_CHUNKS, TINY_CTX, TINY_CHUNKS * TINY_CTX)
    assert {input_of(n) for n in cal.imatrix.names if n.startswith("blk.")} == {
        k for k in stats.stats if k != "output_in" and not k.endswith(".residual")}
    # every token counts, though the imatrix leaves out the last 2 of each window
    assert cal.imatrix.counts["blk.0.attn_q.weight"] == TINY_CHUNKS * (TINY_CTX - 2)
    for key, x in acts.items():
        st, (mean, std, kurtosis) = stats.stats[key], _moments(x)
        d = st.dist
        assert (st.n_tokens, st.n_channels, d.count) == (*x.shape, x.size), key
        assert d.absmax == np.abs(x).max(), key
        assert d.mean == pytest.approx(mean, abs=1e-6 * std), key
        assert d.std == pytest.approx(std, rel=1e-6) and d.kurtosis == pytest.approx(kurtosis, rel=1e-5), key
        absmax = np.abs(x).max(axis=0)
        assert [c.channel for c in st.top_channels] == np.argsort(-absmax, kind="stable")[:8].tolist(), key


def test_calibrate_imatrix_is_compute_imatrix(tiny_cal, tmp_path):
    folder, text = tiny_cal["tied"], tiny_cal["text"]
    kw = {"progress": False, "kv_f16": False, "dataset": "calib.txt", **TINY_BATCH}
    im = compute_imatrix(folder, text, TINY_CTX, TINY_CHUNKS, **kw)
    cal = calibrate(folder, text, TINY_CTX, TINY_CHUNKS, **kw)
    assert cal.activations is not None and "token_embd.weight" not in cal.imatrix
    assert (write_imatrix(cal.imatrix, tmp_path / "a.gguf").read_bytes()
            == write_imatrix(im, tmp_path / "b.gguf").read_bytes())
    assert calibrate(folder, text, TINY_CTX, TINY_CHUNKS, activations=False, **kw).activations is None
    # with output_importance, the other entries are the same
    extra = tiny_cal["cal"].imatrix
    assert set(extra.names) == set(im.names) | {"token_embd.weight"}
    assert all(extra.sums[n].tobytes() == im.sums[n].tobytes() and extra.counts[n] == im.counts[n] for n in im.names)


def test_output_importance_of_a_tied_output(tiny_cal):
    imatrix, x = tiny_cal["cal"].imatrix, tiny_cal["acts"]["output_in"]
    mask = imatrix_token_mask(TINY_CHUNKS, TINY_CTX, **TINY_BATCH).reshape(-1)
    assert imatrix.counts["token_embd.weight"] == mask.sum()
    mean_square = np.mean(x[mask].astype(np.float64) ** 2, axis=0)
    np.testing.assert_allclose(imatrix.importance("token_embd.weight"), mean_square, rtol=1e-5)
    # llama-imatrix never collects a tied output, not even with --process-output
    plain = _tiny_calibrate(tiny_cal["tied"], tiny_cal["text"], process_output=True, activations=False).imatrix
    assert "token_embd.weight" not in plain and "output.weight" not in plain


def test_output_importance_of_an_untied_output_is_process_output(tiny_cal, tmp_path):
    folder, text = tiny_cal["untied"], tiny_cal["text"]
    ours = _tiny_calibrate(folder, text, output_importance=True, activations=False).imatrix
    theirs = _tiny_calibrate(folder, text, process_output=True, activations=False).imatrix
    assert "token_embd.weight" not in ours and "output.weight" in theirs
    assert (write_imatrix(ours, tmp_path / "a.gguf").read_bytes()
            == write_imatrix(theirs, tmp_path / "b.gguf").read_bytes())


def test_activation_stats_round_trip(tiny_cal, tmp_path):
    stats = tiny_cal["cal"].activations
    path = stats.save(tmp_path / "activations.json")
    assert json.loads(path.read_text())["schema"] == ACTIVATIONS_SCHEMA == "mixquant.activations/1"
    assert ActivationStats.load(path) == stats
    assert [p.name for p in tmp_path.iterdir()] == ["activations.json"]  # no temporary file left
    with pytest.raises(MixquantError, match="output folder does not exist"):
        stats.save(tmp_path / "nowhere" / "activations.json")


def test_activation_stats_bad_files(tiny_cal, tmp_path):
    good = tiny_cal["cal"].activations.to_dict()
    text = json.dumps(good)
    bad_hist = copy.deepcopy(good)
    bad_hist["stats"]["blk.0.attn_in"]["dist"]["hist_counts"] = [1, 2]
    cases = {
        "missing.json": (None, "cannot read"),
        "truncated.json": (text[: len(text) // 2], "not JSON"),
        "empty.json": ("", "not JSON"),
        "sensitivity.json": (json.dumps({**good, "schema": "mixquant.sensitivity/1"}),
                             "schema 'mixquant.sensitivity/1' is not supported"),
        "list.json": ("[1, 2]", "not an activation statistics file"),
        "missing_field.json": (json.dumps({**good, "stats": {"blk.0.attn_in": {"n_tokens": 3}}}), "malformed"),
        "bad_hist.json": (json.dumps(bad_hist), "malformed .*2 histogram counts for 65 edges"),
    }
    for name, (data, match) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_text(data)
        with pytest.raises(MixquantError, match=match) as info:
            ActivationStats.load(path)
        assert "\n" not in str(info.value) and str(path) in str(info.value), name
