"""analyze --method gptq: every candidate quantized with GPTQ's rounding through the run's Hessians,
on a tiny random llama; rtn's numbers unchanged; the method and GPTQ's options recorded, an
allocation of another method refused, and one without --gptq-* flags written with the options
its damages were measured with."""

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from mixquant import formats
from mixquant.analyze import Sensitivity, analyze, predicted_error
from mixquant.analyze.run import _fingerprint
from mixquant.calibrate import calibrate, input_of, write_imatrix
from mixquant.cli import main
from mixquant.errors import MixquantError
from mixquant.hessians import Hessians
from mixquant.quantize import gptq
from mixquant.source import open_source
from mixquant.text import read_text

from conftest import run_quantize as run

TYPES = ["Q4_0", "Q5_1", "Q4_K"]
OPTIONS = {"damp": 0.1, "act_order": True, "refit": gptq.DEFAULT_REFIT, "resweeps": 0}  # not the defaults


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny tied llama, its imatrix and Hessians (8 windows of 64), and both analyses of it
    (every pair measured on 2 held-out windows of 64)."""
    from conftest import tiny_model_and_text

    root = tmp_path_factory.mktemp("tiny_analyze_gptq")
    model, text = tiny_model_and_text(root, 2000, seed=1)
    cal = calibrate(model, read_text(text), 64, 8, progress=False, activations=False, output_importance=True,
                    hessians=True)
    hess = cal.hessians.save(root / "hessians.safetensors")
    common = dict(text=text, n_windows=2, ctx=64, types=TYPES, measure="all", fisher=True, threads=1, progress=False)
    sens = {m: analyze(model, cal.imatrix, method=m, hessians=hess if m == "gptq" else None, **common)
            for m in ("rtn", "gptq")}
    for m, s in sens.items():
        s.save(root / f"sensitivity-{m}.json")
    # predicted error only, with GPTQ's options other than the defaults
    options = analyze(model, cal.imatrix, method="gptq", hessians=hess, gptq_options=OPTIONS,
                      **{**common, "measure": "none", "fisher": False})
    options.save(root / "sensitivity-options.json")
    return {"root": root, "model": model, "text": text, "imatrix": cal.imatrix, "hessians": Hessians.load(hess),
            "sens": sens, "options": options}


def _pairs(tiny):
    """(name, type, weight, importance, H) of every quantized pair with a Hessian."""
    with open_source(tiny["model"]) as src:
        for name, t in tiny["sens"]["gptq"].tensors.items():
            key = input_of(name, tied_output=True)
            if t.fixed or key not in tiny["hessians"]:
                continue
            w = np.ascontiguousarray(src.tensor(name), dtype=np.float32).reshape(-1, t.shape[-1])
            for typ in t.types:
                if typ != "F32":
                    yield name, typ, w, tiny["imatrix"].importance(name), tiny["hessians"].matrix(key)


def test_rtn_is_round_to_nearest_and_records_its_method(tiny):
    sens = tiny["sens"]["rtn"]
    assert sens.settings["method"] == "rtn" and "hessians" not in sens.settings
    for name, typ, w, imp, _ in _pairs(tiny):
        q = formats.dequantize(formats.quantize(w, typ, importance=imp), typ, w.shape)
        assert sens.tensors[name].types[typ].predicted == predicted_error(w, q, imp), (name, typ)


def test_gptq_damages_are_those_of_gptq_bytes_and_lower(tiny):
    rtn, gq = tiny["sens"]["rtn"], tiny["sens"]["gptq"]
    assert gq.settings["method"] == "gptq" and gq.settings["damp"] == gptq.DEFAULT_DAMP
    names = set()
    for name, typ, w, imp, h in _pairs(tiny):
        cost = gq.tensors[name].types[typ]
        q = formats.dequantize(gptq.quantize(w, typ, h, imp), typ, w.shape)
        assert cost.predicted == predicted_error(w, q, imp, hessian=h), (name, typ)  # the bytes quantize writes
        q_rtn = formats.dequantize(formats.quantize(w, typ, importance=imp), typ, w.shape)
        assert cost.predicted <= predicted_error(w, q_rtn, imp, hessian=h), (name, typ)
        assert cost.measured is not None and cost.fisher is not None
        names.add(name)
    assert len(names) == 15  # 7 tensors x 2 blocks and the tied embedding (the output's input)
    # the measured damage follows: lower summed over the blocks' pairs (the tied embedding aside,
    # whose Hessian is only its output role's)
    blocks = [(name, typ) for name, t in gq.tensors.items() if name.startswith("blk.") and not t.fixed
              for typ in t.types if typ != "F32"]
    assert sum(gq.tensors[n].types[t].measured for n, t in blocks) < \
        0.9 * sum(rtn.tensors[n].types[t].measured for n, t in blocks)


def test_gptq_needs_hessians_of_this_model(tiny, tmp_path):
    with pytest.raises(MixquantError, match="needs the inputs' Hessians"):
        analyze(tiny["model"], tiny["imatrix"], measure="none", method="gptq")
    with pytest.raises(MixquantError, match="method must be one of"):
        analyze(tiny["model"], tiny["imatrix"], measure="none", method="awq-ish")
    other = Hessians(model={"arch": "llama", "n_layer": 7, "n_embd": 64}, rows={}, sums={})
    with pytest.raises(MixquantError, match="another model"):
        analyze(tiny["model"], tiny["imatrix"], measure="none", method="gptq", hessians=other)


def test_resume_fingerprint_includes_method_and_hessians(tiny):
    with open_source(tiny["model"]) as src:
        base = dict(src=src, plan=[], sweep_types=[], importance={}, ref=None)
        rtn = _fingerprint(settings={"method": "rtn"}, hessians=None, **base)
        gq = _fingerprint(settings={"method": "gptq", "damp": 0.01}, hessians=tiny["hessians"], **base)
        h2 = Hessians(model=tiny["hessians"].model, rows=dict(tiny["hessians"].rows),
                      sums={k: tiny["hessians"].matrix(k) * 2 for k in tiny["hessians"].rows})
        assert len({rtn, gq, _fingerprint(settings={"method": "gptq", "damp": 0.01}, hessians=h2, **base)}) == 3


def test_allocation_refuses_a_sensitivity_of_another_method(tiny, tmp_path, capsys):
    root, model = tiny["root"], tiny["model"]
    out = tmp_path / "out.gguf"
    rc = main(["quantize", str(model), str(out), "--target-bpw", "6", "--sensitivity",
               str(root / "sensitivity-gptq.json")])
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert err.strip().splitlines() == [f"mixquant: error: {root / 'sensitivity-gptq.json'}: measured with --method "
                                        "gptq, but this allocation writes --method rtn; give --method gptq, or "
                                        "analyse with --method rtn"]
    rc = main(["quantize", str(model), str(out), "--target-bpw", "6", "--sensitivity", str(root / "sensitivity-rtn.json"),
               "--method", "gptq", "--hessians", str(root / "hessians.safetensors")])
    assert rc == 1 and "measured with --method rtn" in capsys.readouterr().err and not out.exists()


def test_awq_allocates_on_its_base_methods_damages(tiny, tmp_path, capsys):
    """AWQ's scales depend on the plan, so `--method awq+gptq` allocates on gptq damages (and awq on
    rtn's), then searches the scales for the allocated plan: the same plan as --method gptq's, other
    bytes; a sensitivity of the other rounding is refused in one line."""
    from gguf import GGUFReader

    root, model = tiny["root"], tiny["model"]
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix(tiny["imatrix"], imatrix)
    common = ["--target-bpw", "6", "--hessians", root / "hessians.safetensors", "--imatrix", imatrix, "--threads", "1"]
    files = {}
    for method in ("gptq", "awq+gptq"):
        files[method] = tmp_path / f"{method}.gguf"
        rc, err = run(capsys, model, files[method], "--method", method, "--sensitivity", root / "sensitivity-gptq.json",
                      *common)
        assert rc == 0, err
    assert "awq: the plan was allocated on gptq damages; the scales are searched for it" in err
    kinds = [{t.name: (t.tensor_type, bytes(t.data)) for t in GGUFReader(f).tensors} for f in files.values()]
    assert {n: t for n, (t, _) in kinds[0].items()} == {n: t for n, (t, _) in kinds[1].items()}
    assert any(kinds[0][n][1] != kinds[1][n][1] for n in kinds[0])  # the scales changed something
    rc, err = run(capsys, model, tmp_path / "awq.gguf", "--method", "awq", "--sensitivity",
                  root / "sensitivity-gptq.json", *common)
    assert rc == 1 and err.count("\n") == 1 and not (tmp_path / "awq.gguf").exists()
    assert "measured with --method gptq, but this allocation writes --method awq (allocated on rtn damages); " \
           "give --method gptq, or analyse with --method rtn" in err, err


@pytest.mark.slow
def test_cli_analyze_gptq_then_allocate_with_it(tiny, tmp_path, capsys):
    """`analyze --method gptq` on its own calibration, then `quantize --target-bpw --method gptq`
    with its sensitivity and Hessians: the written file holds the allocated plan."""
    model, text = tiny["model"], tiny["text"]
    folder = tmp_path / "analysis"
    assert main(["analyze", str(model), "--text", str(text), "-o", str(folder), "--ctx", "64", "--chunks", "4",
                 "--windows", "1", "--types", "Q4_0,Q5_1,Q8_0", "--sweep-types", "", "--no-report",
                 "--threads", "1", "--method", "gptq"]) == 0
    assert "pairs measured on" in capsys.readouterr().out
    sens = Sensitivity.load(folder / "sensitivity.json")
    assert sens.settings["method"] == "gptq"
    assert sens.settings["hessians"] == str(folder / "hessians.safetensors")
    out = tmp_path / "alloc.gguf"
    assert main(["quantize", str(model), str(out), "--target-bpw", "6", "--sensitivity", str(folder / "sensitivity.json"),
                 "--imatrix", str(folder / "imatrix.gguf"), "--method", "gptq",
                 "--hessians", str(folder / "hessians.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "allocation:" in err and "rounded with error feedback" in err
    assert out.stat().st_size > 0
    assert main(["analyze", str(model), "--text", str(text), "-o", str(tmp_path / "b"), "--method", "gptq",
                 "--no-hessians"]) == 1
    assert "leave out --no-hessians" in capsys.readouterr().err
    assert main(["analyze", str(model), "--text", str(text), "-o", str(tmp_path / "c"),
                 "--hessians", str(folder / "hessians.safetensors")]) == 1
    assert "--hessians goes with --method gptq" in capsys.readouterr().err
    assert json.loads((folder / "sensitivity.json").read_text())["settings"]["method"] == "gptq"
    assert Path(folder / "hessians.safetensors").is_file()


# --------------------------------------------------------------------------------------------
# GPTQ's options: measured with, recorded, and written with


def test_options_are_recorded_and_measured_with(tiny):
    """analyze(gptq_options=...) rounds every candidate with them and records every one."""
    assert {k: tiny["sens"]["gptq"].settings[k] for k in ("damp", "act_order", "refit", "resweeps")} == \
        asdict(gptq.GptqOptions()) == {"damp": 0.01, "act_order": False, "refit": gptq.DEFAULT_REFIT, "resweeps": 0}
    sens = tiny["options"]
    assert {k: sens.settings[k] for k in ("damp", "act_order", "refit", "resweeps")} == OPTIONS
    changed = 0
    for name, typ, w, imp, h in _pairs(tiny):
        q = formats.dequantize(gptq.quantize(w, typ, h, imp, **OPTIONS), typ, w.shape)
        assert sens.tensors[name].types[typ].predicted == predicted_error(w, q, imp, hessian=h), (name, typ)
        changed += sens.tensors[name].types[typ].predicted != tiny["sens"]["gptq"].tensors[name].types[typ].predicted
    assert changed > 30
    with pytest.raises(MixquantError, match="GPTQ's options go with method 'gptq'"):
        analyze(tiny["model"], tiny["imatrix"], measure="none", gptq_options={"damp": 0.1})
    with pytest.raises(MixquantError, match="--gptq-damp must be a finite fraction"):
        analyze(tiny["model"], tiny["imatrix"], measure="none", method="gptq", hessians=tiny["hessians"],
                gptq_options={"damp": -1.0})


def test_resume_fingerprint_includes_every_option(tiny):
    with open_source(tiny["model"]) as src:
        base = dict(src=src, plan=[], sweep_types=[], importance={}, ref=None, hessians=tiny["hessians"])
        default = {"method": "gptq", **asdict(gptq.GptqOptions())}
        prints = {_fingerprint(settings=default, **base)}
        for name, value in {"damp": 0.1, "act_order": True, "refit": not gptq.DEFAULT_REFIT, "resweeps": 2}.items():
            prints.add(_fingerprint(settings={**default, name: value}, **base))
        assert len(prints) == 5


def test_a_file_older_than_the_options_reads_as_measured_then():
    """damp was always recorded; order and resweeps were natural and 0; a missing refit is today's default."""
    assert gptq.GptqOptions.recorded({"method": "gptq", "damp": 0.01}) == gptq.GptqOptions()
    assert gptq.GptqOptions.recorded({"damp": 0.05, "act_order": True, "refit": False, "resweeps": 0}) == \
        gptq.GptqOptions(damp=0.05, act_order=True, refit=False)
    for bad, message in [({"damp": "0.01"}, "settings.damp is '0.01', not a number"),
                         ({"refit": 1}, "settings.refit is 1, not true or false"),
                         ({"resweeps": 1.5}, "settings.resweeps is 1.5, not a whole number"),
                         ({"damp": -1}, "--gptq-damp must be a finite fraction >= 0, got -1")]:
        with pytest.raises(MixquantError, match=re.escape(message)):
            gptq.GptqOptions.recorded(bad)


def _gguf_tensors(path):
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, bytes(t.data)) for t in GGUFReader(path).tensors}


def _assert_rounded_with(path, tiny, options):
    """Every tensor of the GGUF `path` with a Hessian and a type of TYPES holds gptq.quantize's bytes
    with `options` (and the tiny imatrix's importance)."""
    rounded = 0
    with open_source(tiny["model"]) as src:
        for name, (typ, data) in _gguf_tensors(path).items():
            key = input_of(name, tied_output=True)
            if typ in TYPES and key in tiny["hessians"]:
                w = np.ascontiguousarray(src.tensor(name), dtype=np.float32).reshape(-1, src.tensor(name).shape[-1])
                h, imp = tiny["hessians"].matrix(key), tiny["imatrix"].importance(name)
                assert data == gptq.quantize(w, typ, h, imp, **options), name
                rounded += 1
    assert rounded >= 5, rounded


def test_allocation_writes_with_the_options_it_was_measured_with(tiny, tmp_path, capsys):
    """No --gptq-* flag: the sensitivity's options, the same bytes as with those flags given, and as
    gptq.quantize with them; a flag that differs is refused in one line, nothing written."""
    root, model = tiny["root"], tiny["model"]
    sens = root / "sensitivity-options.json"
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix(tiny["imatrix"], imatrix)
    common = ["--target-bpw", "6", "--sensitivity", sens, "--hessians", root / "hessians.safetensors",
              "--imatrix", imatrix, "--threads", "1"]
    adopted, explicit = tmp_path / "adopted.gguf", tmp_path / "explicit.gguf"
    rc, err = run(capsys, model, adopted, "--method", "gptq", *common)
    assert rc == 0, err
    assert f"gptq: rounding as {sens} was measured: --gptq-order act --gptq-refit --gptq-damp 0.1 " \
           "--gptq-resweeps 0\n" in err
    rc, err = run(capsys, model, explicit, "--method", "gptq", "--gptq-damp", "0.1", "--gptq-order", "act", *common)
    assert rc == 0, err
    assert _gguf_tensors(adopted) == _gguf_tensors(explicit)
    _assert_rounded_with(adopted, tiny, OPTIONS)

    for method, flags, message in [
        ("gptq", ["--gptq-damp", "0.01"], "measured with --gptq-damp 0.1, but this allocation writes --gptq-damp 0.01; "
                                          "leave it out to write what was measured, or analyse with --gptq-damp 0.01"),
        ("awq+gptq", ["--gptq-order", "natural", "--no-gptq-refit"],
         "measured with --gptq-order act --gptq-refit, but this allocation writes --gptq-order natural "
         "--no-gptq-refit; leave them out to write what was measured, or analyse with --gptq-order natural "
         "--no-gptq-refit")]:
        out = tmp_path / f"refused-{method}.gguf"
        rc, err = run(capsys, model, out, "--method", method, *flags, *common)
        assert rc == 1 and err == f"mixquant: error: {sens}: {message}\n", err
        assert not list(tmp_path.glob("refused*"))


def test_analysing_on_the_fly_uses_the_options_it_writes_with(tiny, tmp_path, capsys, monkeypatch):
    """quantize --target-* --text (no --sensitivity) analyses with the --gptq-* flags it writes with."""
    import mixquant.analyze

    analysed = []

    def fewer_types(*args, **kwargs):  # the on-the-fly analysis itself, on TYPES only (test time)
        analysed.append(real(*args, **{**kwargs, "types": TYPES}))
        return analysed[-1]

    real = mixquant.analyze.analyze
    monkeypatch.setattr(mixquant.analyze, "analyze", fewer_types)
    imatrix = tmp_path / "imatrix.gguf"
    write_imatrix(tiny["imatrix"], imatrix)
    out = tmp_path / "fly.gguf"
    rc, err = run(capsys, tiny["model"], out, "--target-bpw", "6", "--method", "gptq", "--text", tiny["text"],
                  "--hessians", tiny["root"] / "hessians.safetensors", "--imatrix", imatrix, "--gptq-damp", "0.1",
                  "--gptq-order", "act", "--threads", "1")
    assert rc == 0, err
    assert [{k: s.settings[k] for k in OPTIONS} for s in analysed] == [OPTIONS]
    _assert_rounded_with(out, tiny, OPTIONS)


def test_analyze_refuses_gptq_flags_without_gptq(tiny, tmp_path, capsys):
    folder = tmp_path / "a"
    for flags, flag in [(["--gptq-damp", "0.1"], "--gptq-damp"), (["--no-gptq-refit"], "--no-gptq-refit")]:
        rc = main(["analyze", str(tiny["model"]), "--text", str(tiny["text"]), "-o", str(folder), *flags])
        err = capsys.readouterr().err
        assert rc == 1 and err == f"mixquant: error: {flag} goes with --method gptq\n", err
        assert not folder.exists()
