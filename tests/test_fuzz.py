"""A short run of the reader fuzzer (tests/fuzz.py; `make fuzz` runs it longer), and the crashes it
found, kept as regression cases: each must now be a one-line MixquantError."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fuzz  # noqa: E402

from mixquant.errors import MixquantError  # noqa: E402

SECONDS_PER_READER = 2


def test_fuzz_every_reader_briefly():
    """Every reader, a couple of seconds each, in a process with a bounded address space."""
    env = {**os.environ, "PYTHONPATH": str(fuzz.ROOT)}
    proc = subprocess.run([sys.executable, str(Path(fuzz.__file__)), "--seconds", str(SECONDS_PER_READER)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:] if line and line[0] != " "}
    assert set(rows) == set(fuzz.TARGETS), proc.stdout
    for _name, (_, executions, _, _, crashes) in rows.items():
        assert int(executions) > 0 and int(crashes) == 0, proc.stdout


def _config(**changes) -> bytes:
    return json.dumps({**fuzz._CONFIG, **changes}).encode()


# (reader, input) pairs that once raised something else than MixquantError
_SENSITIVITY = json.loads(fuzz._seed_sensitivity())
REGRESSIONS = {
    "sensitivity-model-not-object": ("sensitivity", json.dumps({**_SENSITIVITY, "model": 7.7e-34}).encode()),
    "sensitivity-settings-list": ("sensitivity", json.dumps({**_SENSITIVITY, "settings": [1, 2]}).encode()),
    "config-kv-heads-list": ("config", _config(num_key_value_heads=[2])),
    "config-kv-heads-tiny-float": ("config", _config(num_key_value_heads=8.4e-32)),
    "config-kv-heads-zero": ("config", _config(num_key_value_heads=0)),
    "config-kv-heads-uneven": ("config", _config(num_key_value_heads=3)),
}


def _gguf_arch_not_utf8(seed: bytes) -> bytes:
    key = b"general.architecture"
    at = seed.index(key) + len(key) + 4 + 8  # type, string length
    return seed[:at] + b"\xff" + seed[at + 1:]


@pytest.mark.parametrize("case", list(REGRESSIONS) + ["gguf-arch-not-utf8", "gguf-head-count-string"])
def test_fuzz_regression(case, tmp_path):
    if case.startswith("gguf-"):
        target = fuzz.TARGETS["gguf"]
        seed = target.seed(tmp_path)
        if case == "gguf-arch-not-utf8":
            data = _gguf_arch_not_utf8(seed)
        else:  # llama.attention.head_count as a string: same length field, type 8 (STRING)
            key = b"llama.attention.head_count"
            at = seed.index(key) + len(key)
            data = seed[:at] + (8).to_bytes(4, "little") + (0).to_bytes(8, "little") + seed[at + 8:]
    else:
        name, data = REGRESSIONS[case]
        target = fuzz.TARGETS[name]
    folder = tmp_path / "case"
    folder.mkdir()
    if target.file_name.startswith("model/"):
        fuzz._hf_folder(folder / "model")
    path = folder / target.file_name
    path.write_bytes(data)
    with pytest.raises(MixquantError):
        target.read(path)
