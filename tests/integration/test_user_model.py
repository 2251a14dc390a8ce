"""A user's own model and files through the CLI: a tiny Qwen2 with a ChatML tokenizer (bos_token = <|im_start|>,
Qwen2.5's chat template with tool calls) trains SFT with LoRA on tool-calling conversations, DPO on implicit-prompt
pairs and GRPO on prompt-only rows scored by the reward functions of a Python file, each from a shipped example file,
with no tokenizer edits; every final/ loads back in transformers. Then SFT on plain text rows."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from typer.testing import CliRunner

from posttrain.cli import app
from posttrain.train.metrics import read_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = ["run.progress=false", "train.save_every=0", "optim.warmup_steps=0", "eval.samples=1"]
runner = CliRunner()


def _run(stage: str, out: Path, name: str, *overrides: str) -> dict:
    result = runner.invoke(app, [stage, stage, f"run.out_dir={out}", f"run.name={name}", *FAST, *overrides],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    return json.loads((out / name / "summary.json").read_text())


def _loads_back(final: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    assert tokenizer.chat_template and tokenizer.bos_token == "<|im_start|>" and model.config.model_type == "qwen2"


def test_chatml_model_through_sft_lora_dpo_and_grpo(tmp_path, chatml_model_dir):
    _run("sft", tmp_path, "sft", f"model.path={chatml_model_dir}", f"data.source={EXAMPLES}/tool_calls.jsonl",
         "adapter.method=lora", "train.max_steps=3", "train.batch_size=4", "train.micro_batch_size=4",
         "data.eval_split=0.1")
    sft = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert len(sft) == 3 and all(0 < m["loss"] < 20 for m in sft)
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())["summary"]
    # every token the steps read, prompts included: not called trained tokens, which it is not
    assert "trained_tokens" not in summary and summary["tokens"] > summary["data"]["response_tokens"]
    assert "eval_loss" in sft[-1] and "| eval loss |" in (tmp_path / "sft" / "report.md").read_text()
    _loads_back(tmp_path / "sft" / "final")

    _run("dpo", tmp_path, "dpo", f"model.path={tmp_path}/sft/final",
         f"data.source={EXAMPLES}/preference_implicit.jsonl", "train.max_steps=2", "train.batch_size=4",
         "train.micro_batch_size=4", "loss.sft_weight=0")
    dpo = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    assert abs(dpo[0]["loss"] - 0.6931) < 1e-3 and abs(dpo[0]["reward_margin"]) < 1e-5  # policy == reference
    _loads_back(tmp_path / "dpo" / "final")

    functions = f"{{{EXAMPLES}/rewards.py:matches_solution: 1.0, {EXAMPLES}/rewards.py:brevity: 0.1}}"
    _run("grpo", tmp_path, "grpo", f"model.path={chatml_model_dir}", f"data.source={EXAMPLES}/prompt_only.jsonl",
         f"reward.functions={functions}", "train.max_steps=2", "train.batch_size=16", "train.micro_batch_size=16",
         "sampling.samples_per_prompt=4", "sampling.max_new_tokens=8", "data.eval_split=0.1")
    grpo = read_metrics(tmp_path / "grpo" / "metrics.jsonl")
    brevity = f"reward_{EXAMPLES}/rewards.py:brevity"
    assert len(grpo) == 2 and grpo[0]["ratio"] == 1.0 and grpo[0]["logprob_mismatch"] < 1e-5
    assert grpo[0][brevity] < 0  # the file's own function scored the completions, below 0 as it may
    assert "| eval reward |" in (tmp_path / "grpo" / "report.md").read_text()  # the held-out 10%, greedy
    samples = [json.loads(line) for line in (tmp_path / "grpo" / "samples.jsonl").read_text().splitlines()]
    rollouts = [s for s in samples if "group" in s]
    assert rollouts and all(s["answer"] is None for s in rollouts)  # prompt-only rows
    _loads_back(tmp_path / "grpo" / "final")


def test_text_rows_train_sft_from_the_example_file(tmp_path, chatml_model_dir):
    _run("sft", tmp_path, "lm", f"model.path={chatml_model_dir}", f"data.source={EXAMPLES}/text.jsonl",
         "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4")
    metrics = read_metrics(tmp_path / "lm" / "metrics.jsonl")
    assert len(metrics) == 2 and metrics[0]["loss"] > 0


def test_exported_model_stops_where_the_run_sampled_to_a_base_models_end_of_turn(tmp_path, base_chatml_model_dir):
    """A base Qwen's generation_config names EOS (<|endoftext|>) alone: the export adds the template's <|im_end|>
    that the run trained answers to end with (and sampled up to), so transformers' generate stops there too;
    through LoRA's merged save, with the configured EOS kept first."""
    tokenizer = AutoTokenizer.from_pretrained(base_chatml_model_dir)
    eos, im_end = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert GenerationConfig.from_pretrained(base_chatml_model_dir).eos_token_id == eos
    _run("sft", tmp_path, "sft", f"model.path={base_chatml_model_dir}", f"data.source={EXAMPLES}/tool_calls.jsonl",
         "adapter.method=lora", "train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2")
    assert GenerationConfig.from_pretrained(tmp_path / "sft" / "final").eos_token_id == [eos, im_end]
    # not marked as made from config.json, which older transformers' generate would make it from again
    assert not json.loads((tmp_path / "sft" / "final" / "generation_config.json").read_text()).get(
        "_from_model_config")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "final")
    assert model.generation_config.eos_token_id == [eos, im_end]
