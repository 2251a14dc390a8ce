"""Config system: shipped recipes validate; bad keys, types and values are named errors."""

from __future__ import annotations

import dataclasses
import re

import pytest

from posttrain.config import OptimConfig, describe, load_config, param, to_yaml
from posttrain.errors import ConfigError, RunDirError
from posttrain.recipes import CONFIG_DIR, build_config, config_class, find_recipe, shipped_recipes
from posttrain.recipes.pretrain import PretrainConfig
from posttrain.train.run_dir import prepare_run_dir


@dataclasses.dataclass(frozen=True)
class Inner:
    ratio: float = param(0.5, "A share.", ge=0, le=1)
    names: list[str] = param(["a"], "Some names.")
    limit: int | None = param(None, "Optional cap.", gt=0)


@dataclasses.dataclass(frozen=True)
class Outer:
    flag: bool = param(False, "A switch.")
    mode: str = param("x", "A mode.", choices=("x", "y"))
    inner: Inner = dataclasses.field(default_factory=Inner)


@pytest.mark.parametrize("recipe", shipped_recipes(), ids=lambda r: r.name)
def test_every_shipped_recipe_loads_and_validates(recipe):
    cfg = build_config(recipe, [])
    assert dataclasses.is_dataclass(cfg)
    quick = build_config(recipe, [], quick=True)
    assert quick != cfg or not recipe.quick
    for key, _, doc in describe(cfg):
        assert doc, f"{recipe.name}: field {key} has no doc"


def test_every_config_field_has_a_doc():
    for key, _, doc in describe(PretrainConfig()):
        assert doc.strip(), key


def test_overrides_are_converted_to_the_declared_types():
    cfg = load_config(Outer, None, ["flag=true", "mode=y", "inner.ratio=0.25", "inner.names=[b, c]",
                                    "inner.limit=7"])
    assert cfg == Outer(flag=True, mode="y", inner=Inner(ratio=0.25, names=["b", "c"], limit=7))
    assert load_config(Outer, None, ["inner.limit=null"]).inner.limit is None
    assert load_config(OptimConfig, None, ["lr=1e-4"]).lr == 1e-4  # YAML 1.1 would read '1e-4' as text


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"inner\.ratoi.*did you mean 'inner\.ratio'"):
        load_config(Outer, None, ["inner.ratoi=0.1"])


@pytest.mark.parametrize("override, message", [
    ("flag=maybe", r"flag: 'maybe' is not a valid bool"),
    ("inner.ratio=abc", r"inner\.ratio: 'abc' is not a valid float"),
    ("inner.limit=2.5", r"inner\.limit: '2\.5' is not a valid"),
    ("inner.ratio=nan", r"inner\.ratio: 'nan' is not a valid float"),
    ("inner.ratio=inf", r"inner\.ratio: 'inf' is not a valid float \(an infinite number is not a usable setting\)"),
    ("inner.ratio=.inf", r"inner\.ratio: '\.inf' is not a valid float"),
])
def test_bad_type_names_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


@pytest.mark.parametrize("override, message", [
    ("mode=z", r"mode: 'z' is not allowed: must be one of 'x', 'y'"),
    ("inner.ratio=1.5", r"inner\.ratio: 1\.5 is not allowed: must be <= 1"),
    ("inner.limit=0", r"inner\.limit: 0 is not allowed: must be > 0"),
])
def test_out_of_range_value_names_the_allowed_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, [override])


def test_setting_a_section_to_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="inner: is a section"):
        load_config(Outer, None, ["inner=3"])


def test_yaml_errors_name_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stage: pretrain\noptim:\n  lr: 1.0e-3\n  schedul: cosine\n")
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, recipe)
    assert f"{recipe}:4: optim.schedul" in str(err.value)
    assert "did you mean 'optim.schedule'" in str(err.value)


def test_invalid_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("stage: pretrain\noptim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: invalid YAML"):
        load_config(PretrainConfig, recipe)


@pytest.mark.parametrize(("text", "line", "field"), [
    ("train:\n  max_steps: 2\noptim:\n  lr: 1.0e-3\ntrain:\n  batch_size: 4\n", 5, "train"),
    ("optim:\n  lr: 1.0e-3\n  warmup_steps: 2\n  lr: 1.0e-2\n", 4, "optim.lr"),
    ("train:\n  max_steps: 20\ntrain.max_steps: 5\n", 3, "train.max_steps"),  # nested and dotted: one won
])
def test_duplicate_yaml_keys_are_errors(tmp_path, text, line, field):
    """YAML keeps the last of two equal keys; a recipe with `train:` twice would lose the first section."""
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, recipe)
    assert (err.value.file, err.value.line, err.value.field) == (str(recipe), line, field)
    assert "duplicate key" in str(err.value)


def test_unknown_recipe_name_suggests_a_shipped_one():
    with pytest.raises(ConfigError, match="did you mean 'pretrain'"):
        find_recipe("pretrian")


def test_a_directory_named_like_a_recipe_does_not_hide_the_shipped_recipe(tmp_path, monkeypatch):
    (tmp_path / "ppo").mkdir()  # e.g. the run directory of an earlier `posttrain ppo`
    monkeypatch.chdir(tmp_path)
    assert find_recipe("ppo").path == CONFIG_DIR / "ppo.yaml"
    (tmp_path / "mine.yaml").mkdir()
    with pytest.raises(ConfigError, match="recipe file not found"):
        find_recipe("mine.yaml")


def test_config_is_frozen():
    cfg = PretrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = None  # type: ignore[misc]


def test_run_dir_refuses_to_overwrite(tmp_path):
    cfg = load_config(PretrainConfig, None, [f"run.out_dir={tmp_path}"])
    run_dir = prepare_run_dir(cfg.run, cfg, stage="pretrain")
    assert run_dir.config.read_text().startswith("stage: pretrain\nrun:")
    (run_dir.path / "metrics.jsonl").write_text("{}\n")
    run_dir.begin_training()  # it has trained a step (a run that had not is undone by the next start)
    with pytest.raises(RunDirError, match="run.overwrite=true"):
        prepare_run_dir(cfg.run, cfg, stage="pretrain")
    resumed = load_config(PretrainConfig, None, [f"run.out_dir={tmp_path}", "run.resume=true"])
    with pytest.raises(RunDirError, match="no complete checkpoint"):  # never retrained from step 0 over its metrics
        prepare_run_dir(resumed.run, resumed, stage="pretrain")
    replaced = load_config(PretrainConfig, None, [f"run.out_dir={tmp_path}", "run.overwrite=true"])
    new = prepare_run_dir(replaced.run, replaced, stage="pretrain")
    aside = tmp_path / ".pretrain.replaced"
    assert not new.metrics.exists() and (aside / "metrics.jsonl").is_file()  # kept until the new run trains
    new.begin_training()
    assert not aside.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pretrain"]


def test_resume_without_a_run_is_an_error(tmp_path):
    cfg = load_config(PretrainConfig, None, [f"run.out_dir={tmp_path}", "run.resume=true"])
    with pytest.raises(RunDirError, match="no run to resume"):
        prepare_run_dir(cfg.run, cfg, stage="pretrain")


@dataclasses.dataclass(frozen=True)
class WithMapping:
    weights: dict[str, float] = param({"a": 1.0}, "Named weights.")
    name: str = param("x", "A name.")


def test_mapping_fields_take_nested_yaml_and_dotted_overrides(tmp_path):
    recipe = tmp_path / "m.yaml"
    recipe.write_text("weights:\n  b: 2\n  c: 0.5\n")
    assert load_config(WithMapping, recipe).weights == {"b": 2.0, "c": 0.5}
    assert load_config(WithMapping, None, ["weights.d=3"]).weights == {"d": 3.0}
    with pytest.raises(ConfigError, match=r"weights: \{'d': 'x'\} is not a valid dict"):
        load_config(WithMapping, None, ["weights.d=x"])


def test_a_mapping_written_without_a_space_after_the_colon_names_the_key_and_says_why():
    with pytest.raises(ConfigError, match=r"weights: .*'b:2': expected a number, got NoneType \(YAML reads `a:1` as "
                                          r"one key with no value: write `a: 1`"):
        load_config(WithMapping, None, ["weights={b:2}"])
    assert load_config(WithMapping, None, ["weights={b: 2}"]).weights == {"b": 2.0}


def test_a_list_item_yaml_would_read_as_a_comment_is_the_text_itself(tmp_path):
    """`sampling.stop=###` was "expected a list, got NoneType": YAML reads a leading # as a comment."""
    assert load_config(Outer, None, ["inner.names=###"]).inner.names == ["###"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text('inner:\n  names: "###"\n')
    assert load_config(Outer, recipe).inner.names == ["###"]
    assert load_config(Outer, None, ["inner.names=[]"]).inner.names == []


def test_a_scalar_field_has_no_sub_keys():
    with pytest.raises(ConfigError, match=r"name\.first: name is not a section"):
        load_config(WithMapping, None, ["name.first=3"])


@pytest.mark.parametrize("cls, old, new, value", [
    ("ppo", "ppo.kl_coef", "kl.coef", 2), ("ppo", "ppo.clip", "loss.clip_low", 0.3),
    ("rft", "ppo.advantage", "advantage.estimator", "rloo"), ("grpo", "loss.beta", "kl.coef", 2),
    ("grpo", "loss.num_iterations", "update.epochs", 2),
    ("grpo", "sampling.group_size", "sampling.samples_per_prompt", 2),
    ("rejection", "sampling.group_size", "sampling.samples_per_prompt", 2)])
def test_a_renamed_key_names_its_new_name(tmp_path, cls, old, new, value):
    config = config_class(cls)
    with pytest.raises(ConfigError) as err:
        load_config(config, None, [f"{old}={value}"])
    assert err.value.field == old and f"use {new} instead" in str(err.value)
    section, key = old.split(".")
    recipe = tmp_path / "old.yaml"
    recipe.write_text(f"stage: {cls}\ntrain:\n  max_steps: 3\n{section}:\n  {key}: {value}\n")
    with pytest.raises(ConfigError, match=rf"old\.yaml:5: {old}: was renamed: use {new} instead"):
        load_config(config, recipe)
    # The new name is a field of the config, and takes the value.
    loaded = load_config(config, None, [f"{new}={value}"])
    for part in new.split("."):
        loaded = getattr(loaded, part)
    assert loaded == value


def test_registry_choices_are_read_when_a_value_is_checked():
    from posttrain.algos import ADVANTAGE_ESTIMATORS, Advantages, register_advantage_estimator

    config = config_class("grpo")
    with pytest.raises(ConfigError, match="not allowed"):
        load_config(config, None, ["advantage.estimator=late_registered"])
    register_advantage_estimator("late_registered")(lambda inputs, **_: Advantages(inputs.rewards, inputs.rewards))
    try:
        assert load_config(config, None, ["advantage.estimator=late_registered"]).advantage.estimator == (
            "late_registered")
        assert "late_registered" in dict((k, d) for k, _, d in describe(load_config(config)))[
            "advantage.estimator"]
    finally:
        del ADVANTAGE_ESTIMATORS._entries["late_registered"]


@pytest.mark.parametrize(("value", "shown"), [("No", "False"), ("off", "False"), ("1.10", "1.1")])
def test_a_text_setting_that_yaml_read_as_a_boolean_or_number_is_refused(tmp_path, value, shown):
    """`run.name: 1.10` became "1.1" and a stop string `No` became "False", silently."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: pretrain\nrun:\n  name: {value}\n")
    with pytest.raises(ConfigError, match=f"got the .* {shown}, which YAML read from unquoted text: quote it") as err:
        load_config(PretrainConfig, recipe)
    assert (err.value.line, err.value.field) == (3, "run.name")
    recipe.write_text(f"stage: pretrain\nrun:\n  name: '{value}'\n")
    assert load_config(PretrainConfig, recipe).run.name == value
    assert load_config(PretrainConfig, None, [f"run.name={value}"]).run.name == value  # an override is text


@pytest.mark.parametrize("value", ["0755", "1_000", "0x1f", "+7", "007"])
def test_a_text_setting_that_yaml_read_as_an_integer_of_another_spelling_is_refused(tmp_path, value):
    """YAML 1.1 reads `0755` as 493 (octal): a stop string `0755` silently became "493"."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stage: grpo\nsampling:\n  stop: [{value}, ok]\n")
    with pytest.raises(ConfigError, match=re.escape(f"read from the unquoted text '{value}': quote it")) as err:
        load_config(config_class("grpo"), recipe)
    assert (err.value.line, err.value.field) == (3, "sampling.stop")
    with pytest.raises(ConfigError, match=re.escape(f"unquoted text '{value}'")):
        load_config(config_class("grpo"), None, [f"sampling.stop=[{value}]"])
    recipe.write_text(f"stage: grpo\nsampling:\n  stop: ['{value}', ok]\n")
    assert load_config(config_class("grpo"), recipe).sampling.stop == [value, "ok"]


def test_integers_spelt_as_yaml_allows_are_still_integers_and_decimal_ones_still_text(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: pretrain\nrun:\n  name: 123\ntrain:\n  max_steps: 1_000\n")
    cfg = load_config(PretrainConfig, recipe)
    assert (cfg.run.name, cfg.train.max_steps, type(cfg.train.max_steps)) == ("123", 1000, int)
    assert "max_steps: 1000" in to_yaml(cfg)  # config.yaml is written with the safe dumper: plain types only


def test_a_typo_in_a_recipes_quick_settings_names_the_recipe_and_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stage: pretrain\nquick:\n  train.max_step: 5\n")
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'") as err:
        build_config(find_recipe(str(recipe)), [], quick=True)
    assert (err.value.file, err.value.line, err.value.field) == (str(recipe), 3, "train.max_step")


def test_overrides_given_as_one_string_or_a_mapping_are_refused_as_such():
    for overrides in ("train.max_steps=3", {"train.max_steps": 3}):
        with pytest.raises(ConfigError, match="overrides must be a list of 'key.sub=value' strings"):
            load_config(PretrainConfig, None, overrides)


def test_a_recipe_loaded_as_a_mapping_reads_as_the_same_file_by_path():
    import yaml

    path = find_recipe("sft").path
    assert load_config(config_class("sft"), yaml.safe_load(path.read_text())) == load_config(config_class("sft"), path)


def test_a_function_given_where_its_name_is_expected_is_refused():
    def my_reward(batch):
        return [1.0]

    with pytest.raises(ConfigError, match="got the function .*my_reward.* as a key: name it") as err:
        load_config(config_class("grpo"), {"reward": {"functions": {my_reward: 1.0}}})
    assert err.value.field == "reward.functions"
