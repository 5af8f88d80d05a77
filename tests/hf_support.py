"""Tiny Hugging Face checkpoints built locally with `tokenizers` and `transformers` (no download).

Tokenizers are trained in a blink on a few sentences; their special tokens sit both at the start
of the vocabulary (trainer specials) and at its end (added after training), as in real
checkpoints. The chat templates are shaped like the real ones (Llama-3, Qwen2.5 ChatML, Mistral,
Phi-3): same control flow, special tokens and helper calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = [
    "Hello there! How are you doing today?",
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer briefly.",
    "def main():\n    print('hello world')\n",
    "Bonjour, ça va ? Très bien, merci. 日本語のテキスト 🚀",
] * 4

LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if strftime_now is defined %}{%- set today = strftime_now('%d %b %Y') %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '{{- "Cutting Knowledge Date: December 2023\\n\\n" }}\n'
    '{{- system_message }}\n{{- "<|eot_id|>" }}\n'
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

QWEN_TEMPLATE = (
    "{%- set ns = namespace(seen_system=false) %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' %}{%- set ns.seen_system = true %}{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if tools %}\n"
    "    {%- for tool in tools %}{{- tool | tojson }}{%- endfor %}\n"
    "{%- endif %}\n"
    "{%- if not ns.seen_system %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}{% continue %}{% endif %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _byte_level(head: list[str], tail: list[str], vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=head,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(tail)
    return tok


def _metaspace(head: list[str], tail: list[str], vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=head, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens(tail)
    return tok


FAMILY_TOKENIZERS: dict[str, dict[str, Any]] = {
    # Llama-3: BOS added by tokenizer.json's post-processor; several EOS ids
    "llama": {
        "template": LLAMA3_TEMPLATE,
        "bos": "<|begin_of_text|>",
        "eos": "<|eot_id|>",
        "extra_eos": "<|end_of_text|>",
        "head": ["<|begin_of_text|>", "<|end_of_text|>"],
        "tail": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "post": "bos",
    },
    # Qwen2.5: ChatML specials at the end of the vocabulary, no BOS, pad = <|endoftext|>
    "qwen2": {
        "template": QWEN_TEMPLATE,
        "bos": None,
        "eos": "<|im_end|>",
        "extra_eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "head": [],
        "tail": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    },
    # Mistral: SentencePiece-like (Metaspace), add_bos_token in tokenizer_config.json
    "mistral": {
        "template": MISTRAL_TEMPLATE,
        "bos": "<s>",
        "eos": "</s>",
        "unk": "<unk>",
        "head": ["<unk>", "<s>", "</s>"],
        "tail": ["[INST]", "[/INST]"],
        "add_bos_token": True,
        "metaspace": True,
    },
    # Phi-3: <|end|> ends a turn (generation_config lists it with </s>)
    "phi3": {
        "template": PHI3_TEMPLATE,
        "bos": "<s>",
        "eos": "<|end|>",
        "extra_eos": "</s>",
        "unk": "<unk>",
        "head": ["<unk>", "<s>", "</s>"],
        "tail": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "add_bos_token": False,
        "metaspace": True,
    },
}
FAMILY_TOKENIZERS["qwen3"] = FAMILY_TOKENIZERS["qwen2"]


def hf_tokenizer(family: str, out: Path, *, vocab_size: int | None = None) -> Any:
    """Save a transformers fast tokenizer shaped like `family`'s to `out`; return it."""
    from transformers import PreTrainedTokenizerFast

    spec = FAMILY_TOKENIZERS[family]
    build = _metaspace if spec.get("metaspace") else _byte_level
    backend = build(list(spec["head"]), list(spec["tail"]), vocab_size or 400)
    if spec.get("post") == "bos":
        bos = spec["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, backend.token_to_id(bos))],
        )
    kwargs: dict[str, Any] = {
        "eos_token": spec["eos"],
        "chat_template": spec["template"],
        "model_max_length": 128,
    }
    for key in ("bos", "pad", "unk"):
        if spec.get(key):
            kwargs[f"{key}_token"] = spec[key]
    if "add_bos_token" in spec:
        kwargs["add_bos_token"] = spec["add_bos_token"]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tok.save_pretrained(str(out))
    return tok


def eos_ids(family: str, tok: Any) -> list[int]:
    """The generation_config eos_token_id list for `family` (EOS first, then the extra one)."""
    spec = FAMILY_TOKENIZERS[family]
    ids = [tok.convert_tokens_to_ids(spec["eos"])]
    if spec.get("extra_eos"):
        ids.append(tok.convert_tokens_to_ids(spec["extra_eos"]))
    return ids


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


MESSAGES: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello there!"}],
    [
        {"role": "system", "content": "You are a helpful assistant. "},
        {"role": "user", "content": "How are you doing today?"},
        {"role": "assistant", "content": "Très bien, merci."},
        {"role": "user", "content": "日本語 🚀 <b>bold</b> & def main():"},
    ],
]
