"""The bad-input catalogue: every mistake a user can make through the command line is one clear error.

Each case runs a real command (a stage, resume, eval, data inspect, config) on a bad input and asserts:
exit code 2 (a user error, `posttrain.errors`), no traceback, the message names where the problem is
(file:line: field, or the field), and every file that existed before (data, recipe, a previous run) is
byte-identical afterwards. Errors come before any training, so each case takes well under a second or two:
the model is the built-in tiny one, saved once per module.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from posttrain import cli
from posttrain.cli import app

runner = CliRunner()

PAIR = {"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"}
GOOD = {"prompt": "What is 2+3?", "completion": "5"}
VERIFIABLE = {"prompt": "What is 2+3?", "answer": "5"}


def jsonl(*rows: object) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (with {tmp} and {model} filled in), the files it needs, and the
    words the error must contain (filled in the same way)."""

    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]
    files: dict[str, str | bytes] = field(default_factory=dict)
    model_files: tuple[str, ...] = ()  # files of the tiny model directory copied into {tmp}/m


# Settings every stage run gets: the module's tiny model, a private out_dir, no live progress bar.
def stage(name: str, *args: str) -> tuple[str, ...]:
    return (name, "model.path={model}", "run.out_dir={tmp}/runs", "run.progress=false", "data.size=32", *args)


def sft_data(name: str, *args: str) -> tuple[str, ...]:
    return stage("sft", f"data.source={{tmp}}/{name}", *args)


def case(id: str, args: tuple[str, ...], *expect: str, files: dict[str, str | bytes] | None = None,
         model_files: tuple[str, ...] = ()):
    return pytest.param(Case(id, args, expect, files or {}, model_files), id=id)


TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


RECIPE_OK = "stage: sft\ndescription: mine\ntrain:\n  max_steps: 2\noptim:\n  lr: 1.0e-3\n"

CONFIG_CASES = [
    # Overrides on the command line: the field is named, with what is allowed.
    case("unknown-key", stage("sft", "optim.lrr=1"), "override: optim.lrr:", "did you mean 'optim.lr'"),
    case("unknown-section", stage("sft", "optimm.lr=1"), "override: optimm.lr:", "unknown key"),
    case("int-not-a-number", stage("sft", "train.max_steps=abc"), "override: train.max_steps:", "not a valid int"),
    case("int-given-fraction", stage("sft", "train.max_steps=1.5"), "override: train.max_steps:", "integer"),
    case("bool-not-a-bool", stage("sft", "run.progress=maybe"), "override: run.progress:", "true or false"),
    case("lr-zero", stage("sft", "optim.lr=0"), "override: optim.lr:", "must be > 0"),
    case("beta-one", stage("sft", "optim.beta1=1"), "override: optim.beta1:", "must be < 1"),
    case("lr-nan", stage("sft", "optim.lr=nan"), "override: optim.lr:", "NaN"),
    case("choice-typo", stage("sft", "optim.schedule=cosin"), "override: optim.schedule:", "must be one of"),
    case("truncation-choice", stage("sft", "data.truncation=cut"), "override: data.truncation:", "'truncate_left'"),
    case("negative-seed", stage("sft", "run.seed=-1"), "override: run.seed:", "must be >= 0"),
    case("section-given-value", stage("sft", "optim=3"), "override: optim:", "is a section"),
    case("field-given-subkey", stage("sft", "optim.lr.x=1"), "optim.lr.x", "not a section"),
    case("override-without-equals", stage("sft", "lr"), "override: ", "'lr' is not of the form key.sub=value"),
    case("override-empty-key", ("sft", "=3"), "override: ", "empty key"),
    case("eval-split-one", stage("sft", "data.eval_split=1"), "override: data.eval_split:", "must be < 1"),
    case("max-length-one", stage("sft", "data.max_length=1"), "override: data.max_length:", "must be >= 2"),
    case("markup-like-value", stage("sft", "optim.lr=[/red]"), "override: optim.lr: '[/red]' is not a valid float"),
    case("dtype-choice", stage("sft", "model.dtype=float8"), "override: model.dtype:", "must be one of"),
    case("list-for-int", stage("sft", "train.batch_size=[1,2]"), "override: train.batch_size:",
         "'[1,2]' is not a valid int"),
    case("reward-weight-not-number", stage("grpo", "reward.functions={correct: high}"),
         "override: reward.functions:", "'high'"),
    # Recipes: by name, by path, and YAML files whose mistakes are named by file and line.
    case("unknown-recipe", ("sft", "sftt"), "no recipe named 'sftt'", "did you mean 'sft'"),
    case("recipe-of-another-stage", ("sft", "dpo"), "dpo.yaml", "stage: recipe is for stage 'dpo', not 'sft'"),
    case("recipe-file-missing", ("sft", "{tmp}/missing.yaml"), "{tmp}/missing.yaml: recipe file not found"),
    case("yaml-invalid", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:3: invalid YAML",
         files={"r.yaml": "stage: sft\ntrain:\n\tmax_steps: 2\noptim:\n  lr: 1.0e-3\n"}),
    case("yaml-duplicate-key", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:5: train: duplicate key",
         files={"r.yaml": RECIPE_OK.replace("optim:", "train:")}),
    case("yaml-unknown-key", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:4: train.max_stepz: unknown key",
         files={"r.yaml": RECIPE_OK.replace("max_steps", "max_stepz")}),
    case("yaml-wrong-type", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:6: optim.lr:", "not a valid float",
         files={"r.yaml": RECIPE_OK.replace("1.0e-3", "fast")}),
    case("yaml-out-of-range", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:4: train.max_steps:", "must be >= ",
         files={"r.yaml": RECIPE_OK.replace("max_steps: 2", "max_steps: -5")}),
    case("yaml-unknown-stage", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:1: stage: stage 'sftt' is not one of",
         files={"r.yaml": RECIPE_OK.replace("stage: sft", "stage: sftt")}),
    case("yaml-no-stage", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml: stage: stage None is not one of",
         files={"r.yaml": "train:\n  max_steps: 2\n"}),
    case("yaml-not-a-mapping", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:1: a recipe must be a YAML mapping",
         files={"r.yaml": "- stage: sft\n"}),
    case("yaml-quick-not-mapping", ("sft", "{tmp}/r.yaml", "--quick"), "{tmp}/r.yaml:2: quick: quick must be a mapping",
         files={"r.yaml": "stage: sft\nquick: fast\n"}),
    case("yaml-section-given-value", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:3: train: is a section",
         files={"r.yaml": "stage: sft\ndescription: x\ntrain: 5\n"}),
    case("yaml-not-utf8", ("sft", "{tmp}/r.yaml"), "{tmp}/r.yaml:2: not valid UTF-8: byte 0xe9",
         files={"r.yaml": b"stage: sft\ndescription: caf\xe9\n"}),
    case("config-command-bad-value", ("config", "sft", "train.batch_size=0"), "override: train.batch_size:",
         "must be >= 1"),
]

DATA_CASES = [
    case("data-file-missing", sft_data("nope.jsonl"), "{tmp}/nope.jsonl: file not found"),
    case("data-unknown-suffix", sft_data("d.txt"), "{tmp}/d.txt: unsupported file type '.txt'",
         files={"d.txt": "hi\n"}),
    case("data-invalid-json-line", sft_data("d.jsonl"), "{tmp}/d.jsonl:3: invalid JSON",
         files={"d.jsonl": jsonl(GOOD, GOOD, '{"prompt": "x", "completion": }')}),
    case("data-row-not-object", sft_data("d.jsonl"), "{tmp}/d.jsonl:2:", "must be an object",
         files={"d.jsonl": jsonl(GOOD, "[1, 2]")}),
    case("data-missing-column", sft_data("d.jsonl"), "{tmp}/d.jsonl:1: prompt:", "did you mean 'promt'",
         files={"d.jsonl": jsonl({"promt": "q", "completion": "a"})}),
    case("data-wrong-type", sft_data("d.jsonl"), "{tmp}/d.jsonl:2: prompt:", "got an integer",
         files={"d.jsonl": jsonl(GOOD, {"prompt": 42, "completion": "a"})}),
    case("data-empty-completion", sft_data("d.jsonl"), "{tmp}/d.jsonl:1: completion: empty completion",
         files={"d.jsonl": jsonl({"prompt": "q", "completion": " "})}),
    case("data-empty-file", sft_data("d.jsonl"), "{tmp}/d.jsonl: empty file", files={"d.jsonl": ""}),
    case("data-not-utf8", sft_data("d.jsonl"), "{tmp}/d.jsonl:2:", "not valid UTF-8",
         files={"d.jsonl": jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "completion": "a"}\n'}),
    case("data-csv-extra-cells", sft_data("d.csv"), "{tmp}/d.csv:3:", "more cells than the header",
         files={"d.csv": "prompt,completion\nq,a\nq,a,extra\n"}),
    case("data-csv-missing-column", sft_data("d.csv"), "{tmp}/d.csv:", "completion",
         files={"d.csv": "prompt,answer\nq,a\n"}),
    case("data-json-invalid", sft_data("d.json"), "{tmp}/d.json:2: invalid JSON",
         files={"d.json": '[{"prompt": "q", "completion": "a"},\n {"prompt": }]\n'}),
    case("data-json-not-list", sft_data("d.json"), "{tmp}/d.json:", "a .json file must hold a list",
         files={"d.json": '"just text"\n'}),
    case("data-parquet-garbage", sft_data("d.parquet"), "{tmp}/d.parquet: not a readable parquet file",
         files={"d.parquet": "not parquet at all"}),
    case("data-datasets-dir-empty", sft_data("ds"), "{tmp}/ds: not a `datasets` directory",
         files={"ds/readme": "nothing"}),
    case("data-unknown-role", sft_data("d.jsonl"), "{tmp}/d.jsonl:1: messages[1].role: unknown role 'robot'",
         files={"d.jsonl": jsonl({"messages": chat(("user", "q"), ("robot", "x"))})}),
    case("data-no-assistant-turn", sft_data("d.jsonl"), "{tmp}/d.jsonl:1: messages:", "no assistant turn",
         files={"d.jsonl": jsonl({"messages": chat(("system", "s"), ("user", "q"))})}),
    case("data-tool-calls-not-list", sft_data("d.jsonl"), "{tmp}/d.jsonl:1: messages[1].tool_calls:",
         "non-empty list of tool calls",
         files={"d.jsonl": jsonl({"messages": [*chat(("user", "q")),
                                               {"role": "assistant", "content": None, "tool_calls": "calc(2+3)"}]})}),
    case("data-tool-call-no-name", sft_data("d.jsonl"), "{tmp}/d.jsonl:1: messages[1].tool_calls[0]:",
         "needs a function name",
         files={"d.jsonl": jsonl({"messages": [*chat(("user", "q")), {"role": "assistant", "content": None,
                                                                       "tool_calls": [{"arguments": {}}]}]})}),
    case("data-tool-calls-from-user", sft_data("d.jsonl"), "{tmp}/d.jsonl:1: messages[0].tool_calls:",
         "only assistant turns",
         files={"d.jsonl": jsonl({"messages": [{"role": "user", "content": "q", "tool_calls": [{"name": "f"}]},
                                               *chat(("assistant", "a"))]})}),
    case("data-format-not-for-stage", sft_data("d.jsonl", "data.format=preference"),
         "data.format", "not a format this stage takes", files={"d.jsonl": jsonl(GOOD)}),
    case("data-columns-typo", sft_data("d.jsonl", "data.columns.promt=question"),
         "override: data.columns.promt:", "did you mean 'data.columns.prompt'", files={"d.jsonl": jsonl(GOOD)}),
    case("data-renamed-column-absent", sft_data("d.jsonl", "data.columns.prompt=question"),
         "{tmp}/d.jsonl:1:", "'question'", files={"d.jsonl": jsonl(GOOD)}),
    case("data-unknown-task", stage("sft", "data.source=arithh"), "arithh", "not found"),
    case("data-too-long-error", sft_data("d.jsonl", "data.truncation=error", "data.max_length=32"),
         "{tmp}/d.jsonl:2: prompt:", "longer than data.max_length=32",
         files={"d.jsonl": jsonl(GOOD, {"prompt": "word " * 50, "completion": "a"})}),
    case("dpo-identical-pair", stage("dpo", "data.source={tmp}/p.jsonl"), "{tmp}/p.jsonl:2: rejected:", "identical",
         files={"p.jsonl": jsonl(PAIR, PAIR | {"rejected": "5"})}),
    case("dpo-no-shared-prompt", stage("dpo", "data.source={tmp}/p.jsonl"), "{tmp}/p.jsonl:1: prompt:",
         "no shared prompt",
         files={"p.jsonl": jsonl({"chosen": chat(("user", "a"), ("assistant", "5")),
                                  "rejected": chat(("user", "b"), ("assistant", "6"))})}),
    case("dpo-margin-not-number", stage("dpo", "data.source={tmp}/p.jsonl"), "{tmp}/p.jsonl:1: margin:",
         "must be a number", files={"p.jsonl": jsonl(PAIR | {"margin": "big"})}),
    case("dpo-ranking-scores-mismatch", stage("dpo", "data.source={tmp}/p.jsonl"), "{tmp}/p.jsonl:1: scores:",
         "2 scores for 3 responses",
         files={"p.jsonl": jsonl({"prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 0]})}),
    case("dpo-sft-rows", stage("dpo", "data.source={tmp}/p.jsonl"), "{tmp}/p.jsonl:1:", "chosen",
         files={"p.jsonl": jsonl(GOOD)}),
    case("kto-bad-label", stage("kto", "data.source={tmp}/u.jsonl"), "{tmp}/u.jsonl:2: label:",
         "must be true/false", files={"u.jsonl": jsonl(GOOD | {"label": True}, GOOD | {"label": "maybe"})}),
    case("kto-missing-label", stage("kto", "data.source={tmp}/u.jsonl"), "{tmp}/u.jsonl:1: label:",
         files={"u.jsonl": jsonl(GOOD)}),
    case("rm-preference-prob-range", stage("rm", "data.source={tmp}/p.jsonl"),
         "{tmp}/p.jsonl:1: preference_prob:", "[0, 1]", files={"p.jsonl": jsonl(PAIR | {"preference_prob": 1.5})}),
    case("grpo-empty-answer", stage("grpo", "data.source={tmp}/v.jsonl"), "{tmp}/v.jsonl:2: answer:", "empty",
         files={"v.jsonl": jsonl(VERIFIABLE, {"prompt": "q", "answer": " "})}),
    case("grpo-no-gold-answer", stage("grpo", "data.source={tmp}/v.jsonl"), "{tmp}/v.jsonl:2: answer:",
         "no gold answer", files={"v.jsonl": jsonl(VERIFIABLE, {"prompt": "What is 1+1?"})}),
    case("inspect-invalid-json", ("data", "inspect", "{tmp}/d.jsonl", "--model", "{model}"),
         "{tmp}/d.jsonl:2: invalid JSON", files={"d.jsonl": jsonl(GOOD, "{oops")}),
    case("inspect-bad-setting", ("data", "inspect", "{tmp}/d.jsonl", "max_length=big", "--model", "{model}"),
         "override: data.max_length:", files={"d.jsonl": jsonl(GOOD)}),
    case("inspect-unknown-recipe", ("data", "inspect", "{tmp}/d.jsonl", "--recipe", "sftt", "--model", "{model}"),
         "no recipe named 'sftt'", files={"d.jsonl": jsonl(GOOD)}),
]

MODEL_CASES = [
    case("model-dir-missing", ("sft", "model.path={tmp}/nomodel", "run.out_dir={tmp}/runs"),
         "model.path:", "{tmp}/nomodel"),
    case("model-dir-no-config", ("sft", "model.path={tmp}/m", "run.out_dir={tmp}/runs"),
         "model.path:", "no config.json", files={"m/weights.bin": "x"}),
    case("model-config-not-json", ("sft", "model.path={tmp}/m", "run.out_dir={tmp}/runs"),
         "{tmp}/m", "config.json", files={"m/config.json": "{not json"}),
    case("model-no-weights", ("sft", "model.path={tmp}/m", "run.out_dir={tmp}/runs"), "{tmp}/m", "weights",
         files={"m/config.json": json.dumps({"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
                                             "num_hidden_layers": 1, "num_attention_heads": 2,
                                             "intermediate_size": 32})},
         model_files=TOKENIZER),
    case("model-unknown-type", ("sft", "model.path={tmp}/m", "run.out_dir={tmp}/runs"), "{tmp}/m", "model_type",
         files={"m/config.json": json.dumps({"model_type": "no-such-architecture"})},
         model_files=TOKENIZER),
    case("model-no-tokenizer", ("sft", "model.path={tmp}/m", "run.out_dir={tmp}/runs"), "{tmp}/m", "tokenizer",
         model_files=("config.json", "model.safetensors")),
    case("model-weights-truncated", ("sft", "model.path={tmp}/m", "run.out_dir={tmp}/runs"), "{tmp}/m",
         "model.safetensors", files={"m/model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}"},
         model_files=("config.json", *TOKENIZER)),
    case("sft-without-model", ("sft", "model.path=none", "run.out_dir={tmp}/runs"), "model.path:",
         "set model.path"),
    case("eval-path-missing", ("eval", "{tmp}/nothing"), "{tmp}/nothing"),
    case("eval-precision-choice", ("eval", "{model}", "--precision", "fp8"), "precision must be one of"),
    case("eval-unknown-task", ("eval", "{model}", "--task", "arithh", "--problems", "2", "--samples", "0"),
         "arithh"),
    case("eval-unknown-reward", ("eval", "{model}", "--task", "arith", "--problems", "2", "--reward", "nosuch"),
         "--reward: unknown reward function 'nosuch'"),
    case("report-not-a-run", ("report", "{tmp}"), "{tmp}: neither a demo directory (demo.json) nor a run"),
]

REWARD_PY = "X = 3\n\ndef length(prompts, completions, **columns):\n    return [float(len(c)) for c in completions]\n"

REWARD_CASES = [
    case("reward-unknown-name", stage("grpo", "reward.functions={nosuch: 1.0}"), "reward.functions:",
         "unknown reward function(s) nosuch"),
    case("reward-file-missing", stage("grpo", "reward.functions={{tmp}/missing.py:f: 1.0}"),
         "reward.functions.{tmp}/missing.py:f:", "not found"),
    case("reward-module-missing", stage("grpo", "reward.functions={nosuch_module_xyz:f: 1.0}"),
         "reward.functions.nosuch_module_xyz:f:", "cannot import"),
    case("reward-not-callable", stage("grpo", "reward.functions={{tmp}/rewards.py:X: 1.0}"),
         "reward.functions.{tmp}/rewards.py:X:", "no function 'X'", "length", files={"rewards.py": REWARD_PY}),
    case("reward-no-such-function", stage("grpo", "reward.functions={{tmp}/rewards.py:lenght: 1.0}"),
         "reward.functions.{tmp}/rewards.py:lenght:", "no function 'lenght'", files={"rewards.py": REWARD_PY}),
    case("reward-module-raises", stage("grpo", "reward.functions={{tmp}/rewards.py:f: 1.0}"),
         "reward.functions.{tmp}/rewards.py:f:", "ZeroDivisionError", files={"rewards.py": "1 / 0\n"}),
    case("reward-model-without-path", stage("grpo", "reward.functions={reward_model: 1.0}"), "reward.model_path"),
    case("grader-without-file", stage("grpo", "reward.functions={grader: 1.0}"), "reward.grader"),
    case("grader-file-missing", stage("grpo", "reward.functions={grader: 1.0}", "reward.grader={tmp}/g.yaml"),
         "{tmp}/g.yaml: grader file not found"),
    case("grader-unknown-type", stage("grpo", "reward.functions={grader: 1.0}", "reward.grader={tmp}/g.yaml"),
         "{tmp}/g.yaml:1: type:", "string_check", files={"g.yaml": "type: string_chek\n"}),
    case("grader-missing-operation", stage("grpo", "reward.functions={grader: 1.0}", "reward.grader={tmp}/g.yaml"),
         "{tmp}/g.yaml", "operation",
         files={"g.yaml": "type: string_check\ninput: '{{ sample.output_text }}'\nreference: '{{ item.answer }}'\n"}),
    case("grader-bad-formula", stage("grpo", "reward.functions={grader: 1.0}", "reward.grader={tmp}/g.yaml"),
         "{tmp}/g.yaml:5: calculate_output:", "nope",
         files={"g.yaml": "type: multi\ngraders:\n  exact: {type: string_check, operation: eq, input: 'a', "
                          "reference: 'b'}\n\ncalculate_output: 'exact + nope'\n"}),
    case("grader-template-typo", stage("grpo", "reward.functions={grader: 1.0}", "reward.grader={tmp}/g.yaml"),
         "{tmp}/g.yaml:2: input:", "output_txt",
         files={"g.yaml": "type: string_check\ninput: '{{ sample.output_txt }}'\noperation: eq\n"
                          "reference: '{{ item.answer }}'\n"}),
    case("grader-python-syntax-error", stage("grpo", "reward.functions={grader: 1.0}", "reward.grader={tmp}/g.yaml"),
         "{tmp}/g.yaml:2: source: the grader source does not parse",
         files={"g.yaml": "type: python\nsource: |\n  def grade(sample, item)\n      return 1.0\n"}),
]

BATCH_CASES = [
    case("lora-target-not-in-model", stage("sft", "adapter.method=lora", "adapter.target_modules=[q_proj,dense]"),
         "adapter.target_modules:", "dense"),
    case("grpo-lora-target-not-in-model", stage("grpo", "adapter.method=lora", "adapter.target_modules=[fc1]"),
         "adapter.target_modules:", "fc1"),
    case("lora-rank-above-every-layer", stage("sft", "adapter.method=lora", "adapter.r=100000"),
         "adapter.r:", "adapter.r=100000 is above the rank of every layer of this model"),
    case("batch-not-multiple-of-micro", sft_data("d.jsonl", "train.batch_size=10", "train.micro_batch_size=4"),
         "train.micro_batch_size:",
         "batch_size 10 is not a multiple of micro_batch_size 4: set train.micro_batch_size=2",
         files={"d.jsonl": jsonl(GOOD)}),
    case("grpo-batch-not-multiple-of-group", stage("grpo", "train.batch_size=10", "train.micro_batch_size=10"),
         "sampling.samples_per_prompt: the completions of a round (10) must be a multiple"),
]

RUN_DIR_CASES = [
    case("run-exists-no-overwrite", stage("sft", "run.name=keep"), "{tmp}/runs/keep: a run already exists here",
         "run.overwrite=true"),
    case("resume-flag-without-run", stage("sft", "run.name=none-yet", "run.resume=true"),
         "{tmp}/runs/none-yet: run.resume=true but there is no run to resume here"),
    case("resume-not-a-run", ("resume", "{tmp}"), "{tmp}: not a run directory (no config.yaml)"),
    case("resume-config-invalid-yaml", ("resume", "{tmp}/broken"), "{tmp}/broken/config.yaml:3: invalid YAML",
         files={"broken/config.yaml": "stage: sft\nrun:\n\tname: x\n"}),
    case("resume-config-unknown-stage", ("resume", "{tmp}/broken"), "{tmp}/broken/config.yaml:1: stage:",
         files={"broken/config.yaml": "stage: nosuch\n"}),
    case("resume-without-checkpoints", ("resume", "{tmp}/runs/keep", "run.progress=false"),
         "{tmp}/runs/keep", "checkpoint"),
    case("overwrite-with-bad-batch", sft_data("d.jsonl", "run.name=keep", "run.overwrite=true",
                                              "train.batch_size=10", "train.micro_batch_size=4"),
         "train.micro_batch_size:", files={"d.jsonl": jsonl(GOOD)}),
]

STAGE_CASES = [
    # Each stage's own checks, before any model is loaded.
    case("ppo-gae-without-critic", stage("ppo", "critic.kind=none"), "critic.kind:", "advantage.estimator=gae"),
    case("ppo-critic-from-missing-rm", stage("ppo", "critic.init=reward_model"), "critic.path:",
         "critic.init=reward_model needs the reward model's directory"),
    case("ppo-prefix-adapter", stage("ppo", "adapter.method=prefix"), "adapter.method:", "prefix-tuning"),
    case("grpo-prefix-adapter", stage("grpo", "adapter.method=prefix"), "adapter.method:",
         "GRPO trains full weights or LoRA"),
    case("ppo-save-inside-round", stage("ppo", "train.save_every=3"), "train.save_every:",
         "checkpoints fall between rounds"),
    case("ppo-rollout-not-multiple", stage("ppo", "update.rollout_batch_size=100", "train.batch_size=64"),
         "update.rollout_batch_size:", "must be a multiple of train.batch_size"),
    case("grpo-filter-low-above-high", stage("grpo", "filter.low=0.9", "filter.high=0.1"), "filter.low:",
         "must not exceed filter.high"),
    case("grpo-adaptive-kl-zero", stage("grpo", "kl.controller=adaptive", "kl.coef=0"), "kl.coef:",
         "adaptive KL controller"),
    case("grpo-one-sample-group", stage("grpo", "sampling.samples_per_prompt=1", "train.batch_size=8",
                                        "train.micro_batch_size=8"), "sampling.samples_per_prompt:", ">= 2"),
    case("ppo-renamed-key", stage("ppo", "ppo.kl_coef=0.1"), "override: ppo.kl_coef: was renamed: use kl.coef"),
    case("rft-grader-missing", stage("rft", "reward.grader={tmp}/none.yaml"),
         "{tmp}/none.yaml: grader file not found"),
    case("rft-offline-eval-split", stage("rft", "mode=offline", "data.eval_split=0.1"), "data.eval_split:",
         "holds none out"),
    case("rejection-fewer-steps-than-rounds", stage("rejection", "rounds=3", "train.max_steps=2"),
         "train.max_steps:", "every one of the 3 rounds"),
    case("rejection-unknown-reward", stage("rejection", "reward.functions={corect: 1.0}"), "reward.functions:",
         "unknown reward function(s) corect"),
    case("rm-prefix-adapter", stage("rm", "adapter.method=prefix"), "adapter.method:", "prefix-tuning"),
    case("rm-lora-unmerged", stage("rm", "adapter.method=lora", "adapter.merge_on_save=false"),
         "adapter.merge_on_save:", "saved merged"),
    case("grpo-reward-model-is-a-causal-lm", stage("grpo", "reward.functions={reward_model: 1.0}",
                                                   "reward.model_path={model}"),
         "reward.model_path: {model} has no trained reward head"),
    case("ppo-critic-from-a-causal-lm", stage("ppo", "critic.kind=separate", "critic.init=reward_model",
                                              "critic.path={model}"),
         "critic.path: {model} has no trained reward head"),
    case("rm-process-without-steps", stage("rm", "kind=process"), "data.source:", "task 'arith' has none",
         "posttrain rm prm"),
    case("rm-sft-rows", stage("rm", "data.source={tmp}/d.jsonl"), "{tmp}/d.jsonl:1:", "chosen",
         files={"d.jsonl": jsonl(GOOD)}),
    case("kto-pair-rows", stage("kto", "data.source={tmp}/p.jsonl"), "{tmp}/p.jsonl:1:", "label",
         files={"p.jsonl": jsonl(PAIR)}),
    case("resume-bad-override", ("resume", "{tmp}/runs/keep", "optim.lrr=1"), "override: optim.lrr:",
         "did you mean 'optim.lr'"),
    case("resume-config-renamed-key", ("resume", "{tmp}/broken"), "{tmp}/broken/config.yaml:3: train.max_stepz:",
         files={"broken/config.yaml": "stage: sft\ntrain:\n  max_stepz: 3\n"}),
    case("eval-run-without-final", ("eval", "{tmp}/unfinished"),
         "{tmp}/unfinished: the run has no final model yet",
         files={"unfinished/config.yaml": "stage: sft\n"}),
]


def eval_data(name: str, *args: str) -> tuple[str, ...]:
    return ("eval", "{model}", "--data", f"{{tmp}}/{name}", "--problems", "2", "--samples", "0", *args)


CATEGORY = {**VERIFIABLE, "category": "addition"}

EVAL_DATA_CASES = [
    # `posttrain eval --data`: a user's verifiable file, checked before anything is generated.
    case("eval-data-empty-file", eval_data("d.jsonl", "--task", "arith"), "{tmp}/d.jsonl: empty file",
         files={"d.jsonl": ""}),
    case("eval-data-missing-prompt", eval_data("d.jsonl", "--task", "arith"), "{tmp}/d.jsonl:2: prompt:",
         "missing column 'prompt'", files={"d.jsonl": jsonl(CATEGORY, {"question": "What is 1+1?", "answer": "2"})}),
    case("eval-data-missing-answer", eval_data("d.jsonl", "--task", "arith"), "{tmp}/d.jsonl:2: answer:",
         "no gold answer", files={"d.jsonl": jsonl(CATEGORY, {"prompt": "What is 1+1?", "category": "addition"})}),
    case("eval-data-category-list", eval_data("d.jsonl", "--task", "arith"), "{tmp}/d.jsonl:2: category:",
         "must be text (or an integer), got list",
         files={"d.jsonl": jsonl(CATEGORY, {**VERIFIABLE, "category": ["a"]})}),
    case("eval-data-category-empty", eval_data("d.csv", "--task", "arith"), "{tmp}/d.csv:3: category:",
         "empty category", files={"d.csv": 'prompt,answer,category\nWhat is 1+1?,2,add\n"What is 2+2?",4," "\n'}),
    case("eval-data-correct-needs-task", eval_data("d.jsonl"), "--task:", "answer",
         files={"d.jsonl": jsonl(CATEGORY)}),
    case("eval-heldout-category-type", stage("grpo", "eval.source={tmp}/held.jsonl"), "{tmp}/held.jsonl:1: category:",
         "got float", files={"held.jsonl": jsonl({**VERIFIABLE, "category": 0.5})}),
    # eval.correct_by names a reward the stage does not have: refused with the rewards, before the run directory.
    *[case(f"eval-correct-by-unknown-{name}", stage(name, *extra, "eval.correct_by=corect"), "eval.correct_by:",
           "'corect' is not one of the reward functions (")
      for name, extra in (("grpo", ()), ("rejection", ()), ("dpo", ("pairs.source=on_policy",)))],
]

ALL_CASES = (STAGE_CASES + CONFIG_CASES + DATA_CASES + MODEL_CASES + REWARD_CASES + BATCH_CASES + RUN_DIR_CASES
             + EVAL_DATA_CASES)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """The built-in tiny model with the project's tokenizer, saved as a model directory (random weights: every
    case fails before it would matter)."""
    from posttrain.config import ModelConfig
    from posttrain.models import build_model
    from posttrain.models.io import save_pretrained

    path = tmp_path_factory.mktemp("tiny-model")
    save_pretrained(build_model(ModelConfig(size="tiny"), tokenizer, seed=0), tokenizer, path)
    return path


def existing_run(path: Path, model: Path) -> None:
    """What a previous run left: its config (for `resume`), metrics, a summary and final weights."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"stage: sft\nrun:\n  name: keep\n  out_dir: {path.parent}\n  progress: false\n"
                                      f"model:\n  path: {model}\ndata:\n  size: 16\ntrain:\n  max_steps: 1\n"
                                      "  batch_size: 4\n  micro_batch_size: 4\neval:\n  problems: 0\n"
                                      "eval_before: false\n", encoding="utf-8")
    (path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n', encoding="utf-8")
    (path / "summary.json").write_text('{"final_loss": 2.25}\n', encoding="utf-8")
    (path / "final").mkdir()
    (path / "final" / "model.safetensors").write_bytes(bytes(range(256)) * 4)


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad", ALL_CASES)
def test_bad_input_is_one_clear_error(bad: Case, tmp_path, model_dir, monkeypatch):
    def fill(text: str) -> str:
        return text.replace("{tmp}", str(tmp_path)).replace("{model}", str(model_dir))

    for name, content in bad.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    for name in bad.model_files:
        (tmp_path / "m").mkdir(exist_ok=True)
        shutil.copy(model_dir / name, tmp_path / "m" / name)
    existing_run(tmp_path / "runs" / "keep", model_dir)
    monkeypatch.setattr(cli, "console", Console(soft_wrap=True))  # rich would wrap long paths mid-word
    monkeypatch.chdir(tmp_path)  # nothing a case does may land in the repository (runs/, caches)
    before = snapshot(tmp_path)

    result = runner.invoke(app, [fill(a) for a in bad.args], terminal_width=2000)

    output = " ".join(result.output.split())  # rich wraps long lines; the words matter, not the breaks
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {type(result.exception).__name__}: {result.exception}\n{output}")
    assert result.exit_code == 2, output
    assert "Traceback" not in result.output
    assert output.startswith("error:") or "\nerror:" in result.output, output
    for words in bad.expect:
        assert fill(words) in output, output
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before, "a file that existed before was changed"
    assert before.keys() <= after.keys(), "a file that existed before was deleted"
    left = sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "keep")
    assert not left, f"the failed start left run directories {left}, which block the retry"


def test_catalogue_size():
    ids = [p.id for p in ALL_CASES]
    assert len(ids) == len(set(ids)) >= 60


def test_a_real_process_exits_2_without_traceback(tmp_path):
    """The catalogue runs in-process; the installed entry point turns the same error into exit status 2."""
    import os
    import subprocess
    import sys

    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"stage: sft\ndescription: caf\xe9\n")
    out = subprocess.run([sys.executable, "-m", "posttrain", "config", str(recipe)], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "COLUMNS": "1000"})  # no wrapping inside the path
    assert out.returncode == 2 and "Traceback" not in out.stdout + out.stderr
    assert f"{recipe}:2: not valid UTF-8" in " ".join(out.stdout.split())


def test_lora_targets_are_checked_before_the_first_evaluation(tmp_path, model_dir, monkeypatch):
    """A LoRA target the model lacks fails before the run spends minutes evaluating the starting model (the
    adapter is applied only after that evaluation)."""
    from posttrain.eval import heldout

    def evaluated(*_, **__):
        raise AssertionError("the starting model was evaluated before the adapter's targets were checked")

    monkeypatch.setattr(heldout.Evaluation, "run", evaluated)
    args = [a.format(model=model_dir, tmp=tmp_path) for a in stage("grpo", "adapter.method=lora",
                                                                    "adapter.target_modules=[fc1]", "eval_before=true")]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 2 and "adapter.target_modules" in result.output, result.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
