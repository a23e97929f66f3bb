"""The public codec API: validation of bad input, geometry, and byte-exactness on the real model."""

import numpy as np
import pytest

from mixquant import formats

ALL = formats.FORMATS


def test_all_required_formats_are_registered():
    assert set(ALL) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                        "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}


@pytest.mark.parametrize("name", ALL)
def test_geometry_matches_ggml(ggml, name):
    codec = formats.get(name)
    traits = ggml.lib.ggml_get_type_traits(int(codec.ggml_type)).contents
    assert (codec.block_size, codec.type_size) == (traits.blck_size, traits.type_size)
    assert codec.bits_per_weight == pytest.approx(8 * traits.type_size / traits.blck_size)
    assert formats.quantized_size(name, (3, 512)) == 3 * ggml.lib.ggml_row_size(int(codec.ggml_type), 512)


def test_type_names_are_case_insensitive():
    assert formats.get("q4_k") is formats.get("Q4_K")


@pytest.mark.parametrize(
    "x, type_name, importance, message",
    [
        (np.zeros((2, 100), np.float32), "Q4_K", None, "multiple of 256"),
        (np.zeros((2, 48), np.float32), "Q4_0", None, "multiple of 32"),
        (np.full((2, 32), np.nan, np.float32), "Q8_0", None, "NaN/Inf"),
        (np.array([[0.0] * 31 + [np.inf]], np.float32), "Q4_0", None, "NaN/Inf"),
        (np.zeros((2, 32), np.float64), "Q4_0", None, "float32"),
        (np.zeros(32, np.float32), "Q4_0", None, "2-D"),
        (np.zeros((2, 32), np.float32), "Q4_0", np.ones(16, np.float32), "length 32"),
        (np.zeros((2, 32), np.float32), "Q4_0", np.full(32, -1, np.float32), "non-negative"),
        (np.zeros((2, 32), np.float32), "Q9_K", None, "unknown tensor type 'Q9_K'"),
        ([[0.0] * 32], "Q4_0", None, "numpy array"),
    ],
)
def test_bad_input_is_a_clear_value_error(x, type_name, importance, message):
    with pytest.raises(ValueError, match=message):
        formats.quantize(x, type_name, importance)


def test_dequantize_checks_length_and_shape():
    data = formats.quantize(np.ones((2, 64), np.float32), "Q4_0")
    with pytest.raises(ValueError, match="must be 72 bytes, got 71"):
        formats.dequantize(data[:-1], "Q4_0", (2, 64))
    with pytest.raises(ValueError, match="2-D"):
        formats.dequantize(data, "Q4_0", (128,))


@pytest.mark.parametrize("name", ALL)
def test_threads_give_the_same_bytes(name):
    x = np.random.default_rng(3).standard_normal((300, 512)).astype(np.float32)
    assert formats.quantize(x, name, threads=2) == formats.quantize(x, name)


@pytest.fixture(scope="module")
def real_tensors():
    from safetensors import safe_open

    from mixquant.testdata import build_test_model

    with safe_open(build_test_model() / "model.safetensors", "np") as f:
        yield {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_real_tensor_is_byte_identical_to_ggml(ggml, real_tensors, name):
    """Every 2-D tensor of the test model whose rows fit the block size, without and with importance."""
    codec = formats.get(name)
    rng = np.random.default_rng(0)
    checked = 0
    for tensor_name, w in real_tensors.items():
        if w.ndim != 2 or w.shape[1] % codec.block_size:
            continue
        importance = np.exp(rng.normal(0, 2, w.shape[1])).astype(np.float32)
        for imp in (None, importance) if codec.uses_importance else (None,):
            ours = formats.quantize(w, name, imp, threads=2)
            assert ours == ggml.quantize(w, name, imp), f"{tensor_name} differs (importance={imp is not None})"
        back = formats.dequantize(ours, name, w.shape)
        assert np.array_equal(back.view(np.uint32), ggml.dequantize(ours, name, w.shape).view(np.uint32))
        checked += 1
    assert checked >= (30 if codec.block_size == 256 else 200)
