"""Recipes (mixquant.recipe): layer ranges, matching, first match wins, shape fallbacks, the
shipped recipes on the test model's shapes, and one-line errors for bad recipe files."""

import pytest

from mixquant.errors import MixquantError
from mixquant.plan import ModelInfo, TensorInfo, block_size, preset_plan
from mixquant.recipe import Recipe, Rule, kind, load_recipe, parse_recipe, shipped_recipes


def toy(n_layer: int = 6, tied: bool = False) -> ModelInfo:
    """A llama-shaped model: rows of 64 (no 256-blocks) except ffn_down's 512."""
    ts = [TensorInfo("token_embd.weight", (100, 64)), TensorInfo("output_norm.weight", (64,))]
    if not tied:
        ts.append(TensorInfo("output.weight", (100, 64)))
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [TensorInfo(p + "attn_norm.weight", (64,)), TensorInfo(p + "attn_q.weight", (64, 64)),
               TensorInfo(p + "attn_k.weight", (32, 64)), TensorInfo(p + "attn_v.weight", (32, 64)),
               TensorInfo(p + "attn_output.weight", (64, 64)), TensorInfo(p + "ffn_norm.weight", (64,)),
               TensorInfo(p + "ffn_gate.weight", (512, 64)), TensorInfo(p + "ffn_up.weight", (512, 64)),
               TensorInfo(p + "ffn_down.weight", (64, 512))]
    return ModelInfo(arch="llama", n_layer=n_layer, n_head=4, n_head_kv=2, n_embd=64, tensors=ts)


def layers(spec, n_layer=10):
    return sorted(Rule.parse({"layers": spec, "type": "Q8_0"}, "test").layer_set(n_layer))


@pytest.mark.parametrize("spec, expected", [
    ("0-3", [0, 1, 2, 3]),
    ("5", [5]),
    (5, [5]),
    ("3,5,7", [3, 5, 7]),
    ("first 2", [0, 1]),
    ("last 2", [8, 9]),
    ("every 3rd", [0, 3, 6, 9]),
    ("every 4th from 1", [1, 5, 9]),
    ("every 2nd", [0, 2, 4, 6, 8]),
    (["first 1", "last 1", 4], [0, 4, 9]),
    ("first 2, last 2", [0, 1, 8, 9]),
    ("first 20", list(range(10))),  # relative terms clip to the model
    (["0-1", "1-2"], [0, 1, 2]),
])
def test_layer_ranges(spec, expected):
    assert layers(spec) == expected


def test_kinds_come_from_plan_category_and_norms_are_their_own():
    assert kind("blk.3.attn_v.weight") == "attn_v" and kind("blk.3.ffn_down.weight") == "ffn_down"
    assert kind("token_embd.weight") == "token_embd" and kind("output.weight") == "output"
    assert kind("blk.3.attn_norm.weight") == kind("output_norm.weight") == "norm"


def test_matching_and_first_match_wins():
    recipe = parse_recipe("""
rules:
  - layers: first 1
    type: Q8_0
  - name: "blk.*.attn_q.weight"
    layers: every 2nd
    type: Q6_K
    fallback: [Q5_1]
  - regex: "attn_(k|v)"
    type: Q5_0
  - kind: ffn_down
    type: Q4_K
  - kind: [ffn_gate, ffn_up]
    layers: last 1
    type: Q5_1
default: Q4_0
""")
    types = recipe.plan(toy()).types
    assert {types[f"blk.0.{n}.weight"] for n in ("attn_q", "attn_v", "ffn_down", "ffn_up")} == {"Q8_0"}
    assert types["blk.2.attn_q.weight"] == "Q5_1" and types["blk.3.attn_q.weight"] == "Q4_0"
    assert types["blk.3.attn_k.weight"] == types["blk.3.attn_v.weight"] == "Q5_0"
    assert types["blk.3.ffn_down.weight"] == "Q4_K"
    assert types["blk.5.ffn_up.weight"] == "Q5_1" and types["blk.4.ffn_up.weight"] == "Q4_0"
    assert types["token_embd.weight"] == types["output.weight"] == "Q4_0"  # no layer: `layers` rules pass by
    # a glob matches the whole name, a regex anywhere in it
    assert not Rule.parse({"name": "attn_q", "type": "Q8_0"}, "t").matches("blk.1.attn_q.weight", None)
    assert Rule.parse({"regex": "attn_q", "type": "Q8_0"}, "t").matches("blk.1.attn_q.weight", None)
    assert Rule.parse({"name": "blk.1?.*", "type": "Q8_0"}, "t").matches("blk.12.attn_q.weight", None)
    assert not Rule.parse({"name": "blk.1?.*", "type": "Q8_0"}, "t").matches("blk.1.attn_q.weight", None)


def test_fallbacks_listed_then_llama_cpp():
    model = toy()
    recipe = parse_recipe("""
rules:
  - kind: attn_q
    type: Q4_K
    fallback: [IQ4_XS, Q5_1]     # IQ4_XS needs 256-blocks too: skipped
  - kind: attn_k
    type: Q6_K                   # llama.cpp: Q6_K -> Q8_0
  - kind: ffn_down
    type: Q4_K
    fallback: [IQ4_NL]           # fits: not used
default: Q3_K
fallback: [IQ4_NL]
""")
    plan = recipe.plan(model)
    assert plan.types["blk.1.attn_q.weight"] == "Q5_1" and plan.fallbacks["blk.1.attn_q.weight"] == "Q4_K"
    assert plan.types["blk.1.attn_k.weight"] == "Q8_0" and plan.fallbacks["blk.1.attn_k.weight"] == "Q6_K"
    assert plan.types["blk.1.ffn_down.weight"] == "Q4_K" and "blk.1.ffn_down.weight" not in plan.fallbacks
    assert plan.types["blk.1.ffn_up.weight"] == "IQ4_NL"
    assert plan.total_bytes > 0  # every type fits its rows


def test_norms_keep_their_type_unless_a_rule_says_keep_or_float():
    model = toy()
    plan = parse_recipe("default: Q4_0").plan(model)
    assert plan.types["blk.0.attn_norm.weight"] == "F32" and plan.types["blk.0.attn_q.weight"] == "Q4_0"
    plan = parse_recipe("rules: [{kind: norm, type: F16}, {type: Q8_0}]").plan(model)
    assert plan.types["output_norm.weight"] == "F16" and plan.types["blk.0.ffn_up.weight"] == "Q8_0"
    plan = parse_recipe("rules: [{type: keep}]").plan(model)
    assert set(plan.types.values()) == {"F32"}


def test_auto_pins_and_tensor_type_overrides():
    model = toy()
    recipe = parse_recipe("rules: [{kind: attn_v, type: Q8_0}, {kind: norm, type: F32}, {kind: ffn_down, type: auto}]")
    pins = recipe.pins(model)
    assert pins["blk.2.attn_v.weight"] == "Q8_0"
    assert "blk.2.ffn_down.weight" not in pins and "blk.2.attn_q.weight" not in pins  # auto, and no default
    assert "output_norm.weight" not in pins  # fixed in a sensitivity anyway
    with pytest.raises(MixquantError, match="leaves 38 tensors to the allocator"):
        recipe.plan(model)
    overridden = Recipe.from_tensor_types(["BLK\\.2\\.attn_v=q5_1", "ffn_down=Q6_K"]).then(recipe)
    pins = overridden.pins(model)
    assert pins["blk.2.attn_v.weight"] == "Q5_1" and pins["blk.1.attn_v.weight"] == "Q8_0"
    assert pins["blk.2.ffn_down.weight"] == "Q6_K"


def test_tensor_type_rules_match_preset_plan_overrides():
    """--tensor-type as rules gives the types preset_plan's own --tensor-type handling gives."""
    model = toy()
    items = ["attn_v=Q8_0", "ffn_.*=Q4_K", "blk\\.1\\.=Q5_1"]
    pins = Recipe.from_tensor_types(items).pins(model)
    plan = preset_plan(model, "Q4_0", tensor_types=items)
    assert pins and all(plan.types[n] == t for n, t in pins.items())


@pytest.mark.parametrize("text, message", [
    ("rules: [{typ: Q4_K}]", "rule 1: unknown key 'typ'"),
    ("rule: []", "unknown key 'rule'"),
    ("rules: [{layers: 5-3, type: Q8_0}]", "bad layer range '5-3'"),
    ("rules: [{layers: first 0, type: Q8_0}]", "bad layer range 'first 0'"),
    ("rules: [{layers: every 0th, type: Q8_0}]", "bad layer range 'every 0th'"),
    ("rules: [{layers: '-1', type: Q8_0}]", "bad layer range '-1'"),
    ("rules: [{layers: 'middle', type: Q8_0}]", "bad layer range 'middle'"),
    ("rules: [{layers: [], type: Q8_0}]", "layers must be a string or a list"),
    ("default: Q9_K", "default: unknown type 'Q9_K'"),
    ("rules: [{type: Q8_0, fallback: [auto]}]", "unknown type 'auto'"),
    ("rules: [{kind: attention, type: Q8_0}]", "unknown kind 'attention'"),
    ("rules: [{regex: '(', type: Q8_0}]", "bad regex"),
    ("rules: [{kind: norm}]", "rule 1: no type"),
    ("rules: [Q8_0]", "rule 1: expected a mapping"),
    ("fallback: [Q8_0]", "there is no default"),
    ("rules: []", "no rules and no default"),
    ("just some words", "not a recipe"),
    ("", "not a recipe"),
    ("rules: [{type: Q8_0}", "not valid YAML (line 1): expected ',' or ']'"),
    ("rules:\n  - type: Q8_0\n\tkind: norm\n", "not valid YAML (line 3)"),
    ("a: b: c", "not valid YAML (line 1)"),
])
def test_errors_are_one_line(text, message):
    with pytest.raises(MixquantError, match="^mine.yaml: ") as info:
        parse_recipe(text, "mine.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_explicit_layers_beyond_the_model_and_bad_files(tmp_path):
    with pytest.raises(MixquantError, match=r"rule 1: layer 7 is beyond the model's 6 layers \(0-5\)"):
        parse_recipe("rules: [{layers: 2-7, type: Q8_0}]", "r").plan(toy())
    binary = tmp_path / "r.yaml"
    binary.write_bytes(b"\xff\xfe\x00rules")
    with pytest.raises(MixquantError, match="not a YAML recipe"):
        load_recipe(binary)
    with pytest.raises(MixquantError, match=r"nope: no such recipe file, and not a shipped recipe \(aggressive, classic"):
        load_recipe("nope")
    with pytest.raises(MixquantError, match="--tensor-type 'attn_v': expected PATTERN=TYPE"):
        Recipe.from_tensor_types(["attn_v"])
    good = tmp_path / "good.yaml"
    good.write_text("default: Q8_0\n")
    assert load_recipe(good).plan(toy()).types["blk.0.attn_q.weight"] == "Q8_0"


def _check_shipped(model: ModelInfo) -> dict[str, float]:
    """Every shipped recipe gives a complete plan whose types fit their rows; bits per weight by name."""
    assert shipped_recipes() == ["aggressive", "classic", "conservative"]
    bpw = {}
    for name in shipped_recipes():
        plan = load_recipe(name).plan(model)
        assert load_recipe(f"{name}.yaml").plan(model).types == plan.types
        assert set(plan.types) == {t.name for t in model.tensors}
        for t in model.tensors:
            assert t.shape[-1] % block_size(plan.types[t.name]) == 0, (name, t.name)
            if kind(t.name) == "norm":
                assert plan.types[t.name] == "F32"
        bpw[name] = plan.bits_per_weight
    assert bpw["aggressive"] < bpw["classic"] < bpw["conservative"]
    return bpw


def test_shipped_recipes_on_a_toy_model():
    bpw = _check_shipped(toy(n_layer=8))
    plan = load_recipe("classic").plan(toy(n_layer=8))
    assert plan.types["blk.0.attn_q.weight"] == plan.types["blk.7.ffn_up.weight"] == "Q8_0"
    assert plan.types["blk.3.ffn_down.weight"] == "Q6_K" and plan.types["blk.3.attn_v.weight"] == "Q8_0"
    assert plan.types["blk.3.attn_q.weight"] == "IQ4_NL" and plan.fallbacks["blk.3.attn_q.weight"] == "Q4_K"
    assert bpw["classic"] > 4.5


@pytest.mark.slow
def test_shipped_recipes_on_the_test_model():
    """The test model's own tensor list (read from its folder's metadata, no weights)."""
    from mixquant.source import open_source
    from mixquant.testdata import build_test_model

    with open_source(build_test_model()) as source:
        model = source.model
    bpw = _check_shipped(model)
    q4_k_m = preset_plan(model, "Q4_K_M").bits_per_weight
    assert bpw["aggressive"] < q4_k_m < bpw["conservative"]
    assert abs(bpw["classic"] - q4_k_m) < 0.2  # "close to Q4_K_M"
