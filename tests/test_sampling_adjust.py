"""Logits adjustments (vLLM's sampling parameters): repetition penalty and min_p against
transformers' own logits processors, presence/frequency penalties and logit_bias against a
plain loop over OpenAI's definition, min_tokens banning EOS and stop ids; then through the engine
(a bias that forces a token, EOS held back until min_tokens) and validation of bad values."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import hf_greedy, llama, prompts, solo  # noqa: F401 (fixtures)

from expertswitch.engine import Engine, SamplingParams
from expertswitch.engine.request import Request
from expertswitch.engine.sampler import SamplingFailure, adjust_logits, adjust_rows, sample
from expertswitch.errors import ConfigError

V = 50


def _request(prompt, output, **sp) -> Request:
    """A request with `output` generated so far; greedy unless a temperature is given."""
    r = Request("r", list(prompt), None, SamplingParams(**{"max_tokens": 32, "temperature": 0.0,
                                                          **sp}))  # fmt: skip
    r.output_token_ids = list(output)
    return r


def _adjusted(row, req, eos=frozenset()):
    out = row.clone()
    adjust_logits(out, req, eos)
    return out


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(int(penalty * 10))
    row = torch.randn(V, generator=g) * 3
    prompt, output = [3, 7, 7, 11], [11, 20, 3, 42]
    ours = _adjusted(row, _request(prompt, output, repetition_penalty=penalty))
    ids = torch.tensor([prompt + output])
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, row.clone()[None])[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_presence_frequency_penalties_and_logit_bias_follow_openai():
    g = torch.Generator().manual_seed(1)
    row = torch.randn(V, generator=g)
    output = [4, 9, 4, 4, 30]
    bias = {9: 2.5, 0: -100.0, 49: 0.75}
    req = _request([4, 5, 6], output, presence_penalty=0.4, frequency_penalty=-0.3,
                   logit_bias=bias)  # fmt: skip
    ours = _adjusted(row, req)
    want = row.clone()
    for t in range(V):  # OpenAI: mu[j] - c[j]·alpha_frequency - 1[c[j] > 0]·alpha_presence
        c = output.count(t)
        want[t] += bias.get(t, 0.0) - c * -0.3 - (0.4 if c else 0.0)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)
    # the prompt does not count for presence or frequency (it does for repetition)
    assert _adjusted(row, _request([1, 2], [], presence_penalty=1.0)).equal(row)


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    row = torch.zeros(V)
    row[2] = 5.0  # EOS would win
    eos = frozenset({2})
    early = _request([1], [7, 8], min_tokens=3, stop_token_ids=[13])
    out = _adjusted(row, early, eos)
    assert out[2] == float("-inf") and out[13] == float("-inf") and out[7] == 0
    assert sample(row[None], [early], [eos]) != [2]
    done = _request([1], [7, 8, 9], min_tokens=3, stop_token_ids=[13])
    assert _adjusted(row, done, eos).equal(row) and sample(row[None], [done], [eos]) == [2]
    ignoring = _request([1], [], min_tokens=3, ignore_eos=True)
    assert _adjusted(row, ignoring, eos)[2] == 5.0  # EOS is not a stop for it anyway


def test_min_p_equals_transformers_and_sampling_keeps_the_raw_logits():
    from transformers.generation.logits_process import MinPLogitsWarper

    g = torch.Generator().manual_seed(2)
    row = torch.randn(V, generator=g) * 0.5
    theirs = MinPLogitsWarper(0.5)(torch.zeros(1, 1, dtype=torch.long), row.clone()[None])[0]
    kept = set(torch.nonzero(theirs > float("-inf")).flatten().tolist())
    drawn = set()
    for seed in range(200):
        r = _request([1], [], temperature=1.0, min_p=0.5)
        r.generator = torch.Generator().manual_seed(seed)
        drawn |= set(sample(row[None], [r]))
    assert drawn <= kept and len(drawn) > 1 and len(kept) < V
    logits = row[None].clone()
    sample(logits, [_request([1, 2], [2], repetition_penalty=3.0, logit_bias={5: 9.0})])
    assert logits.equal(row[None])  # adjusted on a copy: logprobs report the model's


def test_adjustments_apply_in_vllms_order_and_a_fully_banned_row_fails():
    """logit_bias before the repetition penalty (3 / 1.5 = 2, not 2 / 1.5 + 1); min_p after
    temperature; a row whose every token is banned fails alone instead of giving token 0."""
    row = torch.full((V,), -1.0)
    row[5] = 2.0
    out = _adjusted(row, _request([5], [], logit_bias={5: 1.0}, repetition_penalty=1.5))
    assert out[5] == pytest.approx(2.0)
    everything = _request([1], [], min_tokens=2, stop_token_ids=list(range(V)))
    greedy = _request([1], [])
    got = sample(torch.stack([row, row]), [everything, greedy], [frozenset()] * 2)
    assert isinstance(got[0], SamplingFailure) and "banned" in got[0] and got[1] == 5


@settings(max_examples=150, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "prompt": st.lists(st.integers(0, V - 1), min_size=1, max_size=8),
    "output": st.lists(st.integers(0, V - 1), max_size=8),
    "sp": st.fixed_dictionaries({}, optional={
        "repetition_penalty": st.sampled_from([0.5, 1.0, 1.7]),
        "presence_penalty": st.sampled_from([0.0, -1.0, 0.6]),
        "frequency_penalty": st.sampled_from([0.0, 1.5, -0.4]),
        "logit_bias": st.dictionaries(st.integers(0, V - 1), st.sampled_from([-100.0, 2.5]),
                                      max_size=3),
        "min_tokens": st.integers(0, 4),
        "allowed_token_ids": st.lists(st.integers(0, V - 1), min_size=1, max_size=4),
        "bad_words_token_ids": st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=3),
                                        min_size=1, max_size=3),
        "stop_token_ids": st.lists(st.integers(0, V - 1), max_size=2),
        "ignore_eos": st.booleans()}),
    "eos": st.frozensets(st.integers(0, V - 1), max_size=2)}), min_size=1, max_size=6),
    st.integers(0, 2**31))  # fmt: skip
def test_batched_adjustments_equal_one_row_at_a_time(rows, seed):
    """The sampler's adjust_rows (every row at once) against adjust_logits row by row, for any
    mix of penalties, biases, min_tokens bans and EOS sets."""
    reqs = [_request(r["prompt"], r["output"], **r["sp"]) for r in rows]
    eos = [r["eos"] for r in rows]
    logits = torch.randn(len(rows), V, generator=torch.Generator().manual_seed(seed)) * 3
    batched = logits.clone()
    adjust_rows(batched, reqs, eos)
    for k, req in enumerate(reqs):
        torch.testing.assert_close(batched[k], _adjusted(logits[k], req, eos[k]), rtol=0,
                                   atol=1e-6)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 6), max_size=8),
    st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=3), min_size=1, max_size=4),
)
def test_bad_words_ban_a_words_last_token_after_the_rest(output, words):
    """bad_words (vLLM's definition, written out over strings of token ids): a token is banned
    exactly when appending it would make the answer end with a whole bad word."""
    row = _adjusted(torch.zeros(V), _request([1], output, bad_words_token_ids=words))
    for t in range(V):
        ends = any((output + [t])[-len(w) :] == w for w in words if len(w) <= len(output) + 1)
        assert bool(row[t] == float("-inf")) == ends, (t, output, words)


def test_bad_words_are_tokenized_at_the_start_and_after_a_space(llama, solo):  # noqa: F811
    """Through the engine (greedy): a two-token word made of the base's first two answer tokens
    takes the second away after the first and nowhere else; a word given as text is banned as
    its token ids from the tokenizer (with and without a leading space)."""
    from expertswitch.engine.tokenizer import bad_word_ids

    base, _ = llama
    ps, _ = solo
    eng = Engine(base, {})
    free = eng.generate(ps[1], None, SamplingParams(temperature=0.0, max_tokens=6))[0]
    a, b = free.token_ids[:2]
    sp = SamplingParams(temperature=0.0, max_tokens=6, bad_words_token_ids=[[a, b]])
    out = eng.generate(ps[1], None, sp)[0].token_ids
    assert out[0] == a and out[1] != b
    assert all((x, y) != (a, b) for x, y in zip(out, out[1:]))
    with pytest.raises(ConfigError, match="bad_words need a tokenizer"):
        eng.add_request(ps[0], None, SamplingParams(bad_words=["x"]))
    with pytest.raises(ConfigError, match="bad_words_token_ids names token id 1000000"):
        eng.add_request(ps[0], None, SamplingParams(bad_words_token_ids=[[10**6]]))

    class Words:  # a tokenizer that spells "cat" as [7, 8] and " cat" as [9, 8]
        def encode(self, text, add_special_tokens=True):
            assert not add_special_tokens
            return {"cat": [7, 8], " cat": [9, 8], "dog": [3], " dog": [3]}[text]

    assert bad_word_ids(Words(), ["cat", " dog"]) == [[7, 8], [9, 8], [3]]


def test_expert_batch_ranges_follow_sorted_slots():
    from expertswitch.models.context import ExpertBatch

    eb = ExpertBatch.from_host([object()] * 3, [-1, -1, 0, 2, 2, 2], "cpu")
    assert eb.ranges == [(2, 3), (3, 3), (3, 6)]
    assert ExpertBatch.from_host([object()] * 2, [1, 0], "cpu").ranges is None


@pytest.mark.parametrize("bad", [
    {"presence_penalty": 2.5}, {"frequency_penalty": float("nan")}, {"repetition_penalty": 0},
    {"repetition_penalty": True}, {"min_p": 1.5}, {"min_tokens": -1}, {"min_tokens": 40},
    {"logit_bias": {-1: 1.0}}, {"logit_bias": {3: 101}}, {"logit_bias": {"3": 1.0}},
    {"allowed_token_ids": []}, {"allowed_token_ids": [-1]}, {"allowed_token_ids": "3"},
    {"allowed_token_ids": [1.0]}, {"bad_words": "x"}, {"bad_words": [""]}, {"bad_words": [3]},
    {"bad_words_token_ids": [[]]}, {"bad_words_token_ids": [3]}, {"bad_words_token_ids": [[-1]]},
])  # fmt: skip
def test_bad_adjustments_are_refused(bad):
    with pytest.raises(ConfigError):
        SamplingParams(max_tokens=32, **bad)


def test_engine_applies_bias_and_min_tokens(llama, solo):  # noqa: F811
    """Greedy decoding: a +100 bias makes one token every token; EOS biased to win is held
    back for min_tokens tokens and then ends the request; a bias outside the vocabulary is
    refused when the request is made."""
    base, experts = llama
    ps, ref = solo
    eng = Engine(base, {"e0": experts[0][0]})
    out = eng.generate(ps[0], "e0", SamplingParams(temperature=0.0, max_tokens=6,
                                                   logit_bias={77: 100.0}))[0]  # fmt: skip
    assert out.token_ids == [77] * 6
    eos = 2  # tiny_config's eos_token_id
    sp = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0}, min_tokens=4,
                        logprobs=0)  # fmt: skip
    out = eng.generate(ps[1], None, sp)[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]
    assert out.finish_reason == "stop"
    # the first four are the base's own greedy choices with EOS out of the running
    banned = SamplingParams(temperature=0.0, max_tokens=4, logit_bias={eos: -100.0})
    assert out.token_ids[:4] == eng.generate(ps[1], None, banned)[0].token_ids
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        eng.add_request(ps[0], "e0", SamplingParams(logit_bias={10**6: 1.0}))
    # allowed_token_ids: the 2nd and 3rd most likely first tokens allowed → the 2nd is chosen,
    # and every later token is one of them
    free = eng.generate(ps[1], "e0", SamplingParams(temperature=0.0, max_tokens=1,
                                                    logprobs=3))[0]  # fmt: skip
    second, third = (t for t, _ in free.logprobs[0].top[1:3])
    sp = SamplingParams(temperature=0.0, max_tokens=6, allowed_token_ids=[third, second])
    out = eng.generate(ps[1], "e0", sp)[0]
    assert out.token_ids[0] == second and set(out.token_ids) <= {second, third}
    with pytest.raises(ConfigError, match="allowed_token_ids names token id 1000000, outside"):
        eng.add_request(ps[0], "e0", SamplingParams(allowed_token_ids=[5, 10**6]))
