"""Run config: strict keys with helpful errors, overrides, cross-field checks, examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import EXAMPLES, ROOT

from shipyard.config import (
    RunConfig,
    SGDConfig,
    apply_override,
    config_reference_markdown,
    config_schema,
    config_sha256,
    dump_config,
    load_config,
)
from shipyard.errors import ConfigError


def minimal(**changes: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "t",
        "task": "classification",
        "data": {"source": "builtin:digits"},
        "model": {"name": "mlp"},
    }
    raw.update(changes)
    return raw


def test_minimal_config_fills_defaults() -> None:
    cfg = load_config(minimal())
    assert cfg.seed == 0
    assert cfg.optim.name == "adamw"
    assert cfg.schedule.name == "constant"
    assert cfg.train.batch_size == 64
    assert cfg.data.splits.train == pytest.approx(0.8)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem


def test_examples_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"digits-mlp.yaml", "digits-cnn.yaml", "regression-mlp.yaml", "gpt-tiny.yaml"} <= names


def test_misspelt_key_names_path_allowed_keys_and_suggestion() -> None:
    raw = minimal(train={"batch_sise": 8})
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    msg = str(info.value)
    assert "train.batch_sise" in msg
    assert "did you mean 'batch_size'" in msg
    assert "grad_accum" in msg  # the allowed keys are listed


def test_misspelt_key_inside_tagged_union_uses_the_variant() -> None:
    raw = minimal(optim={"name": "sgd", "momentun": 0.9})
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    msg = str(info.value)
    assert "optim.momentun" in msg
    assert "did you mean 'momentum'" in msg
    assert "optim.sgd" not in msg


def test_key_of_another_optimizer_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.betas'"):
        load_config(minimal(optim={"name": "sgd", "betas": [0.9, 0.99]}))


def test_unknown_optimizer_name_lists_choices() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(minimal(optim={"name": "adamax"}))
    assert "adamax" in str(info.value)
    assert "rmsprop" in str(info.value)


def test_unknown_top_level_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'trian': did you mean 'train'"):
        load_config(minimal(trian={}))


def test_wrong_type_names_path_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(minimal(train={"batch_size": "many"}))
    assert "train.batch_size" in str(info.value)
    assert "'many'" in str(info.value)


def test_several_problems_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(minimal(train={"batch_sise": 8, "epochz": 2}))
    assert "2 problems" in str(info.value)


def test_overrides_coerce_types_and_lists() -> None:
    cfg = load_config(
        minimal(),
        [
            "train.epochs=3",
            "optim.lr=1e-2",
            "model.hidden_sizes=[32, 16]",
            "train.compile=true",
            "regularization.grad_clip_norm=null",
            "data.features=[a, b]",
        ],
    )
    assert cfg.train.epochs == 3
    assert cfg.optim.lr == pytest.approx(0.01)
    assert cfg.model.name == "mlp" and cfg.model.hidden_sizes == [32, 16]
    assert cfg.train.compile is True
    assert cfg.data.features == ["a", "b"]


def test_override_can_switch_variant() -> None:
    cfg = load_config(minimal(), ["optim.name=sgd", "optim.momentum=0.9"])
    assert isinstance(cfg.optim, SGDConfig)
    assert cfg.optim.momentum == pytest.approx(0.9)


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        apply_override({}, "train.epochs")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_override({"seed": 1}, "seed.x=2")


def test_language_modeling_needs_tokenizer_and_causal_model() -> None:
    lm = {"source": "builtin:python-stdlib"}
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        load_config(minimal(task="language-modeling", data=lm, model={"name": "gpt"}))
    lm_tok = {"source": "builtin:python-stdlib", "tokenizer": {"kind": "byte"}}
    with pytest.raises(ConfigError, match="causal model"):
        load_config(minimal(task="language-modeling", data=lm_tok, model={"name": "mlp"}))
    cfg = load_config(minimal(task="language-modeling", data=lm_tok, model={"name": "gpt"}))
    assert cfg.model.name == "gpt"


def test_classifier_has_no_output_size_key() -> None:
    # the number of classes comes from the data, so the model section cannot set it
    with pytest.raises(ConfigError, match=r"unknown key 'model\.num_classes'"):
        load_config(minimal(model={"name": "mlp", "num_classes": 10}))


def test_gpt_needs_language_modeling() -> None:
    with pytest.raises(ConfigError, match="language model"):
        load_config(minimal(model={"name": "gpt"}))


def test_loss_must_fit_task() -> None:
    with pytest.raises(ConfigError, match="needs task regression"):
        load_config(minimal(train={"loss": "mse"}))


PRETRAINED = {"name": "pretrained", "path": "some-package"}


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"train": {"loss": "mse"}}, "needs task regression"),
        ({"optim": {"name": "gd"}, "train": {"grad_accum": 2}}, "set grad_accum 1"),
        (
            {
                "train": {"privacy": {"noise_multiplier": 1}},
                "regularization": {"grad_clip_norm": 1},
            },
            "grad_clip_norm",
        ),
        ({"data": {"source": "chats.jsonl", "format": "chat"}}, "instruction data"),
        ({"data": {"source": "builtin:python-stdlib"}}, "text corpus source needs task"),
    ],
)
def test_a_pretrained_model_gets_every_check_but_the_architectures(
    changes: dict[str, Any], needle: str
) -> None:
    # these checks are about the task, data and training loop, not about the architecture
    load_config(minimal(model=PRETRAINED))
    for model in ({"name": "mlp"}, PRETRAINED):
        with pytest.raises(ConfigError, match=needle):
            load_config(minimal(model=model, **changes))


def test_language_modeling_on_a_pretrained_model_needs_text() -> None:
    with pytest.raises(ConfigError, match="needs a text corpus"):
        load_config(minimal(task="language-modeling", model=PRETRAINED))


def test_finetune_needs_a_pretrained_model() -> None:
    with pytest.raises(ConfigError, match=r"finetune needs model: \{name: pretrained"):
        load_config(minimal(finetune={"method": "full"}))
    assert load_config(minimal(model=PRETRAINED, finetune={"method": "full"})).finetune


def test_split_ratios_must_sum_to_one() -> None:
    with pytest.raises(ConfigError, match="sum to 1"):
        load_config(minimal(data={"source": "builtin:digits", "splits": {"train": 0.5}}))


def test_unknown_builtin_source() -> None:
    with pytest.raises(ConfigError, match="builtin:digits"):
        load_config(minimal(data={"source": "builtin:mnist"}))


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_dump_round_trips() -> None:
    cfg = load_config(EXAMPLES[0])
    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert config_sha256(again) == config_sha256(cfg)
    other = load_config(EXAMPLES[0], ["seed=123"])
    assert config_sha256(other) != config_sha256(cfg)


def test_schema_is_json_schema_with_sections() -> None:
    schema = config_schema()
    json.dumps(schema)
    assert {"data", "model", "optim", "train"} <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_configuration_reference_doc_is_current() -> None:
    """docs/configuration.md is generated; regenerate with `shipyard config docs`."""
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed.strip() == config_reference_markdown().strip(), (
        "docs/configuration.md is stale: run `shipyard config docs > docs/configuration.md`"
    )
    for field in ("batch_size", "grad_accum", "warmup_steps", "label_smoothing", "n_head"):
        assert f"`{field}`" in committed
