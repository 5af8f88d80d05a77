"""Chat templates: a model's own Jinja template, rendered in a sandbox the way `transformers` does.

Hugging Face checkpoints ship their prompt format as a Jinja template (`chat_template.jinja`, or
`chat_template` in tokenizer_config.json: a string, or a list of {"name", "template"} with a
"default"). Templates come from the internet, so they run in Jinja's
`ImmutableSandboxedEnvironment` (no attribute access to Python internals, no mutation of the
messages) with the same options and helpers as `transformers.apply_chat_template`: `trim_blocks`,
`lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not escape
HTML, and the special tokens (`bos_token`, `eos_token`, ...) as variables. So the prompt text, and
after tokenization the prompt ids, equal what `transformers` produces for the same messages.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shipyard.errors import DataError

DEFAULT_TEMPLATE_NAME = "default"

# Models without a template of their own (trained by shipyard, base checkpoints): one block per
# message, then the assistant header; generation stops where the model starts a new block.
FALLBACK_TEMPLATE = "<|{role}|>\n{content}\n"
FALLBACK_STOPS = (
    "\n<|system|>",
    "\n<|user|>",
    "\n<|assistant|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)


def fallback_prompt(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text of `messages` ({role, content}) in shipyard's fallback chat format."""
    parts = [FALLBACK_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages]
    return "".join(parts) + "<|assistant|>\n"


class ChatTemplateError(DataError):
    """A chat template failed to compile, raised an error (`raise_exception`) or escaped the
    sandbox; the message is the template's own."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters (< > &), which would change the prompt
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names (no reaching into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace ({name!r})"
            )


def _template_dict(*args: Any, **kwargs: Any) -> dict[Any, Any]:
    return dict(*args, **kwargs)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _template_dict
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


def select_template(value: Any, where: str) -> str | None:
    """The template text from a tokenizer_config.json `chat_template` value: a string, or a list
    of {"name", "template"} (the one named "default" is used); None when there is none."""
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in value
    ):
        named = {t["name"]: t["template"] for t in value}
        if DEFAULT_TEMPLATE_NAME not in named:
            raise ChatTemplateError(
                f"{where}: chat_template lists templates {sorted(named)} but none is named "
                f"{DEFAULT_TEMPLATE_NAME!r}; rename the one to use for chat to 'default'"
            )
        return named[DEFAULT_TEMPLATE_NAME]
    raise ChatTemplateError(
        f"{where}: chat_template must be a string or a list of {{name, template}} objects, "
        f"got {type(value).__name__}"
    )


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _compile(source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (keys whose value is None are dropped, as transformers
        does); extra `kwargs` (e.g. enable_thinking=False) are template variables."""
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from None

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ChatTemplate)
            and self.source == other.source
            and self.special_tokens == other.special_tokens
        )

    def __hash__(self) -> int:
        return hash(self.source)


__all__ = [
    "FALLBACK_STOPS",
    "FALLBACK_TEMPLATE",
    "ChatTemplate",
    "ChatTemplateError",
    "fallback_prompt",
    "select_template",
]
