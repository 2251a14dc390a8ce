"""A broken model directory is a one-line error naming the file, not a traceback from transformers."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from posttrain.config import ModelConfig
from posttrain.errors import ConfigError
from posttrain.models import build_model, load_causal_lm, load_tokenizer
from posttrain.models.reward import build_reward_model


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


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


def _a_lost_tensor(path):
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.3.mlp.down_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def _a_reward_model(path):
    """The directory of a scalar reward model (`posttrain rm`): the trunk and a `score` head, no output layer."""
    reward_model = build_reward_model(str(path), pad_token_id=0)
    for file in path.glob("*.safetensors"):
        file.unlink()
    reward_model.save_pretrained(path)


def _pickled_objects(path):
    """A pytorch_model.bin whose pickle would run code: weights_only refuses it (torch's message then suggests
    loading it with weights_only=False)."""
    (path / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _RunsCode()}, path / "pytorch_model.bin")


@pytest.mark.parametrize(("damage", "expected"), [
    (_pickled_objects, r"model.path: cannot load the model: a weights file \(pytorch_model.bin\) holds Python "
                       r"objects besides tensors, which posttrain does not unpickle"),
    (_not_json, r"config.json:2: model.path: not valid JSON"),
    (_unknown_type, r"config.json: model.path: unknown model_type 'llama9'"),
    (_no_weights, r"model.path: .*model has no weights \(model.safetensors\)"),
    (_truncated, r"model: model.path: cannot load the model: "),
    # transformers would start what is missing at random, and training went on on it without a word.
    (_a_lost_tensor, r"model.path: .*model has no saved model.layers.3.mlp.down_proj.weight, which would start at "
                     r"random: its weight files lack them"),
    (_a_reward_model, r"model.path: .*model has no saved lm_head.weight, which would start at random: it is a "
                      r"LlamaForSequenceClassification \(a reward or value model\), not a causal LM"),
])
def test_a_broken_model_directory_is_a_one_line_error(model_dir, damage, expected, monkeypatch):
    monkeypatch.chdir(model_dir.parent)
    damage(model_dir)
    with pytest.raises(ConfigError, match=expected) as err:
        load_causal_lm(model_dir)
    assert "\n" not in str(err.value) and str(model_dir) in str(err.value)
    assert not (model_dir.parent / "ran-code").exists()


def test_the_tokenizer_of_a_directory_with_a_broken_config_is_a_one_line_error(model_dir):
    _not_json(model_dir)
    with pytest.raises(ConfigError, match="config.json:2: model.path: not valid JSON"):
        load_tokenizer(model_dir)


def test_a_models_fingerprint_is_its_files_wherever_they_are(tmp_path):
    """What a resume tells the model it started from by (`check_model_files`): a copy has the same, an edit to a
    weight file inside a sampled block or to the tokenizer does not; files that are not the model (an evaluation's
    results) change nothing."""
    import random
    import shutil

    from posttrain.models.io import model_fingerprint

    model = tmp_path / "model"
    model.mkdir()
    size = 5 * (1 << 20) + 12345
    weights = bytearray(random.Random(0).randbytes(size))
    (model / "model.safetensors").write_bytes(weights)
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "tokenizer.json").write_text('{"vocab": 1}')
    first = model_fingerprint(model)
    assert sorted(first) == ["config.json", "model.safetensors", "tokenizer.json"]
    shutil.copytree(model, tmp_path / "copy")
    (tmp_path / "copy" / "eval.json").write_text("{}")
    (tmp_path / "copy" / "eval-token_tests.json").write_text("{}")  # what eval --data token_tests.jsonl writes
    assert model_fingerprint(tmp_path / "copy") == first
    # The 10th of the 64 middle blocks (the slow obvious spelling of where they start) and the last MiB.
    edge, block = 1 << 20, 1 << 16
    for offset in (edge + 10 * (size - 2 * edge - block) // 63 + 5, size - 3):
        edited = bytearray(weights)
        edited[offset] ^= 0xFF
        (tmp_path / "copy" / "model.safetensors").write_bytes(edited)
        assert model_fingerprint(tmp_path / "copy")["model.safetensors"] != first["model.safetensors"]
    (tmp_path / "copy" / "model.safetensors").write_bytes(weights)
    (tmp_path / "copy" / "tokenizer.json").write_text('{"vocab": 2}')
    assert model_fingerprint(tmp_path / "copy") == {**first, "tokenizer.json": model_fingerprint(tmp_path / "copy")[
        "tokenizer.json"]} != first


def test_a_tokenizer_with_ids_past_the_models_embedding_is_refused_as_it_loads(tmp_path, tokenizer):
    """Its ids past the embedding failed mid-run (IndexError in the embedding) at the first row that used one, or
    never; an embedding larger than the tokenizer (a vocabulary padded to a round size) is fine."""
    from posttrain.models import load_tokenizer_and_model

    for rows, name in ((len(tokenizer) - 10, "small"), (len(tokenizer) + 16, "padded")):
        model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
        model.resize_token_embeddings(rows)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    past = sorted(index for index in tokenizer.get_vocab().values() if index >= len(tokenizer) - 10)
    with pytest.raises(ConfigError, match=rf"model.path: the tokenizer has 10 token\(s\) with ids past the model's "
                                          rf"{len(tokenizer) - 10} embedding rows \(.* ids {past[0]}-{past[-1]}\)"):
        load_tokenizer_and_model(ModelConfig(path=str(tmp_path / "small")))
    _, model = load_tokenizer_and_model(ModelConfig(path=str(tmp_path / "padded")))
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) + 16


def test_a_model_that_does_not_say_its_embedding_is_not_checked_against_the_tokenizer(tokenizer):
    """A model of its own code whose get_input_embeddings is not implemented loaded before the check existed."""
    from posttrain.models.io import check_tokenizer_fits

    class Opaque(torch.nn.Module):
        def get_input_embeddings(self):
            raise NotImplementedError

    check_tokenizer_fits(tokenizer, Opaque())
