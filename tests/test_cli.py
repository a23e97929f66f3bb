"""The quantize command end to end on the test model: the same bytes as llama-quantize, exact
--dry-run sizes, size targets that hold, and one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from mixquant.cli import main
from mixquant.reference import llama_tool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model() -> Path:
    from mixquant.testdata import build_test_model

    return build_test_model()


@pytest.fixture(scope="module")
def f32_gguf(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("f32") / "f32.gguf"
    assert main(["quantize", str(model), str(path), "F32"]) == 0
    return path


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8))) for t in GGUFReader(path).tensors}


def test_q4_k_m_with_imatrix_is_byte_identical_to_llama_quantize(f32_gguf, tmp_path):
    """Same F32 source, same imatrix (a random one in llama.cpp's legacy format): every tensor's
    type and bytes agree, and so does the file size."""
    from mixquant.calibrate import Imatrix, write_imatrix

    rng = np.random.default_rng(0)
    shapes = {t.name: [int(d) for d in t.shape] for t in GGUFReader(f32_gguf).tensors if t.name.startswith("blk.")}
    sums = {n: np.exp(rng.normal(0, 2, s[0])).astype(np.float32) for n, s in shapes.items() if len(s) == 2}
    imatrix = write_imatrix(Imatrix(sums=sums, counts={n: 1 for n in sums}, chunks=1, datasets=["random"]),
                            tmp_path / "imatrix.dat")
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    assert main(["quantize", str(f32_gguf), str(ours), "Q4_K_M", "--imatrix", str(imatrix)]) == 0
    subprocess.run([str(llama_tool("llama-quantize")), "--imatrix", str(imatrix), str(f32_gguf), str(theirs),
                    "Q4_K_M", "2"], check=True, capture_output=True)
    a, b = tensors(ours), tensors(theirs)
    assert a.keys() == b.keys() and len(a) == 272
    assert [n for n in a if a[n] != b[n]] == []


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K"])
def test_dry_run_size_is_the_written_size(model, tmp_path, capsys, preset):
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(model), str(out), preset, "--dry-run"]) == 0
    assert not out.exists()
    predicted = int(capsys.readouterr().out.splitlines()[-1].split()[2].replace(",", ""))
    assert main(["quantize", str(model), str(out), preset]) == 0
    assert out.stat().st_size == predicted


def test_target_size_is_met_and_used(model, tmp_path, capsys):
    from mixquant.analyze import analyze

    sensitivity = analyze(model, measure="none", types=["Q8_0", "Q5_0", "Q4_0", "Q4_K", "Q6_K"], progress=False)
    sens_path = sensitivity.save(tmp_path / "sensitivity.json")
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(model), str(out), "--target-size", "100MB", "--sensitivity", str(sens_path)]) == 0
    assert 99_000_000 < out.stat().st_size <= 100_000_000
    assert main(["quantize", str(model), str(out), "--target-size", "10MB", "--sensitivity", str(sens_path)]) == 1
    assert "smallest plan" in capsys.readouterr().err


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixquant.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["quantize", "/no/such/model", "{tmp}/o.gguf", "Q4_K_M"], "no such file"),
    (["quantize", "{model}", "{tmp}/o.gguf", "Q9_K"], "unknown preset"),
    (["quantize", "{model}", "{tmp}/missing/o.gguf", "Q8_0"], "does not exist"),
    (["quantize", "{f32}", "{f32}", "Q8_0"], "refusing to overwrite"),
    (["quantize", "{model}", "{tmp}/o.gguf", "--target-bpw", "4"], "--sensitivity"),
    (["quantize", "{truncated}", "{tmp}/o.gguf", "Q8_0"], "truncated"),
])
def test_bad_input_is_one_line_and_writes_nothing(model, f32_gguf, tmp_path, args, message):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f32_gguf.read_bytes()[: 50_000_000])
    values = {"model": model, "tmp": tmp_path, "f32": f32_gguf, "truncated": truncated}
    done = run_cli(*[a.format(**values) for a in args])
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixquant: error:") and message in lines[0], done.stderr
    assert not (tmp_path / "o.gguf").exists() and not list(tmp_path.glob(".o.gguf*"))
