"""GPTQ inside GGUF blocks: exactly round-to-nearest when there is no error to feed back (a diagonal H),
lower output error than round-to-nearest on correlated inputs, clear errors on bad Hessians."""

import numpy as np
import pytest

from mixquant import formats
from mixquant.errors import MixquantError
from mixquant.quantize import output_error, quantize

from conftest import importance_cases, tensor_cases

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
COLS = 512


def _diagonal_hessian(seed: int, dead: bool) -> np.ndarray:
    d = np.exp(np.random.default_rng(seed).normal(0, 2, COLS))
    if dead:
        d[::7] = 0.0  # dead inputs
    return np.diag(d)


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_diagonal_hessian_gives_the_round_to_nearest_bytes(type_name):
    """No off-diagonal H: no error moves, so every block's fit and every code are ggml's own (without
    the refit, which may still move a scale where the diagonal-weighted error goes down)."""
    for dead in (False, True):
        h = _diagonal_hessian(3, dead)
        for case, x in tensor_cases(COLS, 8).items():
            for imp_name, imp in importance_cases(COLS).items():
                ref = formats.quantize(x, type_name, imp)
                assert quantize(x, type_name, h, imp, refit=False) == ref, (case, imp_name, dead)
                assert quantize(x, type_name, h, imp, act_order=True, refit=False) == ref, (case, imp_name, dead,
                                                                                           "act-order")


def _correlated(rows: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    mix = np.eye(COLS) + 2 * rng.standard_normal((COLS, COLS)) / np.sqrt(COLS)
    x = (rng.standard_normal((2048, COLS)) @ mix) * np.exp(rng.normal(0, 1, COLS))
    x[:, 5] = 0.0  # a dead input
    h = x.T @ x
    w = rng.standard_normal((rows, COLS)).astype(np.float32)
    return w, h, (np.diag(h) / len(x)).astype(np.float32)


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_correlated_hessian_lowers_the_output_error(type_name):
    w, h, imp = _correlated(32)
    for importance in (None, imp):
        rtn = formats.dequantize(formats.quantize(w, type_name, importance), type_name, w.shape)
        data = quantize(w, type_name, h, importance)
        gptq = formats.dequantize(data, type_name, w.shape)  # ordinary blocks of the type
        ratio = output_error(w, gptq, h) / output_error(w, rtn, h)
        assert ratio < 0.85, (type_name, importance is not None, ratio)
        static = formats.dequantize(quantize(w, type_name, h, importance, act_order=True), type_name, w.shape)
        assert output_error(w, static, h) / output_error(w, rtn, h) < 0.85, (type_name, "act-order")


def test_float_types_and_no_hessian_are_round_to_nearest():
    w, h, imp = _correlated(4)
    for t in ("F32", "F16", "BF16", "Q4_K"):
        assert quantize(w, t, None, imp) == formats.quantize(w, t, imp)
    assert quantize(w, "F16", h, imp) == formats.quantize(w, "F16", imp)


def test_bad_hessians_are_clear_errors():
    w, h, imp = _correlated(4)
    with pytest.raises(MixquantError, match="does not fit a tensor with 512 columns"):
        quantize(w, "Q4_0", h[:256, :256], imp)
    bad = h.copy()
    bad[3, 4] = np.nan
    with pytest.raises(MixquantError, match="NaN or infinite"):
        quantize(w, "Q4_0", bad, imp)
    singular = np.ones((COLS, COLS))  # rank 1
    with pytest.raises(MixquantError, match="singular"):
        quantize(w, "Q4_0", singular, imp, damp=0.0)
    quantize(w, "Q4_0", singular, imp)  # the default damping makes it usable


def _codes_and_params(data: bytes, type_name: str, rows: int):
    codec = formats.get(type_name)
    fr = codec.frozen(True)
    blocks = np.frombuffer(data, np.uint8).reshape(rows, -1, codec.type_size)
    return fr, [(fr.layout.unpack(blocks[:, b]), fr.scales.read(blocks[:, b])) for b in range(blocks.shape[1])]


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_block_scales_are_the_decoders(type_name):
    """Each format's stored parameters as `BlockScales` reads them, changed at random within their
    ranges and written back, decode (ggml's decoder) to exactly the values the refit computes."""
    from mixquant.quantize.gptq import _block_values

    rng = np.random.default_rng(4)
    x = tensor_cases(COLS, 8)["gaussian"]
    codec = formats.get(type_name)
    data = np.frombuffer(formats.quantize(x, type_name, None), np.uint8).reshape(8, -1).copy()
    fr, blocks = _codes_and_params(data.tobytes(), type_name, 8)
    bs = fr.scales
    for b, (_codes, (d, dmin, sc, m)) in enumerate(blocks):
        view = data[:, b * codec.type_size:(b + 1) * codec.type_size]
        assert np.array_equal(bs.write(view, d, dmin, sc, m), view)  # read and write agree
        d = (d * rng.uniform(0.5, 2, d.shape)).astype(np.float16).astype(np.float32)
        dmin = rng.normal(0, 0.1, d.shape).astype(np.float16).astype(np.float32)
        sc = rng.integers(bs.scale_range[0], bs.scale_range[1] + 1, sc.shape)
        lo, hi = bs.min_range or (0, 0)
        m = rng.integers(lo, hi + 1, m.shape)
        view[:] = bs.write(view, d, dmin, sc, m)
        got = bs.read(view)
        assert np.array_equal(got[0], d) and np.array_equal(got[2], sc)
        if bs.min_range is not None:
            assert np.array_equal(got[1], dmin) and np.array_equal(got[3], m)
    deq = codec.dequantize_rows(data)
    size = codec.block_size
    for b, (codes, (d, dmin, sc, m)) in enumerate(_codes_and_params(data.tobytes(), type_name, 8)[1]):
        values = np.empty((8, size))
        _block_values(d, dmin, sc, m, codes, fr.values.astype(np.float32).astype(np.float64), bs.sub_block,
                      bs.min_range is not None, bs.min_sign, values)
        assert np.array_equal(values, deq[:, b * size:(b + 1) * size]), b


@pytest.mark.parametrize("type_name", BLOCK_TYPES)
def test_refit_keeps_the_codes_and_never_raises_a_rows_error(type_name):
    """--gptq-refit moves only the stored scales, and only where the Hessian-weighted error (of the
    decoded values, the dampened H the sweep minimises) goes down: per row it never goes up, and
    over correlated inputs it goes down."""
    from mixquant.quantize.gptq import dampened

    w, h, imp = _correlated(16)
    hd = dampened(h)
    cases = {**tensor_cases(COLS, 16), "correlated": w}
    total = [0.0, 0.0]
    for case, x in cases.items():
        for importance in (None, imp):
            plain = quantize(x, type_name, h, importance, refit=False)
            refit = quantize(x, type_name, h, importance, refit=True)
            (_, before), (_, after) = (_codes_and_params(d, type_name, 16) for d in (plain, refit))
            assert all(np.array_equal(a[0], b[0]) for a, b in zip(before, after)), case  # the same codes
            errors = []
            for data in (plain, refit):
                dw = x.astype(np.float64) - formats.dequantize(data, type_name, x.shape)
                errors.append(np.einsum("ij,ij->i", dw @ hd, dw))
            assert (errors[1] <= errors[0] * (1 + 1e-12)).all(), (case, importance is None)
            if case == "correlated":
                total = [total[0] + errors[0].sum(), total[1] + errors[1].sum()]
    assert total[1] < 0.99 * total[0], total


def test_refit_with_a_diagonal_hessian_keeps_the_round_to_nearest_codes():
    """With a diagonal H the sweep gives ggml's bytes (the anchor above, refit off); the refit then
    only moves scales: the codes stay round-to-nearest's."""
    h = _diagonal_hessian(3, False)
    x = tensor_cases(COLS, 8)["gaussian"]
    for type_name in ("Q4_K", "Q4_0"):
        _, a = _codes_and_params(formats.quantize(x, type_name, None), type_name, 8)
        _, b = _codes_and_params(quantize(x, type_name, h, None, refit=True), type_name, 8)
        assert all(np.array_equal(p[0], q[0]) for p, q in zip(a, b))


@pytest.mark.parametrize("type_name", ["Q4_0", "Q5_1", "Q3_K", "Q8_0", "IQ4_NL"])
def test_resweeps_never_raise_a_rows_error(type_name):
    """A resweep (the sweep again with the refitted scales frozen, then refitted) keeps a row only
    where its error went down; formats whose codes are not consecutive integers are left as refitted."""
    from mixquant.quantize.gptq import dampened

    w, h, imp = _correlated(16)
    hd = dampened(h)
    errors = []
    for resweeps in (0, 1):
        dw = w.astype(np.float64) - formats.dequantize(quantize(w, type_name, h, imp, refit=True, resweeps=resweeps),
                                                      type_name, w.shape)
        errors.append(np.einsum("ij,ij->i", dw @ hd, dw))
    assert (errors[1] <= errors[0]).all()
    if type_name in ("Q8_0", "IQ4_NL"):
        assert np.array_equal(errors[0], errors[1])
    else:
        assert errors[1].sum() < errors[0].sum()


@pytest.mark.parametrize("type_name, act_order", [("Q4_K", False), ("Q4_0", True), ("IQ4_NL", False)])
def test_row_slices_give_the_whole_tensors_bytes(type_name, act_order, monkeypatch):
    """A large tensor is rounded a slice of rows at a time (bounded float64 copies): rows are
    independent under GPTQ, so the bytes are the whole tensor's, refit and act-order included."""
    import mixquant.quantize.gptq as gptq

    w, h, imp = _correlated(24)
    whole = quantize(w, type_name, h, imp, act_order=act_order)
    monkeypatch.setattr(gptq, "_SLICE_VALUES", 5 * w.shape[1])  # slices of 5 rows, the last one 4
    assert quantize(w, type_name, h, imp, act_order=act_order) == whole
