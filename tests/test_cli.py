"""The quantize command end to end on the test model (slow): the same bytes as llama-quantize, exact
--dry-run sizes, size targets that hold, and one-line errors for bad input; and on a tiny random
llama (fast): recipes, --max-kld, the predicted KLD of --dry-run and analysis on the fly."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from mixquant.cli import main
from mixquant.reference import llama_tool


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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K"])
def test_dry_run_size_is_the_written_size(model, tmp_path, capsys, preset):
    out = tmp_path / "out.gguf"
    assert main(["quantize", str(model), str(out), preset, "--dry-run"]) == 0
    assert not out.exists()
    predicted = int(capsys.readouterr().out.splitlines()[-1].split()[2].replace(",", ""))
    assert main(["quantize", str(model), str(out), preset]) == 0
    assert out.stat().st_size == predicted


@pytest.mark.slow
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------------------------
# recipes, --max-kld, predicted KLD and analysis on the fly, on a tiny random llama (fast)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A 2-layer llama (HF folder), calibration text for it, and its sensitivity (measured)."""
    from conftest import tiny_model_and_text

    from mixquant.analyze import analyze

    root = tmp_path_factory.mktemp("tiny_cli")
    model, text = tiny_model_and_text(root, 2000, seed=1)
    sens = analyze(model, None, text=text, n_windows=1, ctx=64, progress=False, threads=1)
    return {"model": model, "text": text, "sens": sens.save(root / "sensitivity.json")}


def quantize(capsys, *args) -> tuple[int, str, str]:
    rc = main(["quantize", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.filterwarnings("ignore:.*requantizing")
def test_recipe_writes_a_gguf_mixquant_reads_back(tiny, tmp_path, capsys):
    from mixquant.source import open_source

    recipe = tmp_path / "mine.yaml"
    recipe.write_text("rules:\n"
                      "  - {kind: ffn_down, layers: last 1, type: Q6_K}\n"
                      "  - {kind: [attn_q, attn_k], type: Q4_K, fallback: [IQ4_NL]}\n"
                      "default: Q8_0\n")
    out = tmp_path / "out.gguf"
    rc, stdout, _ = quantize(capsys, tiny["model"], out, "--recipe", recipe, "--tensor-type", "attn_k=Q5_1")
    assert rc == 0 and out.name in stdout
    types = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q6_K" and types["blk.0.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "IQ4_NL"  # 64 columns: Q4_K's listed fallback
    assert types["blk.1.attn_k.weight"] == "Q5_1"  # --tensor-type over the recipe
    assert types["blk.0.attn_norm.weight"] == "F32" and types["token_embd.weight"] == "Q8_0"
    with open_source(out, allow_requantize=True) as back, open_source(tiny["model"]) as ref:
        for name in ("token_embd.weight", "blk.1.ffn_down.weight"):
            w, q = ref.tensor(name), back.tensor(name)
            assert np.linalg.norm(q - w) < 0.05 * np.linalg.norm(w)


def test_dry_run_prints_predicted_kld_for_any_plan(tiny, capsys):
    from mixquant.allocate import plan_damage
    from mixquant.analyze import Sensitivity
    from mixquant.recipe import load_recipe
    from mixquant.source import open_source

    sens = Sensitivity.load(tiny["sens"])
    with open_source(tiny["model"]) as source:
        expected = sum(plan_damage(sens, load_recipe("aggressive").plan(source.model)).values())
    rc, out, _ = quantize(capsys, tiny["model"], "x.gguf", "--recipe", "aggressive", "--dry-run",
                          "--sensitivity", tiny["sens"])
    lines = out.splitlines()
    assert rc == 0 and f"predicted KLD {expected:.5g} (dry run" in lines[-1]
    end = lines[0].index("damage") + len("damage")  # the column lines up under its header
    for line in lines[1:-1]:
        cell = line[end - 9:end]
        assert cell == cell.rjust(9) and float(cell) >= 0 and line[end:end + 1] in ("", " ")
    assert float(lines[-2][end - 9:end]) == pytest.approx(expected, rel=1e-3)
    rc, out, _ = quantize(capsys, tiny["model"], "x.gguf", "Q4_0", "--dry-run", "--sensitivity", tiny["sens"])
    assert rc == 0 and "predicted KLD" in out.splitlines()[-1]
    rc, out, _ = quantize(capsys, tiny["model"], "x.gguf", "Q4_0", "--dry-run")
    assert rc == 0 and "predicted" not in out and "damage" not in out


def test_max_kld_gives_the_smallest_plan_within_it(tiny, capsys):
    args = [tiny["model"], "x.gguf", "--dry-run", "--sensitivity", tiny["sens"]]
    rc, out, _ = quantize(capsys, *args[:2], "Q4_0", *args[2:])
    q4_0_kld = float(out.splitlines()[-1].split("predicted KLD ")[1].split()[0])
    q4_0_bytes = int(out.splitlines()[-1].split()[2].replace(",", ""))
    rc, out, err = quantize(capsys, *args, "--max-kld", q4_0_kld)
    assert rc == 0 and f"the least for damage <= {q4_0_kld:.5g}" in err
    kld = float(out.splitlines()[-1].split("predicted KLD ")[1].split()[0])
    assert kld <= q4_0_kld and int(out.splitlines()[-1].split()[2].replace(",", "")) <= q4_0_bytes
    # every block tensor pinned to Q4_0: nothing reaches a tiny bound, and the message says what does
    rc, _, err = quantize(capsys, *args, "--max-kld", "1e-12", "--tensor-type", "blk=Q4_0")
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "no plan has a predicted damage of 1e-12 or less: the smallest these constraints allow is" in err


def test_recipe_pins_under_a_target(tiny, tmp_path, capsys):
    recipe = tmp_path / "pins.yaml"
    recipe.write_text("rules: [{kind: attn_v, type: Q8_0}]\ndefault: auto\n")
    rc, out, err = quantize(capsys, tiny["model"], "x.gguf", "--recipe", recipe, "--target-bpw", 5, "--dry-run",
                            "--sensitivity", tiny["sens"])
    assert rc == 0 and "allocation:" in err
    rows = {line.split()[0]: line.split()[2] for line in out.splitlines()[1:-2]}
    assert rows["blk.0.attn_v.weight"] == rows["blk.1.attn_v.weight"] == "Q8_0"
    rc, _, err = quantize(capsys, tiny["model"], "x.gguf", "--recipe", recipe, "--dry-run")
    assert rc == 1 and "leaves 13 tensors to the allocator" in err


def test_text_is_analysed_on_the_fly(tiny, tmp_path, capsys):
    rc, out, err = quantize(capsys, tiny["model"], "x.gguf", "--target-bpw", 6, "--text", tiny["text"], "--dry-run",
                            "--threads", 1)
    assert rc == 0 and "allocation:" in err and "predicted KLD" in out.splitlines()[-1]
    # an imatrix was calibrated on the fly and used: the whole pipeline, as mixquant analyze runs it
    rc, _, err = quantize(capsys, tiny["model"], tmp_path / "x.gguf", "--target-bpw", 6, "--text", tiny["text"],
                          "--threads", 1)
    assert rc == 0 and (tmp_path / "x.gguf").is_file() and "imatrix: calibrated on" in err
    short = tmp_path / "short.txt"
    short.write_text(tiny["text"].read_text()[:300])
    rc, _, err = quantize(capsys, tiny["model"], "x.gguf", "--target-bpw", 6, "--text", short, "--dry-run")
    assert rc == 1 and err.count("\n") == 1
    assert f"analysing --text {short} on the fly: " in err and "the text tokenizes to only" in err


@pytest.mark.parametrize("args, message", [
    (["Q8_0", "--recipe", "classic"], "give either a preset/type, or --recipe"),
    (["--recipe", "nope"], "nope: no such recipe file, and not a shipped recipe"),
    (["--target-bpw", "5", "--max-kld", "0.1"], "give only one of --target-bpw, --max-kld"),
    (["--recipe", "classic", "--pure"], "go with a preset"),
    (["Q8_0", "--text", "{text}"], "--text is analysed on the fly for a target only"),
    (["--recipe", "{bad}"], "not valid YAML"),
    (["--recipe", "classic", "--tensor-type", "attn_v"], "expected PATTERN=TYPE"),
])
def test_recipe_and_target_errors_are_one_line(tiny, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{type: Q8_0}")
    out = tmp_path / "o.gguf"
    rc, _, err = quantize(capsys, tiny["model"], out, *[a.format(text=tiny["text"], bad=bad) for a in args])
    assert rc == 1 and err.count("\n") == 1 and err.startswith("mixquant: error:") and message in err, err
    assert not list(tmp_path.glob("*.gguf*"))


def test_no_input_of_quantize_is_overwritten(tiny, tmp_path, capsys):
    sens = tmp_path / "sensitivity.json"
    sens.write_bytes(tiny["sens"].read_bytes())
    before = sens.read_bytes()
    rc, _, err = quantize(capsys, tiny["model"], sens, "--target-bpw", 6, "--sensitivity", sens)
    assert rc == 1 and "refusing to overwrite the input file" in err and sens.read_bytes() == before
    rc, _, err = quantize(capsys, tiny["model"], tmp_path / "o.gguf", "--target-bpw", 6, "--sensitivity",
                          tmp_path / "none.json")
    assert rc == 1 and err.strip() == f"mixquant: error: {tmp_path / 'none.json'}: cannot read: No such file or directory"
