"""Chat templates and imported Hugging Face tokenizers, against `transformers` as the reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.hf_support import MESSAGES, eos_ids, hf_tokenizer

from shipyard.data import ChatTemplate, ChatTemplateError, HFTokenizerConfig, Tokenizer
from shipyard.data.chat import FALLBACK_STOPS, select_template
from shipyard.errors import DataError

transformers = pytest.importorskip("transformers")

FAMILIES = ("llama", "qwen2", "mistral", "phi3")


def _reference_ids(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("hf-tokenizers")
    return {f: (root / f, hf_tokenizer(f, root / f)) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", range(len(MESSAGES)))
def test_prompt_ids_equal_transformers_apply_chat_template(
    saved: dict[str, tuple[Path, Any]], family: str, case: int
) -> None:
    path, ref = saved[family]
    messages = MESSAGES[case]
    if family == "mistral":  # its template allows user/assistant turns only
        messages = [m for m in messages if m["role"] != "system"]
    tok = Tokenizer.from_hf_dir(path, generation_config={"eos_token_id": eos_ids(family, ref)})
    assert tok.kind == "hf" and tok.chat_template is not None
    assert tok.apply_chat_template(messages) == _reference_ids(ref, messages)
    assert tok.chat_prompt_ids(messages) == _reference_ids(ref, messages)
    assert tok.chat_stops == ()  # the end-of-turn token is an EOS id instead


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_prompts_get_bos_as_transformers_and_eos_is_a_list(
    saved: dict[str, tuple[Path, Any]], family: str
) -> None:
    path, ref = saved[family]
    tok = Tokenizer.from_hf_dir(path, generation_config={"eos_token_id": eos_ids(family, ref)})
    for text in ("Hello there", "The quick brown fox", "日本語 🚀"):
        assert tok.encode_prompt(text) == ref(text)["input_ids"]
        assert tok.decode(tok.encode(text)) == ref.decode(
            ref(text, add_special_tokens=False)["input_ids"]
        )
    assert tok.eos_ids == tuple(eos_ids(family, ref))
    assert tok.eos_id == ref.eos_token_id
    assert tok.bos_id == ref.bos_token_id
    assert tok.vocab_size == len(ref)


def test_special_token_text_in_a_raw_prompt_stays_text(saved: dict[str, tuple[Path, Any]]) -> None:
    path, _ = saved["qwen2"]
    tok = Tokenizer.from_hf_dir(path)
    im_end = tok.eos_id
    assert im_end not in tok.encode_prompt("a <|im_end|> b")  # cannot inject an end of turn
    assert tok.decode(tok.encode_prompt("a <|im_end|> b")) == "a <|im_end|> b"


@pytest.mark.parametrize(("add_bos", "add_eos"), [(False, False), (True, True), (False, True)])
def test_explicit_add_bos_token_replaces_the_post_processor(
    tmp_path: Path, add_bos: bool, add_eos: bool
) -> None:
    hf_tokenizer("llama", tmp_path)  # tokenizer.json's post-processor adds <|begin_of_text|>
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=add_bos, add_eos_token=add_eos)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    # transformers applies explicit add_bos/add_eos_token when they are constructor arguments
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"),
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode_prompt("Hello there") == ref("Hello there")["input_ids"]
    assert (tok.encode_prompt("Hello there")[0] == tok.bos_id) is add_bos
    assert (tok.encode_prompt("Hello there")[-1] == tok.eos_id) is add_eos


def test_template_from_a_named_list_and_chat_template_jinja_wins(tmp_path: Path) -> None:
    hf_tokenizer("qwen2", tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}[{{ m.content }}]{% endfor %}"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "Hello"}]
    assert tok.apply_chat_template(messages) == _reference_ids(ref, messages)
    (tmp_path / "chat_template.jinja").write_text("<{{ messages[0].content }}>")
    assert (
        Tokenizer.from_hf_dir(tmp_path).decode(
            Tokenizer.from_hf_dir(tmp_path).apply_chat_template(messages)
        )
        == "<Hello>"
    )


def test_template_helpers_match_transformers_rendering() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    source = (
        "{% for m in messages %}{% if loop.index0 > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}|{{ m.content | tojson(indent=1) }}|{{ dict(a=1) | tojson }}{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}GEN{% endif %}"
    )
    messages = [
        {"role": "user", "content": "<b>é & 日本</b>"},
        {"role": "assistant", "content": "x"},
        {"role": "user", "content": "never rendered"},
    ]
    want = render_jinja_template(
        [messages], chat_template=source, add_generation_prompt=True, bos_token="<s>"
    )[0][0]
    got = ChatTemplate(source, {"bos_token": "<s>"}).render(messages, add_generation_prompt=True)
    assert got == want and "never rendered" not in got and "<b>é" in got


def test_raise_exception_and_sandbox_escapes_are_errors(saved: dict[str, tuple[Path, Any]]) -> None:
    path, _ = saved["mistral"]
    tok = Tokenizer.from_hf_dir(path)
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    escapes = [
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace(_x=1) %}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    ]
    for source in escapes:
        with pytest.raises(ChatTemplateError):
            ChatTemplate(source).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_bad_template_values_and_tokenizer_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match="none is named 'default'"):
        select_template([{"name": "tool_use", "template": "x"}], "tokenizer_config.json")
    with pytest.raises(ChatTemplateError, match="must be a string or a list"):
        select_template(42, "tokenizer_config.json")
    assert select_template(None, "x") is None
    with pytest.raises(DataError, match=r"no tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)
    hf_tokenizer("qwen2", tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["bos_token"] = "<|not-in-vocab|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"'<\|not-in-vocab\|>' is not in tokenizer\.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_hf_tokenizer_config_round_trips_and_rebuilds_the_same_tokenizer(
    saved: dict[str, tuple[Path, Any]],
) -> None:
    path, ref = saved["llama"]
    tok = Tokenizer.from_hf_dir(path, generation_config={"eos_token_id": eos_ids("llama", ref)})
    assert tok.hf is not None and tok.config_json() is not None
    again = Tokenizer.from_json(
        tok.to_json(), HFTokenizerConfig.from_dict(json.loads(tok.config_json() or ""))
    )
    assert again == tok and again.eos_ids == tok.eos_ids
    assert tok.to_json() == (path / "tokenizer.json").read_text()  # kept exactly as read
    with pytest.raises(DataError, match="unknown key 'chat'"):
        HFTokenizerConfig.from_dict({"chat": "x"})


def test_models_without_a_template_keep_the_fallback_format() -> None:
    tok = Tokenizer.byte()
    ids = tok.chat_prompt_ids([{"role": "user", "content": "hi"}])
    assert tok.decode(ids) == "<|user|>\nhi\n<|assistant|>\n"
    assert tok.chat_stops == FALLBACK_STOPS and tok.eos_ids == (1,)
    with pytest.raises(DataError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_every_eos_id_ends_generation(saved: dict[str, tuple[Path, Any]]) -> None:
    from shipyard.generate import SamplingParams
    from shipyard.generate.sequence import SequenceState

    path, ref = saved["qwen2"]
    tok = Tokenizer.from_hf_dir(path, generation_config={"eos_token_id": eos_ids("qwen2", ref)})
    hello = tok.encode("Hello")
    for eos in tok.eos_ids:
        state = SequenceState("r", [1, 2], SamplingParams(max_tokens=8), tok)
        events = [state.add_token(t) for t in (*hello, eos)]
        assert events[-1].finish_reason == "stop" and state.finished
        assert "".join(e.text for e in events) == "Hello"
    state = SequenceState("r", [1, 2], SamplingParams(max_tokens=8, stop_on_eos=False), tok)
    assert state.add_token(tok.eos_ids[1]).finish_reason is None
