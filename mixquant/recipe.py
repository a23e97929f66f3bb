"""Recipes: a type for every tensor from ordered rules in a YAML file, the first match winning.

    recipe = load_recipe("classic")      # a shipped recipe (mixquant/recipes/*.yaml) or a file
    plan = recipe.plan(model)            # plan.Plan for a plan.ModelInfo
    pins = recipe.pins(model)            # {tensor: type} for allocate(pinned=...); `auto` left out

The format; unknown keys are errors, and every key is optional except a rule's `type`:

    rules:
      - kind: norm                       # attn_q attn_k attn_v attn_output ffn_gate ffn_up ffn_down
        type: F32                        #   token_embd output norm (also attn_qkv attn_kv_b other)
      - layers: [first 2, last 2]        # "0-3", "5", "3,5,7", "first N", "last N", "every Nth"
        type: Q8_0                       #   (0, N, 2N, ...), "every Nth from K" (K, K+N, ...): the union
      - name: "blk.*.ffn_down.weight"    # a glob matched against the whole GGUF tensor name
        regex: "ffn_(up|gate)"           # searched in the name, as llama-quantize's --tensor-type
        type: Q6_K                       # a mixquant type, `keep` (the input's type) or `auto`
        fallback: [Q5_1]                 # when the type's block does not divide the row length
    default: Q4_K                        # what a tensor no rule matches gets (absent: auto)
    fallback: [IQ4_NL]                   # the default's fallbacks

A rule matches a tensor when all its criteria do (a rule without any matches every tensor);
`layers` matches only tensors of blocks (`blk.N.`). With `fallback`, a type whose block does not
divide the row length is replaced by the first listed type that fits, else by llama.cpp's own
fallback (`plan.fallback_type`: Q4_K -> Q5_0, Q6_K -> Q8_0, ...). `auto` leaves a tensor to the
allocator (`quantize --target-bpw/--target-size/--max-kld`), where the other rules pin their
tensors. Tensors llama-quantize does not quantize (norms, 1-D tensors, routers:
`plan.allows_quantization`) keep their type unless a rule gives them `keep` or a float type (F32,
F16, BF16); rules with other types pass them by, so a catch-all rule cannot quantize a norm.

`--tensor-type PATTERN=TYPE` options are rules too (`Recipe.from_tensor_types`), put in front of a
recipe's (`overrides.then(recipe)`) so that they win.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import formats
from .errors import MixquantError
from .plan import (Cat, ModelInfo, Plan, allows_quantization, block_size, category, fallback_type, layer_of,
                   requires_imatrix)
from .text import read_bytes

__all__ = ["KINDS", "Rule", "Recipe", "kind", "load_recipe", "parse_recipe", "shipped_recipes"]

KEEP, AUTO = "keep", "auto"
_FLOATS = frozenset({"F32", "F16", "BF16"})
KINDS: frozenset[str] = frozenset({c.value for c in Cat} | {"norm"})
_RULE_KEYS = ("name", "regex", "layers", "kind", "type", "fallback")
_TOP_KEYS = ("rules", "default", "fallback")
_LAYER_TERM = re.compile(
    r"(?P<lo>\d+)(?:\s*-\s*(?P<hi>\d+))?|(?P<end>first|last)\s+(?P<count>\d+)"
    r"|every\s+(?P<step>\d+)(?:st|nd|rd|th)?(?:\s+from\s+(?P<start>\d+))?")


def kind(name: str) -> str:
    """The tensor's kind: `plan.category` (llama.cpp's tensor_get_category), with the norms, which
    llama.cpp files under "other", as "norm"."""
    return "norm" if name.endswith("norm.weight") else category(name).value


def _shipped():
    """The folder of shipped recipes (package data: an importlib.resources Traversable)."""
    return resources.files(__package__) / "recipes"


def shipped_recipes() -> list[str]:
    """Names of the recipes that come with mixquant."""
    return sorted(p.name.removesuffix(".yaml") for p in _shipped().iterdir() if p.name.endswith(".yaml"))


def _type(value: Any, where: str, special: bool = True) -> str:
    """A mixquant type name (canonical case), or with `special` also keep/auto."""
    text = str(value).strip()
    if special and text.lower() in (KEEP, AUTO):
        return text.lower()
    try:
        return formats.get(text).name
    except ValueError:
        extra = ", keep or auto" if special else ""
        raise MixquantError(f"{where}: unknown type {value!r} (one of {', '.join(formats.FORMATS)}{extra})") from None


def _strings(value: Any, where: str, key: str) -> list[str]:
    """A string or a list of strings (numbers allowed: `layers: 5`)."""
    items = value if isinstance(value, list) else [value]
    if not items or any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in items):
        raise MixquantError(f"{where}: {key} must be a string or a list of strings, got {value!r}")
    return [str(v) for v in items]


def _check_keys(data: dict, known: tuple[str, ...], where: str) -> None:
    unknown = [k for k in data if k not in known]
    if unknown:
        raise MixquantError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")


def _parse_layers(value: Any, where: str) -> tuple[tuple[str, int, int], ...]:
    """`layers` as terms (what, a, b): ("range", lo, hi), ("first"/"last", n, 0), ("every", step, start)."""
    terms = []
    for item in _strings(value, where, "layers"):
        for part in item.split(","):
            m = _LAYER_TERM.fullmatch(part.strip().lower())
            bad = f"{where}: bad layer range {part.strip()!r} (use 0-3, 5, first 2, last 2, every 3rd, every 3rd from 1)"
            if m is None:
                raise MixquantError(bad)
            if m["end"]:
                term = (m["end"], int(m["count"]), 0)
            elif m["step"]:
                term = ("every", int(m["step"]), int(m["start"] or 0))
            else:
                term = ("range", int(m["lo"]), int(m["hi"] or m["lo"]))
            if (term[0] == "range" and term[2] < term[1]) or (term[0] != "range" and term[1] == 0):
                raise MixquantError(bad)
            terms.append(term)
    return tuple(terms)


@dataclass(frozen=True)
class Rule:
    """One rule; `where` names it in error messages ("classic.yaml: rule 3")."""

    type: str  # a mixquant type name, "keep" or "auto"
    name: str | None = None  # glob over the whole tensor name
    regex: re.Pattern[str] | None = None  # searched in the tensor name
    layers: tuple[tuple[str, int, int], ...] = ()  # parsed `layers` terms; empty: any tensor
    kinds: frozenset[str] = frozenset()  # empty: any kind
    fallback: tuple[str, ...] = ()
    where: str = "rule"

    @classmethod
    def parse(cls, data: Any, where: str) -> Rule:
        if not isinstance(data, dict):
            raise MixquantError(f"{where}: expected a mapping of {', '.join(_RULE_KEYS)}, got {data!r}")
        _check_keys(data, _RULE_KEYS, where)
        if "type" not in data:
            raise MixquantError(f"{where}: no type")
        name = data.get("name")
        if name is not None and not isinstance(name, str):
            raise MixquantError(f"{where}: name must be a string (a glob), got {name!r}")
        regex = None
        if data.get("regex") is not None:
            try:
                regex = re.compile(str(data["regex"]))
            except re.error as exc:
                raise MixquantError(f"{where}: bad regex {data['regex']!r}: {exc}") from None
        kinds = frozenset(_strings(data["kind"], where, "kind")) if "kind" in data else frozenset()
        unknown = sorted(kinds - KINDS)
        if unknown:
            raise MixquantError(f"{where}: unknown kind {unknown[0]!r} (one of {', '.join(sorted(KINDS))})")
        layers = _parse_layers(data["layers"], where) if "layers" in data else ()
        fallback = data.get("fallback", [])
        fallback = tuple(_type(f, where, special=False) for f in (fallback if isinstance(fallback, list) else [fallback]))
        return cls(type=_type(data["type"], where), name=name, regex=regex, layers=layers, kinds=kinds,
                   fallback=fallback, where=where)

    def layer_set(self, n_layer: int) -> frozenset[int] | None:
        """The blocks `layers` selects in a model of n_layer blocks (None: no layer criterion)."""
        if not self.layers:
            return None
        out: set[int] = set()
        for what, a, b in self.layers:
            if what == "first":
                out.update(range(min(a, n_layer)))
            elif what == "last":
                out.update(range(max(0, n_layer - a), n_layer))
            elif what == "every":
                out.update(range(b, n_layer, a))
            elif b >= n_layer:  # a number written for another model: say so rather than match nothing
                raise MixquantError(f"{self.where}: layer {b} is beyond the model's {n_layer} layers (0-{n_layer - 1})")
            else:
                out.update(range(a, b + 1))
        return frozenset(out)

    def matches(self, name: str, layers: frozenset[int] | None) -> bool:
        """Whether the rule selects tensor `name`; `layers` is `layer_set` for the model."""
        if self.name is not None and not fnmatch.fnmatchcase(name, self.name):
            return False
        if self.regex is not None and not self.regex.search(name):
            return False
        if self.kinds and kind(name) not in self.kinds:
            return False
        return layers is None or layer_of(name) in layers

    def fit(self, cols: int) -> str:
        """The rule's type for rows of `cols` values: itself if its block divides them, else the
        first listed fallback that does, else llama.cpp's fallback."""
        for typ in (self.type, *self.fallback):
            if cols % block_size(typ) == 0:
                return typ
        return fallback_type(self.type, cols)


@dataclass(frozen=True)
class Recipe:
    """Ordered rules (the `default` is the last, matching everything); `where` names the source."""

    rules: tuple[Rule, ...]
    where: str = "recipe"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Recipe:
        if not isinstance(data, dict):
            raise MixquantError(f"{where}: not a recipe (expected a mapping with rules and/or default, "
                                f"got {type(data).__name__})")
        _check_keys(data, _TOP_KEYS, where)
        if not isinstance(data.get("rules", []), list):
            raise MixquantError(f"{where}: rules must be a list")
        if "fallback" in data and "default" not in data:
            raise MixquantError(f"{where}: fallback is the default's; there is no default")
        rules = [Rule.parse(r, f"{where}: rule {i}") for i, r in enumerate(data.get("rules", []), 1)]
        if "default" in data:
            rules.append(Rule.parse({"type": data["default"], "fallback": data.get("fallback", [])}, f"{where}: default"))
        if not rules:
            raise MixquantError(f"{where}: no rules and no default")
        return cls(tuple(rules), where)

    @classmethod
    def from_tensor_types(cls, items: Iterable[str]) -> Recipe:
        """llama-quantize's `--tensor-type PATTERN=TYPE` options: the pattern lower-cased and
        searched in the tensor name, the first match winning."""
        rules = []
        for item in items:
            pattern, sep, typ = item.partition("=")
            where = f"--tensor-type {item!r}"
            if not sep or not pattern:
                raise MixquantError(f"{where}: expected PATTERN=TYPE")
            rules.append(Rule.parse({"regex": pattern.lower(), "type": typ}, where))
        return cls(tuple(rules), "--tensor-type")

    def then(self, other: Recipe) -> Recipe:
        """This recipe's rules in front of `other`'s (so they win), named after `other`."""
        return Recipe(self.rules + other.rules, other.where)

    def assign(self, model: ModelInfo) -> tuple[dict[str, str | None], dict[str, str]]:
        """({tensor: type, None where the allocator decides}, {tensor: wanted type} for the tensors
        whose rule's type did not fit their row length)."""
        layer_sets = [r.layer_set(model.n_layer) for r in self.rules]
        types: dict[str, str | None] = {}
        wanted: dict[str, str] = {}
        for t in model.tensors:
            quantizable = allows_quantization(t, model.arch)
            rule = next((r for r, ls in zip(self.rules, layer_sets)
                         if (quantizable or r.type == KEEP or r.type in _FLOATS) and r.matches(t.name, ls)), None)
            if rule is None:
                types[t.name] = None if quantizable else t.dtype
            elif rule.type in (KEEP, AUTO):
                types[t.name] = t.dtype if rule.type == KEEP else None
            else:
                types[t.name] = rule.fit(t.shape[-1])
                if types[t.name] != rule.type:
                    wanted[t.name] = rule.type
        return types, wanted

    def plan(self, model: ModelInfo) -> Plan:
        """The plan; an error when a tensor is left to the allocator."""
        types, wanted = self.assign(model)
        auto = [n for n, t in types.items() if t is None]
        if auto:
            raise MixquantError(f"{self.where} leaves {len(auto)} tensors to the allocator (type auto, or no rule "
                                f"and no default; {auto[0]}, ...): give them a type, or allocate them "
                                "(--target-bpw, --target-size or --max-kld)")
        return Plan(types=dict(types), shapes={t.name: t.shape for t in model.tensors}, fallbacks=wanted,
                    requires_imatrix=tuple(n for n, ty in types.items() if requires_imatrix(n, ty, None)))

    def pins(self, model: ModelInfo) -> dict[str, str]:
        """{tensor: type} for the allocator: every quantizable tensor a rule gives a type (the
        others are fixed in a sensitivity anyway)."""
        types, _ = self.assign(model)
        quantizable = {t.name for t in model.tensors if allows_quantization(t, model.arch)}
        return {n: t for n, t in types.items() if t is not None and n in quantizable}


# A recipe is a few dozen lines: these limits stop a small file expanding into gigabytes (a YAML
# "billion laughs" nests aliases of aliases) or recursing past Python's stack.
_MAX_RECIPE_BYTES = 1 << 20
_MAX_NODES = 100_000  # after aliases are expanded
_MAX_DEPTH = 32


class _BoundedLoader(yaml.SafeLoader):
    """yaml's safe loader (no Python objects) refusing alias bombs and deep nesting."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}  # node id -> nodes it expands to (an alias reuses its anchor's node)

        def expanded(n) -> int:
            if id(n) not in sizes:
                sizes[id(n)] = _MAX_NODES + 1  # while counting: an alias of itself expands forever
                children = n.value if isinstance(n, yaml.SequenceNode) else \
                    [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else []
                sizes[id(n)] = min(1 + sum(expanded(c) for c in children), _MAX_NODES + 1)
            return sizes[id(n)]

        if expanded(node) > _MAX_NODES:
            raise yaml.YAMLError(f"expands to more than {_MAX_NODES:,} values (aliases of aliases)")
        return node

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.YAMLError(f"nested more than {_MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_recipe(text: str, where: str = "recipe") -> Recipe:
    """A recipe from YAML text; `where` names it in error messages."""
    if len(text) > _MAX_RECIPE_BYTES:
        raise MixquantError(f"{where}: {len(text):,} characters; a recipe is at most {_MAX_RECIPE_BYTES:,}")
    try:
        data = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MixquantError(f"{where}: not valid YAML{line}: {problem}") from None
    return Recipe.from_dict(data, where)


def load_recipe(spec: str | os.PathLike[str]) -> Recipe:
    """A recipe file, or a shipped recipe by name (`shipped_recipes()`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        raw = read_bytes(path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MixquantError(f"{path}: not a YAML recipe (not UTF-8 text)") from None
        return parse_recipe(text, str(path))
    name = str(spec).lower().removesuffix(".yaml")
    if name in shipped_recipes():
        return parse_recipe((_shipped() / f"{name}.yaml").read_text(encoding="utf-8"), f"{name}.yaml")
    raise MixquantError(f"{spec}: no such recipe file, and not a shipped recipe ({', '.join(shipped_recipes())})")
