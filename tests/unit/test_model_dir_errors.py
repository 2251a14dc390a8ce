"""A broken model directory is a one-line error naming the file, not a traceback from transformers."""

from __future__ import annotations

import json

import pytest

from posttrain.config import ModelConfig
from posttrain.errors import ConfigError
from posttrain.models import build_model, load_causal_lm, load_tokenizer


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "model"
    build_model(ModelConfig(size="tiny"), tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _not_json(path):
    (path / "config.json").write_text('{"model_type": "llama",\n  oops}')


def _unknown_type(path):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama9"}))


def _no_weights(path):
    (path / "model.safetensors").unlink()


def _truncated(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


@pytest.mark.parametrize(("damage", "expected"), [
    (_not_json, r"config.json:2: model.path: not valid JSON"),
    (_unknown_type, r"config.json: model.path: unknown model_type 'llama9'"),
    (_no_weights, r"model.path: .*model has no weights \(model.safetensors\)"),
    (_truncated, r"model: model.path: cannot load the model: "),
])
def test_a_broken_model_directory_is_a_one_line_error(model_dir, damage, expected):
    damage(model_dir)
    with pytest.raises(ConfigError, match=expected) as err:
        load_causal_lm(model_dir)
    assert "\n" not in str(err.value) and str(model_dir) in str(err.value)


def test_the_tokenizer_of_a_directory_with_a_broken_config_is_a_one_line_error(model_dir):
    _not_json(model_dir)
    with pytest.raises(ConfigError, match="config.json:2: model.path: not valid JSON"):
        load_tokenizer(model_dir)
