"""`shipyard generate`: complete a prompt with a language-model package, streaming the text."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from shipyard.package import LoadedModel


def generate(
    package: str = typer.Argument(
        ..., help="Package directory, or a registry ref (NAME, NAME:VERSION, NAME@ALIAS)."
    ),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(1.0, "--temperature", "-t", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    top_k: int | None = typer.Option(None, "--top-k", help="Keep the k most likely tokens."),
    repetition_penalty: float = typer.Option(
        1.0, "--repetition-penalty", help="Penalise tokens already seen (1 = off)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Same seed, same text."),
    stop: list[str] = typer.Option([], "--stop", help="Stop at this string (repeatable)."),
    ignore_eos: bool = typer.Option(
        False, "--ignore-eos", help="Keep going past the end-of-text token."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print the result as JSON (text, token counts, timings)."
    ),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="The prompt is a user message: format it with the model's own chat template "
        "(shipyard's fallback chat format for models without one).",
    ),
    system: str | None = typer.Option(
        None, "--system", help="With --chat: a system message before the user message."
    ),
    decode_weights: str = typer.Option(
        "auto",
        "--decode-weights",
        help="auto (the package's weights), int8 (quantize to int8 for decoding) or fp32.",
    ),
    kv_cache: str = typer.Option(
        "auto",
        "--kv-cache",
        help="What the KV cache stores: auto (fp16 with int8 weights, else the model's), "
        "fp32 or fp16.",
    ),
) -> None:
    """Generate text from a language-model package; tokens are printed as they come.

    Example: shipyard generate runs/gpt-tiny/package --prompt "def main(" --max-tokens 80 --seed 0

    Faster on CPU with int8 weights: add --decode-weights int8 (a `shipyard compress --quantize
    weight-int8` package decodes with int8 by default).

    Chat with an imported instruct model (its own chat template):
    shipyard generate qwen-pkg --chat --prompt "Name three rivers." --temperature 0

    With --json, prints {text, finish_reason, prompt_tokens, completion_tokens,
    time_to_first_token_s, tokens_per_s, total_s} instead.
    """
    from shipyard.errors import ConfigError
    from shipyard.generate import SamplingParams, stream
    from shipyard.serve.lm import language_model

    if system is not None and not chat:
        raise ConfigError("--system needs --chat (it is a chat message)")
    model, tokenizer = language_model(_load(package))
    text_or_ids: str | list[int] = prompt
    if chat:
        messages = [{"role": "system", "content": system}] if system is not None else []
        text_or_ids = tokenizer.chat_prompt_ids([*messages, {"role": "user", "content": prompt}])
        stop = [*stop, *(s for s in tokenizer.chat_stops if s not in stop)]
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        repetition_penalty=repetition_penalty,
        seed=seed,
        stop=tuple(stop),
        stop_on_eos=not ignore_eos,
    )
    result = None
    for event in stream(
        model, tokenizer, text_or_ids, params, weights=decode_weights, kv_cache=kv_cache
    ):
        if not as_json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        result = event.result if event.result is not None else result
    assert result is not None
    summary = {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "time_to_first_token_s": result.time_to_first_token_s,
        "tokens_per_s": result.tokens_per_s,
        "total_s": result.total_s,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    sys.stdout.write("\n")
    ttft = (result.time_to_first_token_s or 0.0) * 1000
    typer.echo(
        f"[{result.completion_tokens} tokens, {result.finish_reason}; first token "
        f"{ttft:.1f} ms, {result.tokens_per_s:.1f} tokens/s]",
        err=True,
    )


def _load(source: str) -> LoadedModel:
    """A package directory, or else a registry ref."""
    from shipyard.package import load_package

    path = Path(source)
    if path.is_dir():
        return load_package(path)
    from shipyard.package.registry import Registry

    with Registry() as registry:
        local = registry.resolve_local(source)
    return load_package(local)
