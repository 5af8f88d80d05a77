"""Text generation: sampling parameters, logits processing against hand computations, sampling,
incremental detokenization and stop strings, and single-sequence generate/stream on a tiny GPT."""

from __future__ import annotations

import math

import pytest
import torch

from shipyard.data.tokenization import Tokenizer
from shipyard.errors import GenerationError, ShipyardError
from shipyard.generate import (
    IncrementalDetokenizer,
    SamplingBatch,
    SamplingParams,
    TokenHistory,
    choose_tokens,
    generate,
    process_logits,
    sample,
    sample_from_uniform,
    stream,
    token_logprobs,
)
from shipyard.generate.sequence import SequenceState
from shipyard.models.gpt import GPT, GPTConfig

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)
TOK = Tokenizer.byte()
pytestmark = pytest.mark.usefixtures("one_thread")
NEG_INF = float("-inf")


def tiny_gpt(seed: int = 0, **overrides: object) -> GPT:
    """Random-init tiny GPT over the byte vocabulary."""
    torch.manual_seed(seed)
    return GPT(TINY.model_copy(update=overrides), TOK.vocab_size).eval()


def byte_ids(text: str) -> list[int]:
    return TOK.encode(text)


# --- parameters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"seed": "x"}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop_on_eos": "yes"}, "stop_on_eos"),
    ],
)
def test_bad_params_name_the_parameter(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(GenerationError, match=name) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ShipyardError)


def test_params_normalise_stop_and_logprobs() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams().top_logprobs is None
    assert SamplingParams(logprobs=False).top_logprobs is None
    assert SamplingParams(logprobs=True).top_logprobs == 0
    assert SamplingParams(logprobs=3).top_logprobs == 3
    assert SamplingParams(temperature=0).greedy


# --- logits processing, by hand -------------------------------------------------------------


def history(prompt: list[int], output: list[int], vocab: int = 4) -> TokenHistory:
    return TokenHistory.from_ids([prompt], [output], vocab)


def test_repetition_penalty_divides_positive_multiplies_negative() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = process_logits(logits, SamplingParams(repetition_penalty=2.0), history([0], [1]))
    torch.testing.assert_close(out, torch.tensor([1.0, -4.0, 1.0, 0.5]))


def test_presence_and_frequency_penalties_count_generated_tokens_only() -> None:
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    # token 0 only in the prompt: untouched; token 1 generated twice, token 2 once.
    out = process_logits(logits, params, history([0, 0], [1, 2, 1]))
    torch.testing.assert_close(out, torch.tensor([1.0, 1 - 0.5 - 0.5, 1 - 0.5 - 0.25, 1.0]))


def test_penalties_need_history() -> None:
    with pytest.raises(GenerationError, match="history"):
        process_logits(torch.zeros(4), SamplingParams(presence_penalty=1.0))


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5])
    out = process_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(out, torch.tensor([4.0, -2.0, 1.0]))


def test_top_k_keeps_the_k_largest_and_ties() -> None:
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0, 2.0])
    out = process_logits(logits, SamplingParams(top_k=2))
    # 3.0 and 2.0 are the two largest; the other 2.0 ties with the 2nd and stays (as HF).
    torch.testing.assert_close(out, torch.tensor([NEG_INF, 3.0, 2.0, NEG_INF, 2.0]))
    out = process_logits(torch.tensor([0.1, 3.0, 2.0, -1.0]), SamplingParams(top_k=1))
    torch.testing.assert_close(out, torch.tensor([NEG_INF, 3.0, NEG_INF, NEG_INF]))


@pytest.mark.parametrize(("top_p", "kept"), [(0.4, 1), (0.75, 2), (0.85, 3), (0.99, 4)])
def test_top_p_keeps_smallest_set_reaching_p(top_p: float, kept: int) -> None:
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    out = process_logits(probs.log(), SamplingParams(top_p=top_p))
    order = [1, 3, 0, 2]
    assert torch.isfinite(out[order[:kept]]).all()
    assert torch.isinf(out[order[kept:]]).all()


def test_top_k_then_top_p_renormalises() -> None:
    # top_k=2 leaves 0.5 and 0.3 -> renormalised 0.625, 0.375; top_p=0.6 then keeps only one.
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])
    out = process_logits(probs.log(), SamplingParams(top_k=2, top_p=0.6))
    assert torch.isfinite(out).tolist() == [False, True, False, False]


def test_batch_rows_use_their_own_params() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 10)
    params = [
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(top_p=0.5, repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.4),
    ]
    prompts, outputs = [[1, 2], [3], [4, 4]], [[5], [6, 6], [7, 7, 7]]
    batched = process_logits(logits, params, TokenHistory.from_ids(prompts, outputs, 10))
    for b in range(3):
        alone = process_logits(logits[b], params[b], history(prompts[b], outputs[b], 10))
        torch.testing.assert_close(batched[b], alone)


def test_a_batch_builds_only_the_tensors_its_rows_need() -> None:
    greedy = SamplingBatch.from_params([SamplingParams(temperature=0)] * 3, 10)
    logits = torch.randn(3, 10)
    assert torch.equal(process_logits(logits, greedy), logits)
    tokens, _ = choose_tokens(logits, greedy, None, [None] * 3, [0, 0, 0])
    assert tokens == logits.argmax(-1).tolist()
    lazy = ("temperature", "greedy", "top_k", "top_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty")  # fmt: skip
    assert not set(lazy) & set(vars(greedy))  # an all-greedy batch made no tensor at all
    mixed = SamplingBatch.from_params(
        [SamplingParams(temperature=0), SamplingParams(temperature=0.5, top_k=3)], 10
    )
    assert mixed.any_temperature and mixed.any_top_k and not mixed.any_top_p
    assert mixed.temperature.view(-1).tolist() == [1.0, 0.5]  # greedy rows divide by 1
    assert mixed.top_k.view(-1).tolist() == [10, 3] and mixed.greedy.tolist() == [True, False]
    plain = SamplingBatch.from_params([SamplingParams(temperature=1.0, top_k=50)], 10)
    assert not plain.any_temperature and not plain.any_top_k  # 1 and k >= V change nothing


# --- sampling -------------------------------------------------------------------------------


def test_inverse_cdf_sampling_by_hand() -> None:
    logits = torch.tensor([0.1, 0.2, 0.7]).log().expand(5, 3)
    uniform = torch.tensor([0.0, 0.05, 0.15, 0.31, 0.999])
    assert sample_from_uniform(logits, uniform).tolist() == [0, 0, 1, 2, 2]
    masked = torch.tensor([[NEG_INF, 0.0, 0.0]])  # token 0 has probability 0
    assert sample_from_uniform(masked, torch.tensor([0.0])).tolist() == [1]


def test_sampling_frequencies_match_probabilities() -> None:
    probs = torch.tensor([0.1, 0.2, 0.7])
    g = torch.Generator().manual_seed(0)
    draws = sample_from_uniform(probs.log().expand(20000, 3), torch.rand(20000, generator=g))
    freq = torch.bincount(draws, minlength=3).float() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_temperature_zero_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    params = SamplingParams(temperature=0)
    processed = process_logits(logits, params)
    assert sample(processed, params, [None] * 4).tolist() == logits.argmax(-1).tolist()


def test_sample_uses_each_rows_generator() -> None:
    logits = torch.zeros(2, 100)
    params = SamplingParams()
    a = sample(logits, params, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = sample(logits, params, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(2)])
    assert a[1] == b[1]  # same generator state, same draw, whatever the other row does
    assert a[0] != b[0]


def test_token_logprobs_by_hand() -> None:
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    chosen, values, ids = token_logprobs(logits, torch.tensor([1]), top_n=2)
    torch.testing.assert_close(chosen, torch.tensor([math.log(0.3)]))
    torch.testing.assert_close(values, torch.tensor([[math.log(0.5), math.log(0.3)]]))
    assert ids.tolist() == [[0, 1]]


# --- detokenization and stop strings (no model) -----------------------------------------------


def test_incremental_detokenizer_waits_for_whole_characters() -> None:
    detok = IncrementalDetokenizer(TOK)
    ids = byte_ids("a日é")  # 1 + 3 + 2 bytes
    deltas = [detok.push(i) for i in ids]
    assert deltas == ["a", "", "", "日", "", "é"]
    assert detok.flush() == ""
    detok.push(byte_ids("日")[0])  # an incomplete character at the end becomes U+FFFD
    assert detok.flush() == "\ufffd"


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_detokenizer_deltas_concatenate_to_decode(kind: str) -> None:
    text = "héllo wörld 日本語, and more 日本"
    tok = TOK if kind == "byte" else Tokenizer.train_bpe([text] * 20, vocab_size=300)
    torch.manual_seed(0)
    random_ids = torch.randint(0, tok.vocab_size, (200,)).tolist()  # invalid UTF-8 too
    for ids in (tok.encode(text), random_ids):
        detok = IncrementalDetokenizer(tok)
        deltas = [detok.push(i) for i in ids]
        assert "".join(deltas) + detok.flush() == tok.decode(ids)
        if ids != random_ids:
            assert "\ufffd" not in "".join(deltas)


def feed(text: str, params: SamplingParams) -> tuple[list[str], SequenceState]:
    state = SequenceState("r", [2], params, TOK)
    deltas = []
    for i in byte_ids(text):
        event = state.add_token(i)
        deltas.append(event.text)
        if event.finish_reason:
            break
    return deltas, state


def test_stop_string_is_cut_and_never_streamed() -> None:
    deltas, state = feed("hello world. more", SamplingParams(max_tokens=50, stop=["wor", "."]))
    result = state.result()
    assert result.text == "hello " and "".join(deltas) == "hello "
    assert result.finish_reason == "stop"
    assert result.completion_tokens == len("hello wor")  # tokens up to the completed stop string
    # "w" and "wo" were held back (they could have begun "wor").
    assert deltas[6:] == ["", "", ""]


def test_held_back_prefix_is_released_when_it_does_not_match() -> None:
    deltas, state = feed("a wox", SamplingParams(max_tokens=5, stop=["world"]))
    assert deltas == ["a", " ", "", "", "wox"]
    assert state.result().text == "a wox" and state.finish_reason == "length"


def test_stop_string_spanning_multibyte_characters() -> None:
    deltas, state = feed("ab日本cd", SamplingParams(max_tokens=50, stop=["本c"]))
    assert state.result().text == "ab日" == "".join(deltas)


def test_eos_finishes_and_is_not_text() -> None:
    state = SequenceState("r", [2], SamplingParams(max_tokens=5), TOK)
    state.add_token(byte_ids("x")[0])
    event = state.add_token(TOK.eos_id)
    assert event.finish_reason == "stop" and event.result is not None
    assert event.result.text == "x" and event.result.token_ids == [byte_ids("x")[0], TOK.eos_id]


# --- single-sequence generation on a tiny GPT ---------------------------------------------------


def test_greedy_matches_argmax_of_full_forward() -> None:
    model = tiny_gpt()
    prompt = byte_ids("Hello")
    result = generate(model, TOK, prompt, SamplingParams(max_tokens=8, temperature=0))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert result.token_ids == ids[len(prompt) :]
    assert result.finish_reason == "length"
    assert (result.prompt_tokens, result.completion_tokens) == (5, 8)
    assert result.time_to_first_token_s is not None
    assert 0 < result.time_to_first_token_s <= result.total_s


def test_logprobs_are_the_models() -> None:
    model = tiny_gpt()
    result = generate(model, TOK, "Hi", SamplingParams(max_tokens=4, seed=0, logprobs=3))
    assert result.logprobs is not None and len(result.logprobs) == 4
    with torch.no_grad():
        full = model(torch.tensor([byte_ids("Hi") + result.token_ids]))[0]  # (T, V)
    ref = torch.log_softmax(full[1:-1], dim=-1)  # predictions for each generated token
    for t, lp in enumerate(result.logprobs):
        assert lp.token_id == result.token_ids[t]
        assert abs(lp.logprob - ref[t, lp.token_id].item()) < 1e-4
        top_ids = ref[t].topk(3).indices.tolist()
        assert [i for i, _ in lp.top] == top_ids
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_seed_reproducible_and_seeds_differ() -> None:
    model = tiny_gpt()
    a = generate(model, TOK, "x", SamplingParams(max_tokens=20, seed=1, stop_on_eos=False))
    b = generate(model, TOK, "x", SamplingParams(max_tokens=20, seed=1, stop_on_eos=False))
    c = generate(model, TOK, "x", SamplingParams(max_tokens=20, seed=2, stop_on_eos=False))
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_stream_deltas_concatenate_to_generated_text() -> None:
    model = tiny_gpt()
    params = SamplingParams(max_tokens=30, seed=3, stop_on_eos=False)
    events = list(stream(model, TOK, "abc", params))
    result = generate(model, TOK, "abc", params)
    assert "".join(e.text for e in events) == result.text
    assert [e.token_id for e in events] == result.token_ids
    assert [e.index for e in events] == list(range(30))
    assert all(e.finish_reason is None for e in events[:-1])
    assert events[-1].finish_reason == "length" and events[-1].result is not None
    # Random bytes: the only U+FFFD allowed are complete invalid sequences, never a split char.
    assert "".join(e.text for e in events) == events[-1].result.text


def test_stop_string_on_real_generation() -> None:
    model = tiny_gpt()
    params = SamplingParams(max_tokens=30, seed=5, stop_on_eos=False)
    full = generate(model, TOK, "abc", params)
    stop = full.text[10:12]
    cut = full.text.find(stop)
    stopped = generate(
        model, TOK, "abc", SamplingParams(max_tokens=30, seed=5, stop_on_eos=False, stop=[stop])
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    assert stopped.token_ids == full.token_ids[: stopped.completion_tokens]


def eos_model() -> GPT:
    """A GPT that always predicts end-of-text (every other row of the LM head is zero)."""
    model = tiny_gpt(tie_weights=False)
    with torch.no_grad():
        head = model.lm_head.weight
        head[:] = 0
        head[TOK.eos_id] = 1.0
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.fill_(1.0)  # every hidden unit ~1 -> eos logit ~32
    return model


def test_eos_stops_unless_told_otherwise() -> None:
    model = eos_model()
    result = generate(model, TOK, "abc", SamplingParams(max_tokens=5, temperature=0))
    assert (result.finish_reason, result.text, result.token_ids) == ("stop", "", [TOK.eos_id])
    result = generate(
        model, TOK, "abc", SamplingParams(max_tokens=5, temperature=0, stop_on_eos=False)
    )
    assert result.finish_reason == "length" and result.token_ids == [TOK.eos_id] * 5


def test_context_overflow_is_a_generation_error() -> None:
    model = tiny_gpt()
    with pytest.raises(GenerationError, match=r"prompt \(60 tokens\) \+ max_tokens \(5\)"):
        generate(model, TOK, "a" * 60, SamplingParams(max_tokens=5))
    with pytest.raises(GenerationError, match="context of 64 tokens"):
        stream(model, TOK, "a" * 60, SamplingParams(max_tokens=5))  # raised before iterating
    with pytest.raises(GenerationError, match="token ids"):
        generate(model, TOK, [1, 999])


def test_empty_prompt_starts_a_document() -> None:
    result = generate(tiny_gpt(), TOK, "", SamplingParams(max_tokens=3))
    assert result.prompt_tokens == 1 and result.completion_tokens <= 3
