"""Structured outputs (engine/guided.py): the character automaton against Python's own JSON
parser and an independent schema check written here, the trie walk against reading every token
one by one, and the engine's answers (greedy and sampled, mixed with free requests) parsed and
checked."""

from __future__ import annotations

import decimal
import json
import pickle
import re
import sys
from decimal import Decimal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from expertswitch.engine import Engine, SamplingParams, StructuredOutputsParams
from expertswitch.engine.guided import Grammar, token_index
from expertswitch.errors import ConfigError

ANY = StructuredOutputsParams(json={}, whitespace=64).grammar_


def read(g: Grammar, text: str):
    """(every prefix readable, whole text is an answer, nothing may follow)."""
    state = g.initial()
    for ch in text:
        state = g.step(state, ch)
        if state is None:
            return False, False, False
    return True, g.accepts(state), not state[0]


def _no_constants(name):
    raise ValueError(name)


def is_json(text: str) -> bool:
    try:
        json.loads(text, parse_constant=_no_constants)  # NaN / Infinity are not JSON
    except ValueError:
        return False
    return True


scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.text(max_size=6) \
    | st.floats(allow_nan=False, allow_infinity=False)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=4),
                      max_leaves=12)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(values, st.sampled_from([None, 0, 2]), st.booleans())
def test_any_json_reads_what_json_dumps_writes(value, indent, ascii_only):
    text = json.dumps(value, indent=indent, ensure_ascii=ascii_only)
    ok, whole, closed = read(ANY, text)
    assert ok and whole, text
    assert closed == (not isinstance(value, (int, float)) or isinstance(value, bool)), text


ALPHABET = '{}[]",: 0123456789.eE+-tfnrulasxdDz\\\n'
JSONISH = st.text(alphabet=ALPHABET, max_size=24)


def _edited(text_pos_edit):
    text, pos, (kind, ch) = text_pos_edit
    pos = min(pos, len(text))
    if kind == "insert":
        return text[:pos] + ch + text[pos:]
    if kind == "replace":
        return text[:pos] + ch + text[pos + 1 :]
    return text[:pos] + text[pos + 1 :]


edits = st.tuples(st.sampled_from(["insert", "replace", "delete"]), st.sampled_from(ALPHABET))
edited_json = st.tuples(values.map(json.dumps), st.integers(0, 40), edits).map(_edited)


@settings(max_examples=2500, deadline=None)
@given(st.one_of(JSONISH, edited_json, edited_json.flatmap(
    lambda t: st.tuples(st.just(t), st.integers(0, 40), edits).map(_edited))))  # fmt: skip
def test_any_json_accepts_exactly_what_pythons_parser_accepts(text):
    """Random JSON-like text and valid JSON with text spliced in: the automaton takes a text
    as a whole answer exactly when json.loads does (texts without blank ends, which Python
    allows and the automaton leaves out by design)."""
    if text != text.strip(" \n") or not text:
        return
    ok, whole, _ = read(ANY, text)
    assert (ok and whole) == is_json(text), text


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 4},
        "age": {"type": "integer"},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"enum": ["a", "bc", 1, 12]}, "maxItems": 2},
        "pet": {"$ref": "#/$defs/Pet"},
        "animal": {
            "oneOf": [  # a tagged union (pydantic's discriminated union)
                {
                    "type": "object",
                    "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
                    "required": ["kind"],
                },
                {
                    "type": "object",
                    "properties": {"kind": {"enum": ["dog", "wolf"]}, "good": {"type": "boolean"}},
                    "required": ["kind", "good"],
                },
                {"type": "null"},
            ]
        },
    },
    "required": ["name", "age"],
    "$defs": {
        "Pet": {
            "type": "object",
            "properties": {
                "kind": {"const": "cat"},
                "next": {"anyOf": [{"$ref": "#/$defs/Pet"}, {"type": "null"}]},
            },
            "required": ["kind"],
        }
    },  # fmt: skip
}


def conforms(v, s, defs=SCHEMA["$defs"]) -> bool:
    """SCHEMA's subset, checked on the parsed value (and its keys' order: declared order)."""
    if "$ref" in s:
        return conforms(v, defs[s["$ref"].rsplit("/", 1)[1]])
    if "anyOf" in s:
        return any(conforms(v, b) for b in s["anyOf"])
    if "oneOf" in s:
        return sum(conforms(v, b) for b in s["oneOf"]) == 1
    if "const" in s:
        return type(v) is type(s["const"]) and v == s["const"]
    if "enum" in s:
        return any(type(v) is type(e) and v == e for e in s["enum"])
    t = s.get("type")
    if t == "null":
        return v is None
    if t == "boolean":
        return isinstance(v, bool)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "string":
        return isinstance(v, str) and s.get("minLength", 0) <= len(v) <= s.get("maxLength", 1e9)
    if t == "array":
        return isinstance(v, list) and len(v) <= s.get("maxItems", 1e9) and all(
            conforms(x, s["items"]) for x in v)  # fmt: skip
    if t == "object":
        names = list(s["properties"])
        keys = list(v) if isinstance(v, dict) else None
        return (keys is not None and all(k in names for k in keys)
                and keys == sorted(keys, key=names.index)
                and all(r in keys for r in s.get("required", []))
                and all(conforms(v[k], s["properties"][k]) for k in keys))  # fmt: skip
    raise AssertionError(s)


field_values = st.one_of(st.none(), st.booleans(), st.integers(-30, 30), st.floats(-5, 5),
                         st.sampled_from(["", "x", "abcd", "abcde", "a", "bc", "cat", "ab\nc",
                                                         "abc\u00e9", "abcd\t", "é"]),
                         st.lists(st.sampled_from(["a", "bc", 1, 12, 2, "d"]), max_size=3),
                         st.fixed_dictionaries({"kind": st.sampled_from(["cat", "dog"])},
                                               optional={"next": st.none()}))  # fmt: skip
animals = st.one_of(st.none(), st.fixed_dictionaries(
    {"kind": st.sampled_from(["cat", "dog", "wolf", "cow"])},
    optional={"lives": st.integers(0, 9), "good": st.booleans()}))  # fmt: skip
objects = st.lists(st.tuples(st.sampled_from(["name", "age", "score", "tags", "pet", "x"]),
                             field_values)
                   | st.tuples(st.just("animal"), animals | field_values),
                   max_size=6).map(dict)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(objects, st.sampled_from([None, 1]))
def test_schema_accepts_exactly_what_conforms(value, indent):
    g = StructuredOutputsParams(json=SCHEMA, whitespace=64).grammar_
    text = json.dumps(value, indent=indent)
    ok, whole, closed = read(g, text)
    assert (ok and whole) == conforms(value, SCHEMA), text
    assert closed == (ok and whole)


PRINTABLE = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "é"]


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.sampled_from(["schema", "any", "choice"]))
def test_no_walk_reaches_a_dead_end(rnd, which):
    """Reading characters the automaton allows, chosen at random, never leads to a state that
    allows none while the answer is open (a sampled request would be stuck)."""
    g = {"schema": StructuredOutputsParams(json=SCHEMA).grammar_, "any": ANY,
         "choice": StructuredOutputsParams(choice=["ab", "abc", "b"]).grammar_}[which]  # fmt: skip
    state = g.initial()
    for _ in range(60):
        if not state[0]:
            return
        options = [s for s in (g.step(state, ch) for ch in PRINTABLE) if s is not None]
        assert options or g.accepts(state), state
        if not options:
            return
        state = rnd.choice(options)


@settings(max_examples=300, deadline=None)
@given(animals | field_values)
def test_tagged_union_accepts_exactly_what_conforms(value):
    """oneOf objects told apart by their first key's strings: after the tag, the object goes
    on as its branch (a dog needs `good` and has no `lives`)."""
    s = SCHEMA["properties"]["animal"]
    ok, whole, _ = read(StructuredOutputsParams(json=s).grammar_, json.dumps(value))
    assert (ok and whole) == conforms(value, s), value


def test_string_lengths_count_characters_escapes_included():
    g = StructuredOutputsParams(json=SCHEMA).grammar_
    for name, ok in (
        ("abcd", True),
        ("abc\\t", True),
        ("abc\\u00e9", True),
        ("é", True),
        ("abcd\\t", False),
        ("abcd\\u00e9", False),
        ("abcde", False),
        ("", False),
    ):
        assert read(g, f'{{"name": "{name}", "age": 1}}')[1] == ok, name


def test_choices_and_their_ends():
    g = StructuredOutputsParams(choice=["yes", "yes!", "no"]).grammar_
    assert read(g, "yes") == (True, True, False)  # "yes!" may still follow
    assert read(g, "yes!") == (True, True, True)
    assert read(g, "no") == (True, True, True)
    assert read(g, "ye") == (True, False, False)
    assert read(g, "nope")[0] is False


def test_whitespace_is_capped():
    g = StructuredOutputsParams(json_object=True).grammar_  # default: 2 blanks in a row
    assert read(g, '{ "a" :  1}')[1]
    assert not read(g, '{   "a": 1}')[0]
    assert not read(StructuredOutputsParams(json_object=True, disable_any_whitespace=True)
                    .grammar_, '{"a": 1}')[0]  # fmt: skip
    assert not read(g, "[1]")[0]  # json_object: an object


@pytest.mark.parametrize("spec, says", [
    ({"json": {"type": "integer", "multipleOf": 3}}, "keyword 'multipleOf'"),
    ({"json": {"anyOf": [{"type": "object"}, {"type": "object", "properties": {}}]}},
     "start differently"),
    ({"json": {"$ref": "#/$defs/Nope"}}, "points nowhere"),
    ({"json": {"type": "strng"}}, "type must be one of"),
    ({"json": {"properties": {"a": {}}, "required": ["b"]}}, "'b' is not among"),
    ({"json": {"type": "array", "minItems": 3, "maxItems": 2}}, "maximum below"),
    ({"json": {"type": "integer", "minimum": 1.5, "maximum": 1.9}}, "no integer lies within"),
    ({"json": {"type": "number", "exclusiveMinimum": 2, "maximum": 2}}, "no number lies"),
    ({"json": {"type": "number", "minimum": "0"}}, "minimum must be a number"),
    ({"json": {"type": "number", "exclusiveMaximum": True}}, "needs maximum"),
    ({"json": {"type": "integer", "multipleOf": 2}}, "keyword 'multipleOf'"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "is an object"),
    ({"regex": "[a-z]+"}, "by regex is not supported"),
    ({"choice": []}, "non-empty list"),
    ({"choice": [str(i) for i in range(5000)]}, "at most 4096"),
    ({"json": {"enum": list(range(5000))}}, "at most 4096"),
    ({}, "exactly one of"),
    ({"json": {}, "choice": ["a"]}, "exactly one of"),
    ({"json_object": True, "whitespace": -1}, "whitespace"),
    ({"json_object": "no"}, "true or false"),
    ({"json_object": True, "whitespace_pattern": "[ ]?"}, "whitespace_pattern is not"),
    ({"json": {"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}}, "refers to itself"),
    ({"json": {"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"allOf": [{"$ref": "#/$defs/A"}]}},
               "$ref": "#/$defs/A"}}, "refers to itself"),
    ({"json": {"enum": [1.0, float("inf")]}}, "cannot be written as JSON"),
    ({"json": {"$defs": {"S": {"type": "string"}}, "$ref": "#/$defs/S", "maxLength": 2}},
     "beside \\$ref"),
    ({"json": {"enum": ["a", "abcdef"], "maxLength": 2}}, "enum / const beside 'maxLength'"),
    ({"json": {"type": "integer", "enum": ["a"]}}, "no enum value is of type"),
    ({"json": {"$ref": []}}, "only local"),
    ({"json": {"properties": {"a": {}}, "required": [["a"]]}}, "property names"),
    ({"json": {"oneOf": [{"type": "number"}, {"type": "integer"}]}}, "start differently"),
    ({"json": {"items": json.loads('{"items": ' * 900 + "{}" + "}" * 900)}}, "nested too deeply"),
])  # fmt: skip
def test_bad_constraints_say_what_is_wrong(spec, says):
    with pytest.raises(ConfigError, match=says):
        StructuredOutputsParams(**spec)
    with pytest.raises(ConfigError):
        SamplingParams(structured_outputs=dict(spec))


def test_schema_edges():
    """Beside enum a type filters its values; Union[int, float] is one number; non-ASCII keys
    and values are written as themselves; an answer starts with its value; a long array's
    items do not make new states (its masks repeat)."""
    g = StructuredOutputsParams(json={"type": "string", "enum": ["a", 5, "b"]}).grammar_
    assert read(g, '"a"')[1] and not read(g, "5")[0]
    g = StructuredOutputsParams(json={"anyOf": [{"type": "integer"}, {"type": "number"},
                                                {"type": "null"}]}).grammar_  # fmt: skip
    assert read(g, "1.5")[1] and read(g, "null")[1]
    g = StructuredOutputsParams(json={"anyOf": [{"type": "integer"}, {"type": "integer"}]}).grammar_
    assert not read(g, "1.5")[0]
    g = StructuredOutputsParams(json={"properties": {"名前": {"enum": ["café"]}}}).grammar_
    assert read(g, '{"名前": "café"}')[1]
    assert not read(StructuredOutputsParams(json_object=True).grammar_, " {}")[0]
    g = StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}}).grammar_
    states = {g.read(g.initial(), "[" + ",".join(["7"] * n) + ",") for n in (1, 5, 50)}
    assert len(states) == 1
    # unions inside unions (directly, or a $ref to a oneOf), with pydantic's discriminator
    a = {"type": "object", "properties": {"k": {"const": "a"}, "x": {"type": "integer"}},
         "required": ["k", "x"]}  # fmt: skip
    b = {"type": "object", "properties": {"k": {"const": "b"}, "y": {"type": "string"}},
         "required": ["k", "y"]}  # fmt: skip
    c = {"type": "object", "properties": {"k": {"const": "c"}}, "required": ["k"]}
    for schema in ({"anyOf": [{"anyOf": [a, b]}, c]},
                   {"$defs": {"AB": {"oneOf": [a, b], "discriminator": {"propertyName": "k"}}},
                    "anyOf": [{"$ref": "#/$defs/AB"}, c]}):  # fmt: skip
        g = StructuredOutputsParams(json=schema).grammar_
        assert read(g, '{"k": "a", "x": 1}')[1] and read(g, '{"k": "b", "y": ""}')[1]
        assert not read(g, '{"k": "a"}')[1] and not read(g, '{"k": "a", "y": ""}')[0]
        assert read(g, '{"k": "c"}')[1]
    g = StructuredOutputsParams(json={"$defs": {"T": {"type": "array", "items": {"$ref": "#"}}},
                                      "$ref": "#/$defs/T"}).grammar_  # fmt: skip
    assert read(g, "[[], [[]]]")[1]


KEYWORDS = ["type", "enum", "const", "properties", "required", "additionalProperties", "items",
            "minItems", "maxItems", "minLength", "maxLength", "anyOf", "oneOf", "allOf", "$ref",
            "$defs", "title", "pattern", "discriminator", "minimum", "maximum",
            "exclusiveMinimum", "exclusiveMaximum"]  # fmt: skip
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 5) | st.floats() | st.text(max_size=5)
    | st.sampled_from(["object", "array", "string", "integer", "number", "null", "boolean",
                       "#", "#/$defs/A", "#/$defs/B", "#/properties/a"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(KEYWORDS + ["a", "b", "A", "B"]), inner, max_size=4),
    max_leaves=14)  # fmt: skip


@settings(max_examples=600, deadline=None)
@given(
    st.dictionaries(st.sampled_from(KEYWORDS), junk, max_size=5),
    st.text(alphabet='{}[]",: 0123456789.-tfnulabe', max_size=12),
)
def test_any_schema_compiles_or_says_why(schema, text):
    """Fuzzed schemas (any nesting of the keywords, wrong kinds of values, dangling and
    circular references): a grammar or a ConfigError, never another exception; a compiled one
    reads any text without raising and never accepts what is not JSON."""
    try:
        g = StructuredOutputsParams(json=schema).grammar_
    except ConfigError:
        return
    ok, whole, _ = read(g, text)
    if ok and whole:
        assert is_json(text), (schema, text)


def test_pickled_params_keep_their_grammar():
    """Sampling parameters travel to other ranks pickled."""
    sp = SamplingParams(structured_outputs={"json": SCHEMA})
    back = pickle.loads(pickle.dumps(sp))
    assert read(back.structured_outputs.grammar_, '{"name": "ab", "age": 3}')[1]


# ---- with a tokenizer and a model --------------------------------------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random tiny Llama with a real BPE tokenizer trained on code and prose."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from expertswitch.zoo.corpora import load_corpora
    from expertswitch.zoo.tokenizer import train_tokenizer

    corpora = load_corpora(0, scale=0.05)
    tok = train_tokenizer([d for c in corpora.values() for d in c.train[:80]], 600)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("guided") / "base"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, {}, dtype=torch.float32)


def test_allowed_tokens_are_every_token_one_by_one(engine):
    """The trie walk equals reading each token's text alone, in states met along answers."""
    index = token_index(engine.tokenizer, engine.registry.vocab(None))
    g = StructuredOutputsParams(json=SCHEMA).grammar_
    assert len(index.text) > 400  # the tokenizer's words, not a stub
    answer = '{"name": "ab\\u00e9", "age": -12, "tags": ["bc", 12], "pet": {"kind": "cat"}}'
    state, checked = g.initial(), 0
    for ch in answer:
        brute = sorted(i for i, t in index.text.items() if g.read(state, t) is not None)
        assert g.allowed(index, state) == brute, repr(ch)
        checked += len(brute) > 0
        state = g.step(state, ch)
    assert checked == len(answer)
    # strings held to a pattern or format, bounded numbers and unique items (no shortcut may
    # skip them)
    held = {
        "type": "object",
        "required": ["d", "code", "p"],
        "properties": {
            "d": {"type": "string", "format": "date"},
            "code": {"type": "string", "pattern": "^[a-c]+-[0-9]{2}$"},
            "p": {"type": "number", "minimum": 0.1, "exclusiveMaximum": 1},
            "u": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "n": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        },
    }
    g = StructuredOutputsParams(json=held).grammar_
    answer = '{"d": "2024-02-29", "code": "ab-07", "p": 0.1, "u": ["a", "ab", "b"], "n": [1, 12]}'
    state = g.initial()
    for ch in answer:
        brute = sorted(i for i, t in index.text.items() if g.read(state, t) is not None)
        assert g.allowed(index, state) == brute, repr(ch)
        state = g.step(state, ch)
    assert g.accepts(state)


def _sampling(so, temperature, seed=None, max_tokens=80):
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=so)  # fmt: skip


def test_answers_follow_the_schema(engine):
    """A random model, sampled hot: every answer that ends is JSON that conforms; one cut at
    max_tokens is a prefix the automaton reads. Free requests in the same batch get the tokens
    they get alone."""
    so = StructuredOutputsParams(json=SCHEMA)
    prompts = ["def f(x):", "The cat", "{", "1 + 2 ="]
    free = SamplingParams(temperature=0.8, seed=3, max_tokens=12)
    alone = engine.generate(prompts[:1], None, free)[0].token_ids
    params = [_sampling(so, 1.0, seed=s) for s in range(len(prompts))] + [free]
    outs = engine.generate(prompts + prompts[:1], None, params)
    assert outs[-1].token_ids == alone
    ended = 0
    assert all(o.finish_reason in ("stop", "length") for o in outs), [o.error for o in outs]
    for o in outs[:-1]:
        if o.finish_reason == "stop":
            ended += 1
            assert conforms(json.loads(o.text), SCHEMA), o.text
        else:
            assert o.finish_reason == "length" and read(so.grammar_, o.text)[0], o.text
    assert ended >= 1
    # greedy, and a seeded answer the same alone as in the batch
    seeded = engine.generate(prompts[2:3], None, _sampling(so, 1.0, seed=2))[0]
    assert seeded.token_ids == outs[2].token_ids
    greedy = engine.generate(prompts, None, _sampling(so, 0.0))
    assert all(read(so.grammar_, o.text)[0] for o in greedy)


def test_unique_items_through_the_engine(engine):
    """A random model sampled hot under a pydantic model with set[str] and frozenset[int]
    fields: every answer that ends reads back through the model with no item lost to a
    repeat; one cut at max_tokens is a prefix the automaton reads."""
    from pydantic import BaseModel

    class Tags(BaseModel):
        tags: set[str]
        ids: frozenset[int]

    so = StructuredOutputsParams(json=Tags.model_json_schema())
    outs = engine.generate(["{"] * 6, None, [_sampling(so, 1.0, seed=s, max_tokens=60)
                                              for s in range(6)])  # fmt: skip
    assert all(o.finish_reason in ("stop", "length") for o in outs), [o.error for o in outs]
    for o in outs:
        if o.finish_reason == "stop":
            raw = json.loads(o.text)
            got = Tags.model_validate_json(o.text)
            assert (len(got.tags), len(got.ids)) == (len(raw["tags"]), len(raw["ids"])), o.text
        else:
            assert read(so.grammar_, o.text)[0], o.text


def test_choice_and_json_object(engine):
    choice = StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"])
    outs = engine.generate(["x"] * 6, None, [_sampling(choice, 1.0, seed=s) for s in range(6)])
    assert all(o.text in choice.choice and o.finish_reason == "stop" for o in outs)
    assert len({o.text for o in outs}) > 1  # sampled, not forced to one
    obj = StructuredOutputsParams(json_object=True)
    outs = engine.generate(["a", "b"], None, [_sampling(obj, 0.7, seed=s, max_tokens=200)
                                              for s in range(2)])  # fmt: skip
    for o in outs:
        assert read(obj.grammar_, o.text)[0]
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)


def test_an_answer_nothing_can_extend_stops_even_without_eos(engine):
    """A top-level integer 0 (nothing may follow it) ends the request though EOS is ignored
    (it would have no token left to sample); stop ids outside the vocabulary are refused."""
    so = StructuredOutputsParams(json={"type": "integer"})
    zero = engine.tokenizer.convert_tokens_to_ids("0")
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={zero: 100},
                        structured_outputs=so)  # fmt: skip
    out = engine.generate(["n ="], None, sp)[0]
    assert out.text == "0" and out.finish_reason == "stop"
    with pytest.raises(ConfigError, match="stop_token_ids names token id"):
        engine.add_request("x", None, SamplingParams(stop_token_ids=[10**6],
                                                     structured_outputs=so))  # fmt: skip


def test_a_reasoning_answer_thinks_freely_then_follows_the_constraint(engine):
    """reasoning_end: the answer is free (and never complete) until the texts read make
    "</think>" — across token boundaries — but for tokens that would make it and run on into
    what cannot start the answer (banned); from there the constraint holds (the answer
    starts at once, as any held answer does); the engine's answers think freely."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    so = StructuredOutputsParams(json=schema, reasoning_end="</think>")
    tok = engine.tokenizer
    thinking = tok.encode("I should think {[ about it.</think>", add_special_tokens=False)
    answer = tok.encode('{"a": 12}', add_special_tokens=False)
    assert len(tok.encode("</think>", add_special_tokens=False)) > 1  # (split over tokens)
    guide = engine._guide(None, _sampling(so, 0.0))
    vocab = engine.registry.vocab(None)
    texts = guide.inner.index.text
    so_far = ""
    for t in thinking:
        row = torch.zeros(vocab)
        guide.mask(row)
        # free while thinking, but for tokens that would close it with what cannot start
        # the answer (here: anything but blanks and "{")
        for b in torch.isinf(row).nonzero().flatten().tolist():
            after = (so_far + texts[b]).split("</think>", 1)
            assert len(after) == 2 and after[1].strip()[:1] not in ("", "{"), texts[b]
        assert torch.isfinite(row[t]) and not guide.complete
        assert guide.advance(t)
        so_far += texts[t]
    assert not guide.thinking
    for t in answer:
        row = torch.zeros(vocab)
        guide.mask(row)
        assert torch.isinf(row).any() and torch.isfinite(row[t])  # held, and t allowed
        assert guide.advance(t)
    assert guide.complete
    broken = engine._guide(None, _sampling(so, 0.0))
    assert all(broken.advance(t) for t in tok.encode("x</think", add_special_tokens=False))
    past = [t for t, text in texts.items() if len(text) > 1 and text[0] == ">" and text[1] != "{"
            and not text[1:].isspace()]  # fmt: skip
    row = torch.zeros(vocab)
    broken.mask(row)  # ">x" would end the thinking with what cannot start the answer: banned
    assert past and torch.isinf(row[past]).all() and torch.isfinite(row).sum() > vocab // 2
    assert not broken.advance(past[0])
    with pytest.raises(ConfigError, match="reasoning_end must be a non-empty string"):
        StructuredOutputsParams(json_object=True, reasoning_end="")
    # random walks towards the end's pieces and the tokens that would run past it: every
    # token the mask allows is read, and every walk that ended its thinking goes on with the
    # answer (the tokens that would break it are banned, not sampled)
    import random

    pieces = tok.encode("</think>", add_special_tokens=False)
    closed = 0
    for seed in range(60):
        rnd, walk, g = random.Random(seed), [], engine._guide(None, _sampling(so, 0.0))
        step = 0  # pieces of the end taken in a row
        for _ in range(24):
            row = torch.zeros(vocab)
            g.mask(row)
            allowed = torch.isfinite(row).nonzero().flatten().tolist()
            if rnd.random() < 0.85 and step < len(pieces):
                want, step = pieces[step], step + 1
            else:
                want, step = rnd.choice(past[:5] + allowed[:3]), 0
            t = want if want in allowed else rnd.choice(allowed)
            assert g.advance(t), (walk, t)
            walk.append(t)
            if g.complete:
                break
        closed += not g.thinking
    assert closed >= 10
    # the engine: a random model thinks freely (its text unconstrained), its end not forced
    free = engine.generate(["x"], None, _sampling(so, 1.0, seed=1, max_tokens=30))[0]
    held = engine.generate(["x"], None, _sampling(StructuredOutputsParams(json=schema), 1.0,
                                                  seed=1, max_tokens=30))[0]  # fmt: skip
    assert free.finish_reason in ("stop", "length") and free.token_ids != held.token_ids


def test_a_tokenizer_is_needed(engine, model):
    bare = Engine(model, {}, dtype=torch.float32, tokenizer=False)
    with pytest.raises(ConfigError, match="need a tokenizer"):
        bare.add_request([5, 6], None, _sampling(StructuredOutputsParams(json_object=True), 0))


@pytest.mark.parametrize("special_bytes", [False, True])
def test_sentencepiece_style_tokenizers_answer_what_they_read(tmp_path, special_bytes):
    """A Llama-style tokenizer (Metaspace, byte fallback, the first space stripped on decode),
    its byte tokens plain or special (special ones vanish from decoded answers, so they are
    never allowed): every answer that closes parses, and its text is exactly the text the
    automaton read token by token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from expertswitch.zoo.corpora import load_corpora

    corpora = load_corpora(0, scale=0.05)
    raw = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])  # fmt: skip
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    specials = ["<unk>", "<s>", "</s>"] + (byte_tokens if special_bytes else [])
    raw.train_from_iterator([d for c in corpora.values() for d in c.train[:80]],
                            trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                show_progress=False))  # fmt: skip
    if not special_bytes:
        raw.add_tokens([AddedToken(b, special=False, normalized=False) for b in byte_tokens])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")  # fmt: skip
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "sp")
    tok.save_pretrained(tmp_path / "sp")
    eng = Engine(tmp_path / "sp", {}, dtype=torch.float32)
    index = token_index(eng.tokenizer, eng.registry.vocab(None))
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                               "n": {"type": "integer"}},
              "required": ["name", "n"]}  # fmt: skip
    closed = 0
    for so in (StructuredOutputsParams(json=schema), StructuredOutputsParams(json_object=True),
               StructuredOutputsParams(choice=["yes", "no way"])):  # fmt: skip
        outs = eng.generate(["x"] * 6, None, [_sampling(so, 1.0, seed=s, max_tokens=60)
                                              for s in range(6)])  # fmt: skip
        for o in outs:
            read_text = "".join(index.text.get(t, "") for t in o.token_ids)
            assert o.text == read_text, (o.text, read_text)
            if o.finish_reason == "stop":
                closed += 1
                assert o.text in so.choice if so.choice else is_json(o.text), o.text
    assert closed >= 6


def test_float_bounds_are_the_numbers_written():
    """minimum 0.1 takes 0.1 and exclusiveMaximum 0.3 refuses 0.3 (the bounds as decimal
    numbers, not as the binary values nearest to them); a bound past BOUND_DIGITS and a
    bounded number past BOUNDED_DIGITS characters are refused, not raised on."""
    from expertswitch.engine.guided import BOUNDED_DIGITS

    g = StructuredOutputsParams(json={"type": "number", "minimum": 0.1,
                                      "exclusiveMaximum": 0.3}).grammar_  # fmt: skip
    assert read(g, "0.1")[:2] == (True, True) and read(g, "0.2999")[:2] == (True, True)
    assert not read(g, "0.3")[1] and not read(g, "0.0999")[1]
    with pytest.raises(ConfigError, match="too many digits"):
        StructuredOutputsParams(json={"type": "integer", "maximum": 10**200}).grammar_  # noqa: B018
    g = StructuredOutputsParams(json={"type": "number", "minimum": 0, "maximum": 1}).grammar_
    long = "0." + "3" * (BOUNDED_DIGITS - 2)
    assert read(g, long)[:2] == (True, True) and not read(g, long + "3")[0]


BOUND_CASES = [  # (type, bounds keywords): 2020-12's numbers and draft 4's booleans
    ("integer", {"minimum": 0}),
    ("integer", {"minimum": -12, "maximum": 37}),
    ("integer", {"exclusiveMinimum": -1.5, "exclusiveMaximum": 10}),
    ("integer", {"minimum": 2.5, "maximum": 3.5}),
    ("integer", {"exclusiveMinimum": 3, "maximum": 20}),
    ("integer", {"minimum": -99, "maximum": -40}),
    ("number", {"minimum": 0, "maximum": 1}),
    ("number", {"exclusiveMinimum": 0, "exclusiveMaximum": 0.5}),
    ("number", {"minimum": -1.5, "exclusiveMaximum": 99.5}),
    ("number", {"minimum": 10, "exclusiveMinimum": True, "maximum": 12.5}),
    ("number", {"minimum": 1, "exclusiveMinimum": 2, "maximum": 3, "exclusiveMaximum": 2.5}),
    ("number", {"minimum": -99.5, "exclusiveMaximum": -50}),
    ("number", {"minimum": 2.5, "maximum": 2.5}),
    ("number", {"minimum": 5, "exclusiveMinimum": 5, "maximum": 8, "exclusiveMaximum": 8}),
]


def _number_texts():
    """Every JSON number of at most 2 integer digits and 3 decimals (no exponent), in each
    of its spellings (trailing zeros included), with its value in thousandths."""
    out = []
    for sign in ("", "-"):
        for whole in range(100):
            out.append((f"{sign}{whole}", (-1 if sign else 1) * whole * 1000))
            for places in (1, 2, 3):
                for frac in range(10**places):
                    value = whole * 1000 + frac * 10 ** (3 - places)
                    out.append((f"{sign}{whole}.{frac:0{places}d}", (-1 if sign else 1) * value))
    return out


NUMBER_TEXTS = _number_texts()


@pytest.mark.parametrize("kind, keywords", BOUND_CASES)
def test_bounded_numbers_end_inside_and_never_strand(kind, keywords):
    """minimum / maximum / exclusive ones against a brute-force oracle over every number of
    up to 2 integer digits and 3 decimals (the bounds are within ±99.5 in halves, below 100
    where they are unbounded above, so every
    number that starts as a readable prefix and fits is among them): a prefix is readable
    exactly when some fitting number starts with it (no dead end), a whole number is an
    answer exactly when it fits, and an exponent is never written."""
    lo = keywords.get("minimum", -(10**9))
    hi = keywords.get("maximum", 10**9)
    lo_x = hi_x = False
    if isinstance(keywords.get("exclusiveMinimum"), bool):
        lo_x = keywords["exclusiveMinimum"]
    elif "exclusiveMinimum" in keywords and keywords["exclusiveMinimum"] >= lo:
        lo, lo_x = keywords["exclusiveMinimum"], True
    if isinstance(keywords.get("exclusiveMaximum"), bool):
        hi_x = keywords["exclusiveMaximum"]
    elif "exclusiveMaximum" in keywords and keywords["exclusiveMaximum"] <= hi:
        hi, hi_x = keywords["exclusiveMaximum"], True
    lo, hi = round(lo * 1000), round(hi * 1000)

    def fits(text, v):
        if kind == "integer" and "." in text:
            return False
        return (v > lo or v == lo and not lo_x) and (v < hi or v == hi and not hi_x)

    fitting = [t for t, v in NUMBER_TEXTS if fits(t, v)]
    prefixes = {t[:i] for t in fitting for i in range(1, len(t) + 1)}
    g = StructuredOutputsParams(json={"type": kind, **keywords}).grammar_
    states = {"": g.initial()}
    for text, value in NUMBER_TEXTS:
        if len(text) > 5:
            continue
        for i in range(1, len(text) + 1):  # (each prefix read once: states memoised here)
            if text[:i] not in states:
                prev = states[text[: i - 1]]
                states[text[:i]] = None if prev is None else g.step(prev, text[i - 1])
            if i <= 4:  # (longer prefixes may need a 4th decimal to fit: "0.000" of (0, 1))
                assert (states[text[:i]] is not None) == (text[:i] in prefixes), text[:i]
        state = states[text]
        assert (state is not None and g.accepts(state)) == fits(text, value), text
    for state in states.values():
        if state is not None:
            assert g.step(state, "e") is None and g.step(state, "E") is None
    # inside an object, a bounded number ends at the next character only when it fits
    obj = StructuredOutputsParams(json={"type": "object", "properties": {"x": {
        "type": kind, **keywords}}, "required": ["x"]}).grammar_  # fmt: skip
    for text in fitting[:: max(1, len(fitting) // 200)]:
        assert read(obj, '{"x": ' + text + "}") == (True, True, True), text


PATTERNS = ["^[a-c]+x?$", "ab|cd", "^(ab)*c{2,3}$", r"^\d{3}-\d{2}$", "^[^a]b.$", "x",
            "^(a|ab)(c|bcd)$", r"^\w+@\w+\.com$", "^a{0,2}b{1,}$",
            "^(?:[0-9a-f]{2}:){2}[0-9a-f]{2}$", r"^\s?\S+$", r'^"[\\/]\n?$', "^é+?.*?$",
            r"^[\d\-]{2}[xa-c-]$", "^$", "a.c", "^a|b$", "(^x|y)z", "a$|^b", "(a|$)b?"]  # fmt: skip
STRING_CHARS = 'abcdx0129-@.:\n" \\/é'


def _python(pattern: str) -> re.Pattern:
    """The same pattern in Python's own engine, as ECMA reads it: ASCII classes, and each
    "$" only at the very end (Python's "$" also matches before a final newline)."""
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern), re.ASCII)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(PATTERNS), st.text(alphabet=STRING_CHARS, max_size=8),
       st.sampled_from([(0, None), (2, None), (0, 3), (1, 4)]))  # fmt: skip
def test_a_pattern_holds_strings_as_pythons_regex_engine_does(pattern, value, lengths):
    """A string held to a JSON schema pattern (engine/regex.py's NFA, through the JSON
    automaton: escapes decoded) is a whole answer exactly when Python's `re` finds the
    pattern in it (JSON schema's unanchored search) and its length fits min/maxLength."""
    lo, hi = lengths
    schema = {"type": "string", "pattern": pattern, "minLength": lo}
    if hi is not None:
        schema["maxLength"] = hi
    try:
        g = StructuredOutputsParams(json=schema).grammar_
    except ConfigError as e:
        assert "no string" in str(e)  # (a length no match has)
        return
    want = bool(_python(pattern).search(value)) and lo <= len(value) <= (hi or 99)
    ok, whole, _ = read(g, json.dumps(value, ensure_ascii=False))
    assert (ok and whole) == want, (pattern, value, lengths)


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.sampled_from(PATTERNS),
       st.sampled_from([(0, None), (2, 5), (1, 3)]))  # fmt: skip
def test_a_pattern_never_strands_a_string(rnd, pattern, lengths):
    """Random walks through what a pattern's string allows (escapes included) never reach a
    state that allows nothing while the string is open."""
    lo, hi = lengths
    try:
        g = StructuredOutputsParams(json={"type": "string", "pattern": pattern,
                                          "minLength": lo, "maxLength": hi}).grammar_  # fmt: skip
    except ConfigError:
        return
    state = g.initial()
    for _ in range(20):
        if not state[0]:
            return
        options = [s for s in (g.step(state, ch) for ch in PRINTABLE + list('"\\n')) if s]
        assert options, (pattern, state)
        state = rnd.choice(options)


def test_formats_take_what_pythons_own_writers_write():
    """format date / time / date-time / uuid / email / ipv4 / ipv6 / hostname / uri / duration:
    values written by Python's datetime, uuid and ipaddress modules (and ISO 8601 durations)
    are whole answers, malformed ones are not;
    "password" is any string; an unknown format, a bad pattern and pattern with format are
    refused by name."""
    import datetime
    import ipaddress
    import uuid

    now = datetime.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=datetime.timezone.utc)
    good = {
        "date": [
            now.date().isoformat(),
            "1999-12-31",
            "2000-02-29",
            "0004-02-29",
            "2023-02-28",
            "2024-04-30",
            "0001-01-01",
        ],
        "time": [now.timetz().isoformat(), "00:00:00Z", "12:30:05.5-08:00"],
        "date-time": [
            now.isoformat(),
            now.replace(microsecond=0).isoformat(),
            "2024-01-01T00:00:00Z",
        ],  # fmt: skip
        "uuid": [str(uuid.UUID(int=2**128 - 1)), str(uuid.UUID(int=12345))],
        "email": ["a.b+c@example.co.uk", "x@y.io"],
        "ipv4": [str(ipaddress.IPv4Address(2**32 - 1)), "10.0.0.1", "0.0.0.0"],
        "ipv6": [str(ipaddress.IPv6Address(n)) for n in (0, 1, 2**128 - 1, 2**112, 7 << 64)]
        + [
            ipaddress.IPv6Address(2**100 + 5).exploded,
            "2001:DB8::8a2e:370:7334",
            "1:2:3:4:5:6:7::",
            "::2:3:4:5:6:7:8",
        ],
        "duration": ["P1D", "PT1H", "P1Y2M3DT4H5M6S", "P2W", "PT0S", "P1M", "PT36H", "P1DT12H"],
        "hostname": ["localhost", "a-b.example.com"],
        "uri": ["https://example.com/a?b=c#d", "urn:isbn:0451450523"],
        "password": ["anything at all", ""],
    }
    bad = {
        "date": [
            "2024-13-01",
            "2024-1-01",
            "24-01-01",
            "2024-01-32",
            "2023-02-29",
            "1900-02-29",
            "2024-02-30",
            "2024-04-31",
            "0000-01-01",
        ],
        "time": ["24:00:00Z", "12:00:00", "12:60:00Z", "23:59:60Z"],
        "date-time": ["2024-01-01 00:00:00Z", "2024-01-01T00:00:00"],
        "uuid": ["1234", str(uuid.UUID(int=1)) + "0"],
        "email": [
            "no-at.example.com",
            "a@b",
            "a@@b.com",
            "a..b@x.io",
            ".a@x.io",
            "a.@x.io",
            "a@ab--c.io",
            "a" * 65 + "@x.io",
            "a@x." + "b" * 64,
        ],
        "ipv4": ["256.0.0.1", "1.2.3", "01.2.3.4"],
        "ipv6": [
            "1:2:3:4:5:6:7:8:9",
            ":::",
            "1::2::3",
            "12345::",
            "g::1",
            "1:2:3:4:5:6:7",
            ":1::",
            "1:2:3:4:5:6:7:8::",
            "fe80::1%eth0",
        ],
        "duration": ["P", "PT", "1D", "P1H", "P1DT", "P1S", "P1W2D", "P1.5D", "P1Y1D", "P1234567D"],
        "hostname": ["-a.com", "a..b"],
        "uri": ["no scheme", "1http://x"],
    }
    for fmt, values in good.items():
        g = StructuredOutputsParams(json={"type": "string", "format": fmt}).grammar_
        for v in values:
            assert read(g, json.dumps(v)) == (True, True, True), (fmt, v)
        for v in bad.get(fmt, []):
            assert not all(read(g, json.dumps(v))), (fmt, v)
    huge = {"type": "string", "pattern": "^(ab)+$", "minLength": 10**9}  # (a cycle: no loop)
    g = StructuredOutputsParams(json=huge).grammar_
    assert read(g, '"abab')[0] and not read(g, '"abab"')[0]
    ends = StructuredOutputsParams(json={"type": "string", "pattern": "a\\\\$"}).grammar_
    assert all(read(ends, json.dumps("xa\\"))) and not read(ends, json.dumps("xa"))[1]
    dot = StructuredOutputsParams(json={"type": "string", "pattern": "^a.c$"}).grammar_
    assert all(read(dot, '"abc"')) and not all(read(dot, '"a\\nc"'))  # (ECMA's ".")
    again = pickle.loads(pickle.dumps(dot))  # (parameters travel to other ranks pickled)
    assert all(read(again, '"a c"')) and not read(again, '"ac"')[1]
    for schema, says in (({"type": "string", "format": "iri"}, "format 'iri' is not"),
                         ({"type": "string", "pattern": "(a)\\1"}, "backreference"),
                         ({"type": "string", "pattern": "(?=a)"}, "lookarounds"),
                         ({"type": "string", "pattern": "a^b"}, "matches no string"),
                         ({"type": "string", "pattern": "a$b"}, "matches no string"),
                         ({"type": "string", "pattern": "[z-a]"}, "runs backwards"),
                         ({"type": "string", "pattern": "a{3,2}"}, "maximum below"),
                         ({"type": "string", "pattern": "^a{1000}{1000}$"}, "too large"),
                         ({"type": "string", "pattern": "^abc$", "maxLength": 2}, "no string"),
                         ({"type": "string", "pattern": "a", "format": "date"}, "beside"),
                         ({"type": "string", "pattern": 3}, "must be a string"),
                         ({"type": "string", "pattern": "a{99999}"}, "counts go up to"),
                         ({"type": "string", "pattern": "^((a?){900}){9}$"}, "too large"),
                         ({"type": "string", "pattern": "^\\x01$"}, "matches no string"),
                         ({"type": "string", "pattern": "^[\\x00-\\x07]$"},
                          "no string")):  # fmt: skip
        with pytest.raises(ConfigError, match=says):
            StructuredOutputsParams(json=schema).grammar_  # noqa: B018


@pytest.mark.parametrize("fmt", ["ipv6", "duration", "ipv4", "date-time", "date", "time"])
def test_every_whole_format_answer_is_valid_to_python(fmt):
    """Random walks through what a format's string allows: every point where the string may
    close is a value Python itself reads (ipaddress; pydantic's timedelta, datetime, date and
    time, as a pydantic model's field is checked, and datetime.fromisoformat), and no walk
    strands."""
    import datetime
    import ipaddress
    import random

    from pydantic import TypeAdapter

    def both(kind):  # (Python 3.10's fromisoformat takes 3 or 6 fraction digits only)
        pydantic = TypeAdapter(kind).validate_python
        if sys.version_info < (3, 11):
            return pydantic
        return lambda v: (pydantic(v), kind.fromisoformat(v.replace("Z", "+00:00")))

    check = {"ipv6": ipaddress.IPv6Address, "ipv4": ipaddress.IPv4Address,
             "duration": TypeAdapter(datetime.timedelta).validate_python,
             "date-time": both(datetime.datetime), "date": both(datetime.date),
             "time": both(datetime.time)}  # fmt: skip
    alphabet = list("0123456789abcdefABCDEFG:.-+PYMWDTHSZ ")  # fmt: skip
    g = StructuredOutputsParams(json={"type": "string", "format": fmt}).grammar_
    rnd = random.Random(fmt)
    closed = 0
    for _ in range(300):
        state, text = g.step(g.initial(), '"'), ""
        for _ in range(45):
            if g.step(state, '"'):  # the string may end here: a valid value
                check[fmt](text)
                closed += 1
            options = [(ch, nxt) for ch in alphabet if (nxt := g.step(state, ch))]
            if not options:
                assert g.step(state, '"'), (fmt, text)  # (never stranded)
                break
            ch, state = rnd.choice(options)
            text += ch
    assert closed > 100


@settings(max_examples=800, deadline=None)
@given(st.text(alphabet="ab()[]{}|*+?^$\\.-,0123dwsDuxn:=!<>", max_size=14),
       st.text(alphabet="ab0-\n.", max_size=6))  # fmt: skip
def test_any_pattern_compiles_or_says_why(pattern, value):
    """Fuzzed pattern texts: a Regex or a ConfigError naming the problem, never another
    exception; one that compiles reads any string without raising, and where Python's `re`
    reads the same text as ECMA would (no escapes or braces, whose dialects differ) they agree
    on every string."""
    from expertswitch.engine.regex import Regex

    try:
        rx = Regex(pattern)
    except ConfigError:
        return
    states = rx.initial()
    for ch in value:
        states = rx.step(states, ch)
    if "\\" in pattern or "{" in pattern or "}" in pattern or "[" in pattern:
        return
    try:
        py = _python(pattern)
    except re.error:
        return
    assert rx.accepts(states) == bool(py.search(value)), (pattern, value)


_EXACT = decimal.Context(Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)


def _same_json(a, b) -> bool:
    """JSON schema's equality of two scalar JSON values (1 and 1.0 are one; true is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    with decimal.localcontext(_EXACT):
        return a == b


@pytest.mark.parametrize("items", [
    {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"enum": ["x", "y", 1, 1.5]},
    {"type": "boolean"}, {"anyOf": [{"type": "string"}, {"type": "null"}]},
    {"type": "integer", "minimum": 0, "maximum": 30},
    {"type": "string", "pattern": "^[ab]+$"}])  # fmt: skip
def test_unique_items_are_never_repeated(items):
    """uniqueItems (pydantic's set[X]): random walks through the array's answers; at every
    point the answer may end, its items are pairwise different as JSON schema compares them
    (1 and 1.0 equal, true and 1 not), counted against the text parsed by json; with
    finitely many values (an enum, booleans) no walk strands, and none writes more items
    than there are values."""
    import random

    schema = {"type": "array", "items": items, "uniqueItems": True, "maxItems": 6}
    g = StructuredOutputsParams(json=schema).grammar_
    rnd = random.Random(json.dumps(items))
    alphabet = list('[]," 0123456789.-eEabxytruefalsn\\')
    finite = "enum" in items or items.get("type") == "boolean"
    ended = 0
    for _ in range(250):
        state, text = g.initial(), ""
        for _ in range(60):
            if g.accepts(state):  # (numbers exact: 2e999 and 3e999 are not one inf)
                try:
                    with decimal.localcontext(_EXACT):
                        values = json.loads(text, parse_float=Decimal, parse_int=Decimal)
                except decimal.InvalidOperation:  # (an exponent past Decimal's: not checked)
                    values = None
                if values is not None:
                    assert isinstance(values, list) and len(values) <= 6, text
                    for i, a in enumerate(values):
                        assert not any(_same_json(a, b) for b in values[i + 1 :]), text
                    ended += 1
                if not state[0]:
                    break
            options = [(ch, nxt) for ch in alphabet if (nxt := g.step(state, ch))]
            if not options:
                assert not finite, text  # (finitely many values: never stranded)
                break
            ch, state = rnd.choice(options)
            text += ch
    assert ended > 20


def test_unique_items_as_pydantic_writes_them_and_refusals():
    """pydantic's set[str] / frozenset[int] fields: the answers their schema allows read back
    through the model with every item kept; a repeated item is refused where it ends (a
    string at its closing quote, a number at the character after it, an enum value before
    it starts); objects or arrays as unique items, a minItems the values cannot fill, and a
    uniqueItems that is not a boolean are refused by name."""
    from pydantic import BaseModel

    class Tags(BaseModel):
        tags: set[str]
        ids: frozenset[int]

    g = StructuredOutputsParams(json=Tags.model_json_schema()).grammar_
    good = '{"tags": ["a", "b", "a b"], "ids": [1, 10, -1, 0]}'
    assert read(g, good) == (True, True, True)
    parsed = Tags.model_validate_json(good)
    assert len(parsed.tags) == 3 and len(parsed.ids) == 4
    for bad in ('{"tags": ["a", "a"', '{"tags": ["a", "b", "a"', '{"tags": [], "ids": [1, 1,',
                '{"tags": [], "ids": [1, 2, 1]', '{"tags": ["\\u0061", "a"'):  # fmt: skip
        assert not read(g, bad)[0], bad
    assert read(g, '{"tags": [], "ids": [1, 11, 111]}') == (True, True, True)
    enum = StructuredOutputsParams(json={"type": "array", "items": {"enum": ["x", "y"]},
                                         "uniqueItems": True}).grammar_  # fmt: skip
    assert read(enum, '["x", "y"]')[1] and not read(enum, '["x", "x')[0]
    nums = StructuredOutputsParams(json={"type": "array", "items": {"type": "number"},
                                         "uniqueItems": True}).grammar_  # fmt: skip
    for text, unique in (("[1, 1.0]", False), ("[100, 1e2]", False), ("[1, 10e-1]", False),
                         ("[0, -0.0]", False), ("[0.5, 5E-1]", False), ("[12, 1.2]", True),
                         ("[1e5, 1e-5, 15, 150]", True), ("[-1, 1]", True),
                         ("[100, 1e+2]", False), ("[1e5, 1E+05]", False),
                         ("[1e" + "7" * 5000 + ", 1e" + "7" * 5000 + "]", False),
                         ("[1e" + "7" * 5000 + ", 1e" + "7" * 4999 + "]", True)):  # fmt: skip
        assert read(nums, text)[1] == unique, text[:40]
    mixed = StructuredOutputsParams(json={"type": "array", "uniqueItems": True, "items": {
        "anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"},
                  {"type": "null"}]}}).grammar_  # fmt: skip
    for text, unique in (('[true, 1, null, "null", 0, false]', True), ('["/", "\\/"]', False),
                         ('["a", "\\u0061"]', False), ("[null, null]", False)):  # fmt: skip
        assert read(mixed, text)[1] == unique, text
    for moot in ({"type": "array", "maxItems": 1, "uniqueItems": True},  # (nothing to hold)
                 {"type": "string", "uniqueItems": True}):  # fmt: skip
        text = '["x"]' if "maxItems" in moot else '"x"'
        assert read(StructuredOutputsParams(json=moot).grammar_, text)[1], moot
    nested = StructuredOutputsParams(
        json={
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        }
    ).grammar_
    assert read(nested, "[[1, 2], [1, 2], []]")[1] and not read(nested, "[[1, 2], [2, 2]")[0]
    assert not read(enum, '["x", "y",')[0]  # (no value left for a third item)
    for schema, says in (
        ({"type": "array", "items": {"type": "object"}, "uniqueItems": True}, "not objects"),
        ({"type": "array", "uniqueItems": True}, "not objects"),
        ({"type": "array", "items": {"type": "boolean"}, "uniqueItems": True, "minItems": 3},
         "take only 2 values"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": "yes"}, "true or false"),
        ({"type": "array", "items": {"enum": [1, 1.0, "1"]}, "uniqueItems": True,
          "minItems": 3}, "take only 2 values"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=says):
            StructuredOutputsParams(json=schema).grammar_  # noqa: B018
