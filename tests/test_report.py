"""`mixquant analyze` end to end on a tiny random llama: the files it writes, the report's numbers
and plots, and its one-line errors."""

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_model_and_text

from mixquant.analyze import Sensitivity, rank_correlation
from mixquant.calibrate import ActivationStats, read_imatrix
from mixquant.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("analyze_cli")
    model, text = tiny_model_and_text(root, 3000, seed=2)
    out = root / "analysis"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["analyze", str(model), "--text", str(text), "-o", str(out), "--ctx", "64", "--chunks", "4",
                   "--windows", "1", "--types", "Q4_0,Q5_1,Q8_0,Q2_K,Q4_K", "--threads", "1"])
    assert rc == 0
    return out, buf.getvalue()


def test_analyze_writes_every_output(analysis):
    out, stdout = analysis
    for name in ("imatrix.gguf", "activations.json", "sensitivity.json", "report.html", "hessians.safetensors"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*partial*"))
    imatrix = read_imatrix(out / "imatrix.gguf")
    assert imatrix.chunks == 4 and "token_embd.weight" in imatrix  # output importance of the tied output
    sens = Sensitivity.load(out / "sensitivity.json")
    assert sens.layer_sweep and {r.type for r in sens.layer_sweep} == {"Q4_0", "Q2_K"}
    assert sens.basis == "fisher"
    assert all(t.weights is not None for t in sens.tensors.values() if not t.fixed)
    acts = ActivationStats.load(out / "activations.json")
    assert {"blk.0.attn_in", "blk.1.ffn_down_in", "blk.1.residual"} <= set(acts.stats)
    # the stage table: every stage timed, the bench parses these lines
    stages = dict(re.findall(r"^  (\S.*?)\s+([0-9.]+) s$", stdout, re.M))
    assert {"calibration (imatrix, activations)", "sensitivity: reference pass", "sensitivity: Fisher",
            "sensitivity: quantize, measure, sweep", "report"} <= set(stages)


def test_report_states_the_numbers_it_shows(analysis):
    out, _ = analysis
    page = (out / "report.html").read_text()
    sens = Sensitivity.load(out / "sensitivity.json")
    for kind in ("predicted", "fisher"):
        rho = rank_correlation(sens, kind=kind)["rho"]
        assert f"Spearman ρ = {rho:.3f}" in page
    assert "Layer sweep at Q4_0" in page and "Residual stream" in page
    for img in re.findall(r"src='(plots/[^']+)'", page):
        assert (out / img).read_bytes()[:8] == PNG_MAGIC, img
    assert {"plots/heatmap.png", "plots/predicted_vs_measured.png", "plots/layer_sweep.png",
            "plots/residual_stream.png", "plots/histograms.png"} <= set(re.findall(r"src='(plots/[^']+)'", page))


def test_activation_table_lists_the_heaviest_tailed_input_first(analysis):
    out, _ = analysis
    acts = ActivationStats.load(out / "activations.json")
    inputs = {k: s for k, s in acts.stats.items() if not k.endswith(".residual")}
    heaviest = max(inputs, key=lambda k: inputs[k].dist.kurtosis)
    page = (out / "report.html").read_text()
    table = page[page.index("by kurtosis"):]
    assert table.index(heaviest) == min(table.index(k) for k in inputs if k in table)
    assert np.isfinite([s.dynamic_range for s in inputs.values()]).all()


@pytest.mark.parametrize("argv, message", [
    (["--text", "{missing}"], "no such text file"),
    (["--text", "{text}", "--types", "Q9_9"], "Q9_9"),
    (["--text", "{text}", "--sweep-types", "Q4_0,Q9"], "'Q9'"),
    (["--text", "{text}", "--windows", "0"], "--windows must be at least 1, got 0"),
    (["--text", "{text}", "--chunks", "0"], "--chunks must be at least 1, got 0"),
    (["--text", "{text}", "--ctx", "8"], "--ctx must be at least 16, got 8"),
    (["--text", "{text}", "-o", "{file}"], "exists and is not a folder"),
])
def test_analyze_errors_are_one_line(analysis, tmp_path, capsys, argv, message):
    out, _ = analysis
    model = out.parent / "model"
    (tmp_path / "file").touch()
    argv = [a.format(missing=tmp_path / "nope.txt", text=out.parent / "calib.txt", file=tmp_path / "file")
            for a in argv]
    rc = main(["analyze", str(model), "-o", str(tmp_path / "a"), "--ctx", "64", "--chunks", "2", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and message in err, err
