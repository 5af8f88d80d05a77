"""Hugging Face checkpoints in and out: tiny random models of every family, saved by
`transformers` (single-file and sharded), imported, compared with `transformers` logits, exported,
and loaded back by `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tests.conftest import ROOT
from tests.hf_support import MESSAGES, eos_ids, hf_tokenizer, write_json
from typer.testing import CliRunner

from shipyard.cli import app as cli_app
from shipyard.compress import export, import_hf, quantize
from shipyard.compress.errors import CompressError, ExportError
from shipyard.package import load_package, verify_package

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.integration

PROMPT_LENGTHS = (1, 5, 17)
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
# family -> (transformers config class, its extra fields, save_pretrained max_shard_size)
FAMILIES: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "llama": (
        "LlamaConfig",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        None,
    ),
    "mistral": ("MistralConfig", {"tie_word_embeddings": False, "sliding_window": 8}, "60KB"),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}, "40KB"),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": False, "head_dim": 32}, None),
    "phi3": ("Phi3Config", {"tie_word_embeddings": False, "num_key_value_heads": 4}, None),
}


def build_checkpoint(
    family: str, out: Path, *, seed: int = 0, initializer_range: float = 0.02
) -> tuple[Any, Any]:
    """Save a tiny random `family` model + tokenizer to `out`; return (model, tokenizer).

    initializer_range: larger values give peakier logits, so greedy text varies."""
    tok = hf_tokenizer(family, out)
    class_name, extra, shard = FAMILIES[family]
    ids = eos_ids(family, tok)
    vocab = len(tok) + (16 if family.startswith("qwen") else 0)  # Qwen pads its embedding
    config = getattr(transformers, class_name)(
        vocab_size=vocab,
        bos_token_id=tok.bos_token_id,
        eos_token_id=ids,
        pad_token_id=tok.pad_token_id,
        initializer_range=initializer_range,
        **{**SMALL, **extra},
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = ids
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(str(out), **kwargs)
    return model, tok


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any, Any]]:
    root = tmp_path_factory.mktemp("hf-checkpoints")
    return {f: (root / f, *build_checkpoint(f, root / f)) for f in FAMILIES}


@pytest.fixture(scope="module")
def imported(
    checkpoints: dict[str, tuple[Path, Any, Any]], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-packages")
    return {
        f: import_hf(path, root / f, name=f"tiny-{f}") for f, (path, _, _) in checkpoints.items()
    }


def _prompts(vocab: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, n), generator=gen) for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("family", FAMILIES)
def test_import_matches_transformers_logits(
    family: str, checkpoints: dict[str, tuple[Path, Any, Any]], imported: dict[str, Path]
) -> None:
    path, ref, tok = checkpoints[family]
    sharded = (path / "model.safetensors.index.json").is_file()
    assert sharded == (FAMILIES[family][2] is not None)
    loaded = load_package(imported[family])
    model = loaded.model
    for x in _prompts(ref.config.vocab_size):
        with torch.inference_mode():
            want = ref(x).logits
            got = model(x)
        assert got.shape == want.shape  # (B, T, V)
        assert (got - want).abs().max().item() <= 1e-4
    # the tokenizer came along as it is: chat prompts and EOS ids as transformers has them
    assert loaded.tokenizer is not None and loaded.tokenizer.kind == "hf"
    assert loaded.tokenizer.eos_ids == tuple(eos_ids(family, tok))
    messages = MESSAGES[0]
    want_ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    want_ids = list(want_ids["input_ids"] if hasattr(want_ids, "keys") else want_ids)
    assert loaded.tokenizer.apply_chat_template(messages) == want_ids
    lineage = loaded.manifest.lineage.model_dump()
    assert lineage["source_fingerprint"].startswith("sha256:")
    assert set(lineage["source_files"]) == {p.name for p in path.glob("*.safetensors")}
    assert loaded.manifest.derivation is not None
    assert loaded.manifest.derivation.params == {"model_type": family}


def test_steps_that_need_training_data_say_so(imported: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CompressError, match="imported from a Hugging Face checkpoint"):
        quantize(imported["llama"], tmp_path / "q", "int8-weight")


@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_transformers_with_identical_logits(
    family: str,
    checkpoints: dict[str, tuple[Path, Any, Any]],
    imported: dict[str, Path],
    tmp_path: Path,
) -> None:
    _, ref, tok = checkpoints[family]
    shard = 30_000 if family == "qwen3" else None  # qwen3: force shards on export
    out, parity = export(imported[family], tmp_path / "hf", format="hf", max_shard_size=shard)
    assert parity["max_abs_diff"] == 0.0
    files = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= files
    assert "chat_template.jinja" in files
    assert ("model.safetensors.index.json" in files) == (shard is not None)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back) is type(ref)
    names: set[str] = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert ("lm_head.weight" in names) == (not ref.config.tie_word_embeddings)
    for x in _prompts(ref.config.vocab_size):
        with torch.inference_mode():
            assert torch.equal(back(x).logits, ref(x).logits)
    back_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    for messages in MESSAGES:
        if family == "mistral":
            messages = [m for m in messages if m["role"] != "system"]
        assert back_tok.apply_chat_template(
            messages, add_generation_prompt=True
        ) == tok.apply_chat_template(messages, add_generation_prompt=True)
    assert back_tok("Hello there")["input_ids"] == tok("Hello there")["input_ids"]
    assert (back_tok.bos_token, back_tok.eos_token) == (tok.bos_token, tok.eos_token)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == eos_ids(family, tok)
    # and back in again: the same package contents, its parent recorded
    again = import_hf(out, tmp_path / "again")
    manifest = verify_package(again)
    assert manifest.lineage.parent is not None
    assert manifest.lineage.parent.name == f"tiny-{family}"


def test_generate_chat_uses_the_models_template(
    checkpoints: dict[str, tuple[Path, Any, Any]], imported: dict[str, Path]
) -> None:
    _, _, tok = checkpoints["qwen2"]
    result = CliRunner().invoke(
        cli_app,
        [
            "generate",
            str(imported["qwen2"]),
            "--chat",
            "--system",
            "Be brief.",
            "--prompt",
            "Hello there!",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there!"},
    ]
    want = tok.apply_chat_template(messages, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["prompt_tokens"] == len(want)
    assert summary["completion_tokens"] == 4


def test_pickled_and_broken_checkpoints_are_refused(
    checkpoints: dict[str, tuple[Path, Any, Any]], tmp_path: Path
) -> None:
    src = checkpoints["llama"][0]
    bad = tmp_path / "bin"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    (bad / "pytorch_model.bin").write_bytes(b"not even a pickle")  # never opened
    with pytest.raises(ExportError, match=r"pytorch_model\.bin is a pickled.*safetensors"):
        import_hf(bad, tmp_path / "out")
    other = tmp_path / "gemma"
    other.mkdir()
    write_json(other / "config.json", {"model_type": "gemma"})
    with pytest.raises(
        ExportError, match="model_type 'gemma' is not supported; supported: gpt2, llama"
    ):
        import_hf(other, tmp_path / "out")
    sharded = checkpoints["qwen2"][0]
    escape = tmp_path / "escape"
    escape.mkdir()
    for f in sharded.iterdir():
        (escape / f.name).write_bytes(f.read_bytes())
    index = json.loads((escape / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    write_json(escape / "model.safetensors.index.json", index)
    with pytest.raises(ExportError, match="must be a plain file name"):
        import_hf(escape, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = subprocess.run(
        [sys.executable, "-m", "shipyard", "import-hf", str(bad), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "pickled" in out.stderr


def test_gpt2_checkpoint_imports_and_exports(tmp_path: Path) -> None:
    """A GPT-2 saved by transformers (its own tokenizer: <|endoftext|> is the last id)."""
    src = tmp_path / "gpt2"
    tok = hf_tokenizer("qwen2", src)  # byte-level BPE; rewrite its specials GPT-2 style
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    config.pop("pad_token", None)
    write_json(src / "tokenizer_config.json", config)
    (src / "chat_template.jinja").unlink()
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = transformers.GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    ref.save_pretrained(str(src))
    pkg = import_hf(src, tmp_path / "pkg")
    loaded = load_package(pkg)
    x = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert (loaded.model(x) - ref(x).logits).abs().max().item() <= 1e-4
    assert loaded.tokenizer is not None and loaded.tokenizer.eos_ids == (eot,)
    # exporting an imported package: no test split to rebuild, BOS kept
    out, parity = export(pkg, tmp_path / "hf", format="hf")
    assert parity["max_abs_diff"] == 0.0
    back_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert back_tok.bos_token == "<|endoftext|>" == back_tok.eos_token
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.inference_mode():
        assert torch.equal(back(x).logits, ref(x).logits)
    again = load_package(import_hf(out, tmp_path / "again"))  # its HF tokenizer comes back too
    assert again.tokenizer == loaded.tokenizer
    assert again.manifest.lineage.parent is not None


def test_bf16_checkpoint_stays_bf16_and_exports_bitwise(tmp_path: Path) -> None:
    tok = hf_tokenizer("llama", tmp_path / "hf")
    config = transformers.LlamaConfig(
        vocab_size=len(tok), tie_word_embeddings=True, **{**SMALL, "max_position_embeddings": 64}
    )
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    ref.save_pretrained(str(tmp_path / "hf"))
    pkg = import_hf(tmp_path / "hf", tmp_path / "pkg")
    with safe_open(str(pkg / "model.safetensors"), "pt") as h:
        assert {h.get_tensor(k).dtype for k in h.keys()} == {torch.bfloat16}  # noqa: SIM118
    x = torch.randint(0, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # the package computes in fp32 from the bf16 values
        want = ref.float()(x).logits
        assert (load_package(pkg).model(x) - want).abs().max().item() <= 1e-4
    out, parity = export(pkg, tmp_path / "out", format="hf")
    assert parity["max_abs_diff"] == 0.0
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert back.dtype == torch.bfloat16
    ref_state = ref.to(torch.bfloat16).state_dict()
    assert all(torch.equal(ref_state[k], v) for k, v in back.state_dict().items())
