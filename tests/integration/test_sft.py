"""SFT: adapters behave as peft promises, the recipe trains and writes a complete run directory."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.algos import token_logprobs
from posttrain.config import load_config
from posttrain.data.config import DataConfig
from posttrain.data.pipeline import prepare_data
from posttrain.data.tasks import get_task
from posttrain.eval.accuracy import dev_problems, heldout_accuracy
from posttrain.eval.evaluate import EvalOptions, evaluate
from posttrain.models.adapters import AdapterConfig, apply_adapter, save_trained
from posttrain.models.likelihood import response_logprobs
from posttrain.recipes import find_recipe
from posttrain.recipes.sft import SFTConfig, main, sft_loss_fn
from posttrain.train.metrics import read_metrics


@pytest.fixture()
def batch(tokenizer):
    prepared = prepare_data(DataConfig(source="arith", size=16, max_length=256), tokenizer,
                            accepts=("completion", "messages"))
    return prepared.collator([prepared.dataset[i] for i in range(8)])


def _train_one_step(model, batch, lr=1e-2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss, _ = sft_loss_fn(model, batch, normaliser=float(batch["response_mask"].sum()))
    loss.backward()
    optimizer.step()


def test_response_logprobs_match_full_logits(tiny_model, batch):
    logprobs, mask = response_logprobs(tiny_model, batch)
    logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        position_ids=batch["position_ids"]).logits
    reference = token_logprobs(logits[:, :-1], batch["labels"][:, 1:])
    torch.testing.assert_close((logprobs * mask).sum(dim=1), reference.sum(dim=1))
    assert mask.sum() == (batch["labels"] != -100).sum()


def test_lora_at_init_gives_the_base_outputs(tiny_model, batch):
    base = tiny_model(input_ids=batch["input_ids"]).logits
    lora = apply_adapter(copy.deepcopy(tiny_model), AdapterConfig(method="lora", r=4))
    torch.testing.assert_close(lora(input_ids=batch["input_ids"]).logits, base, rtol=0, atol=0)


def test_lora_trains_only_the_adapter_and_merges_exactly(tiny_model, tokenizer, batch, tmp_path):
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    lora = apply_adapter(tiny_model, AdapterConfig(method="lora", r=4))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _train_one_step(lora, batch)
    lora.eval()
    unmerged = lora(input_ids=batch["input_ids"]).logits
    saved = save_trained(lora, tokenizer, tmp_path / "merged", AdapterConfig(method="lora", r=4))
    merged = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True).eval()
    torch.testing.assert_close(merged(input_ids=batch["input_ids"]).logits, unmerged, rtol=1e-5, atol=1e-5)
    for name, value in lora.get_base_model().state_dict().items():  # the frozen base did not move
        key = name.replace(".base_layer", "")
        if key in base_state:
            torch.testing.assert_close(value, base_state[key], rtol=0, atol=0)


def test_prefix_tuning_changes_only_the_prefix(tiny_model, batch):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    prefixed = apply_adapter(tiny_model, AdapterConfig(method="prefix", num_virtual_tokens=4))
    trainable = {n: p.detach().clone() for n, p in prefixed.named_parameters() if p.requires_grad}
    assert trainable and all("prompt_encoder" in n for n in trainable)
    _train_one_step(prefixed, batch)
    for name, value in prefixed.get_base_model().state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    changed = [n for n, p in prefixed.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert changed == list(trainable)


def test_a_prefix_tuning_stage_runs_on_padded_batches_and_samples_its_accuracy(tiny_model, tokenizer, tmp_path):
    """The recipe's padding-free batches switch to padded ones (peft widens a 2-D mask for the virtual tokens, not
    a 4-D block mask: "Tensors must have same number of dimensions"), and the held-out accuracy is sampled from
    the prefix-tuned model (the rollout engine refused it, after the last step)."""
    from posttrain.models import save_pretrained

    model_dir = save_pretrained(tiny_model, tokenizer, tmp_path / "base")
    result = main(load_config(SFTConfig, find_recipe("sft").path, [
        f"model.path={model_dir}", f"run.out_dir={tmp_path}", "run.progress=false", "data.source=arith",
        "data.size=16", "train.max_steps=2", "train.batch_size=4", "train.micro_batch_size=4", "train.save_every=0",
        "eval_before=false", "eval.problems=4", "eval.max_new_tokens=4", "adapter.method=prefix",
        "adapter.num_virtual_tokens=4"]))
    assert "batch_mode: padded" in (result.run_dir / "config.yaml").read_text()
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert "eval_accuracy" in metrics[-1] and (result.final_dir / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_an_adapter_directory_loads_over_its_base_model(tiny_model, tokenizer, batch, tmp_path, method):
    """A stage saved with LoRA and merge_on_save=false, or with prefix-tuning, leaves a peft adapter directory (no
    config.json). It loads over the base model peft recorded, computing what peft computes: LoRA merged (every
    weight trainable again, so the next stage trains on it), prefix-tuning as the peft model, which
    `posttrain eval` takes and a training stage refuses with a one-line error."""
    from peft import PeftModel

    from posttrain.errors import ConfigError
    from posttrain.eval.evaluate import resolve_target
    from posttrain.models import load_causal_lm, load_tokenizer, save_pretrained
    from posttrain.models.adapters import check_adapter
    from posttrain.models.reward import build_reward_model

    base_dir = save_pretrained(tiny_model, tokenizer, tmp_path / "base")
    adapter = AdapterConfig(method=method, r=4, num_virtual_tokens=4, merge_on_save=False)
    model = apply_adapter(load_causal_lm(base_dir), adapter)
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, the prefix at random
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.5)
    saved = save_trained(model, tokenizer, tmp_path / "run" / "final", adapter)
    assert not (saved / "config.json").exists() and (saved / "adapter_config.json").is_file()
    (tmp_path / "run" / "config.yaml").write_text("run: {seed: 0}\n")  # a finished run whose final/ is the adapter
    assert resolve_target(tmp_path / "run").model_dir == saved
    with torch.no_grad():  # in float64: merging LoRA sums in another order than applying it
        expected = PeftModel.from_pretrained(load_causal_lm(base_dir, dtype="float64"), str(saved)).eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = load_causal_lm(saved, dtype="float64").eval()(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)
    loaded = load_causal_lm(saved)
    plain = load_causal_lm(base_dir)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (logits - plain).abs().max() > 1e-3  # the adapter is in it
    assert load_tokenizer(saved).get_vocab() == tokenizer.get_vocab()
    assert resolve_target(saved).model_dir == saved
    if method == "lora":
        assert not hasattr(loaded, "peft_config") and all(p.requires_grad for p in loaded.parameters())
        check_adapter(loaded, AdapterConfig(method="lora"))  # trains on, with a new adapter or none
        trunk = dict(build_reward_model(saved).model.named_parameters())  # a reward model or critic built on it
        assert trunk.keys() == dict(loaded.model.named_parameters()).keys()
        assert all(torch.equal(trunk[name], value) for name, value in loaded.model.named_parameters())
    else:
        with pytest.raises(ConfigError, match="model.path: is a prefix-tuning adapter, which cannot merge"):
            check_adapter(loaded, AdapterConfig())
        with pytest.raises(ConfigError, match="model.path: is a prefix-tuning adapter, which cannot merge"):
            build_reward_model(saved)


def test_tied_embeddings_survive_training_and_saving(tokenizer, batch, tmp_path):
    from posttrain.config import ModelConfig
    from posttrain.models import build_model

    model = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    _train_one_step(model, batch)
    saved = save_trained(model, tokenizer, tmp_path / "tied", AdapterConfig())
    reloaded = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(reloaded(input_ids=batch["input_ids"]).logits,
                               model(input_ids=batch["input_ids"]).logits)


def test_lora_merged_into_bfloat16_weights_keeps_the_update(tiny_model, tokenizer, batch, tmp_path):
    """Rounded back to bfloat16, about half of a LoRA update was lost (live vs saved logits 0.21 apart)."""
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    lora = apply_adapter(model, AdapterConfig(method="lora", r=4))
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02, generator=torch.Generator().manual_seed(0))
    lora.eval()

    def logits_of(merged_weights: dict[str, torch.Tensor]) -> torch.Tensor:
        # In the fp32 model the saved weights load into (the bf16 model's RoPE frequencies are rounded to bf16), and in
        # float64: MKL's fp32 products round differently from run to run (its thread count follows the machine's
        # load), by up to 1.4e-4 in these logits on an AVX2-only Zen 3.
        reference = copy.deepcopy(tiny_model)
        reference.load_state_dict(merged_weights)
        with torch.no_grad():
            return reference.double()(input_ids=batch["input_ids"]).logits

    base = lora.get_base_model()
    expected = logits_of(copy.deepcopy(lora).float().merge_and_unload().state_dict())  # the adapter taken exactly
    rounded = logits_of(copy.deepcopy(lora).merge_and_unload().state_dict())  # merged into the bf16 weights
    saved = save_trained(lora, tokenizer, tmp_path / "merged", AdapterConfig(method="lora", r=4))
    merged = AutoModelForCausalLM.from_pretrained(saved, local_files_only=True).eval()
    assert merged.dtype == torch.float32 and base.dtype == torch.bfloat16
    with torch.no_grad():
        logits = merged.double()(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(logits, expected)  # float64's tolerance
    assert (rounded - expected).abs().max() > 1e-3  # what a bfloat16 merge would have lost


def test_lora_on_a_tied_head_and_an_unmerged_adapter_over_an_adapter_are_refused(tokenizer, tmp_path):
    """Merged, a LoRA on a tied lm_head changes the input embeddings too; an adapter trained on a model that is
    itself an adapter would be saved over the original base, without the first adapter."""
    from posttrain.config import ModelConfig
    from posttrain.errors import ConfigError
    from posttrain.models import build_model, load_causal_lm, save_pretrained
    from posttrain.models.adapters import check_adapter, check_adapter_start

    tied = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    for targets in (["q_proj", "lm_head"], ["embed_tokens"]):
        with pytest.raises(ConfigError, match="tied embeddings") as err:
            check_adapter(tied, AdapterConfig(method="lora", target_modules=targets))
        assert err.value.field == "adapter.target_modules"
    check_adapter(tied, AdapterConfig(method="lora", target_modules=["q_proj", "v_proj"]))
    untied = build_model(ModelConfig(size="tiny"), tokenizer, seed=0)
    check_adapter(untied, AdapterConfig(method="lora", target_modules=["q_proj", "lm_head"]))

    base = save_pretrained(untied, tokenizer, tmp_path / "base")
    first = AdapterConfig(method="lora", r=4, merge_on_save=False)
    adapter_dir = save_trained(apply_adapter(load_causal_lm(base), first), tokenizer, tmp_path / "first", first)
    for second in (first, AdapterConfig(method="prefix")):
        with pytest.raises(ConfigError, match="save merged") as err:
            check_adapter_start(str(adapter_dir), second)
        assert err.value.field == "adapter.merge_on_save"
    check_adapter_start(str(adapter_dir), AdapterConfig(method="lora"))  # merged on save: the chain is whole
    check_adapter_start(str(base), first)  # over a plain model: an adapter over that model


def test_float16_weights_are_refused_before_anything_loads(tmp_path):
    """AdamW in float16 (eps 1e-8 below its resolution) diverged silently: 8.2 -> 67 in six steps."""
    from posttrain.errors import ConfigError
    from posttrain.recipes import run_stage

    with pytest.raises(ConfigError, match="float16 weights do not train without loss scaling") as err:
        run_stage("sft", None, ["model.path=does-not-exist", "model.dtype=float16", f"run.out_dir={tmp_path}"])
    assert err.value.field == "model.dtype" and not any(tmp_path.iterdir())


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_sft_recipe_runs_and_writes_a_complete_run(pretrained_run, tmp_path, adapter):
    recipe = find_recipe("sft")
    cfg = load_config(SFTConfig, recipe.path, [
        f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
        f"adapter.method={adapter}", "data.size=32", "train.max_steps=6", "train.batch_size=16",
        "train.micro_batch_size=8", "train.save_every=3", "eval.problems=16", "eval.samples=4",
        # LoRA trains few weights and wants a high rate; at 3e-3 full fine-tuning overshoots (the loss doubles).
        f"optim.lr={3e-3 if adapter == 'lora' else 1e-3}", "optim.warmup_steps=0"])
    result = main(cfg)
    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "report.md", "plots/curves.png",
                 "final/model.safetensors", "final/tokenizer.json", "checkpoints/step-6/COMPLETE"):
        assert (run / name).is_file(), name
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 7))
    # 32 rows in steps of 16: steps 5-6 see the same rows as steps 1-2, two epochs later.
    assert metrics[4]["loss"] + metrics[5]["loss"] < metrics[0]["loss"] + metrics[1]["loss"]
    assert 0.0 <= result.summary["accuracy"] <= 1.0 and "accuracy_before" in result.summary
    AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True)
    # A checkpoint's model directory carries the tokenizer: it loads, and is evaluated, on its own.
    checkpoint = run / "checkpoints" / "step-6" / "model"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(result.final_dir, local_files_only=True).get_vocab()
    assert evaluate(checkpoint, EvalOptions(problems=4, samples=0), write=False)["problems"] == 4
    assert evaluate(checkpoint.parent, EvalOptions(problems=4, samples=0), write=False)["model"] == str(checkpoint)


def test_sft_stops_on_its_dev_draw_and_scores_the_heldout_problems_where_it_stopped(pretrained_run, tmp_path):
    """eval.dev_problems with train.stop_when: the dev draw is scored at every evaluation, the held-out problems
    only at the step the rule ended the run (an always-met rule: the first evaluation)."""
    recipe = find_recipe("sft")
    overrides = [f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
                 "data.size=32", "train.max_steps=6", "train.batch_size=16", "train.micro_batch_size=16",
                 "train.save_every=0", "train.eval_every=2", "eval.problems=6", "eval.dev_problems=5",
                 "eval.max_new_tokens=8", "eval_before=false"]
    cfg = load_config(SFTConfig, recipe.path, [*overrides, "run.name=stops", "train.stop_when=dev_accuracy >= 0"])
    result = main(cfg)
    metrics = read_metrics(result.run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and result.summary["steps"] == 2
    assert result.summary["stopped_by"].startswith("dev_accuracy = ")
    assert {"dev_accuracy", "eval_accuracy"} <= set(metrics[-1])
    recorded = json.loads((result.run_dir / "heldout_problems.json").read_text())
    assert recorded["step"] == 2 and recorded["accuracy"]["problems"] == 6
    # the dev accuracy is that of the stopped model on the dev draw, apart from the 6 held-out problems
    tokenizer = AutoTokenizer.from_pretrained(result.final_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(result.final_dir, local_files_only=True)
    examples = dev_problems(get_task("arith"), 5, 6, cfg.eval.seed)
    accuracy = heldout_accuracy(model, tokenizer, cfg.data, dataclasses.replace(cfg.eval, task="arith"),
                                examples=examples)
    assert result.summary["dev_accuracy"] == metrics[-1]["dev_accuracy"] == accuracy.accuracy
    assert accuracy.problems == 5

    never = main(load_config(SFTConfig, recipe.path,
                             [*overrides, "run.name=never", "train.stop_when=dev_accuracy > 1"]))
    metrics = read_metrics(never.run_dir / "metrics.jsonl")
    assert never.summary["steps"] == 6 and "stopped_by" not in never.summary
    assert [("dev_accuracy" in m, "eval_accuracy" in m) for m in metrics if m["step"] % 2 == 0] == \
        [(True, False), (True, False), (True, True)]


def test_a_run_stopped_before_its_first_evaluation_resumes_with_one_copy_of_the_starting_samples(
        pretrained_run, tmp_path, resumes_bitwise):
    """The resumed process evaluates the starting model again (for its summary): its samples, recorded by the first
    process, are not appended a second time (before, samples.jsonl had every step-0 sample twice)."""
    settings = [f"model.path={pretrained_run.final_dir}", f"run.out_dir={tmp_path}", "run.progress=false",
                "data.size=16", "train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=8",
                "train.save_every=1", "eval.problems=4", "eval.samples=2", "eval.max_new_tokens=4", "eval_before=true"]

    def run(*overrides: str):
        return main(load_config(SFTConfig, find_recipe("sft").path, [*settings, *overrides]))

    full = run("run.name=full")
    steps = [r["step"] for r in read_metrics(full.run_dir / "samples.jsonl")]
    assert steps.count(0) > 0 and set(steps) == {0, 2}  # the starting model's and the final model's only
    resumes_bitwise(full, lambda name: run(f"run.name={name}", "run.resume=true"))


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_an_adapter_directory_names_its_base_by_a_path_that_holds_from_anywhere(tiny_model, tokenizer, tmp_path,
                                                                                method, monkeypatch):
    """A base named relative to where the run started (`model.path=runs/base`) was recorded as typed: read from
    another directory the adapter found no base, and peft took the name for a Hub model to download."""
    import json

    from posttrain.models import load_causal_lm, save_pretrained
    from posttrain.models.io import adapter_base

    save_pretrained(tiny_model, tokenizer, tmp_path / "runs" / "base")
    monkeypatch.chdir(tmp_path)
    adapter = AdapterConfig(method=method, r=4, num_virtual_tokens=4, merge_on_save=False)
    saved = save_trained(apply_adapter(load_causal_lm("runs/base"), adapter), tokenizer, tmp_path / "final", adapter)
    recorded = json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "runs" / "base").resolve())
    monkeypatch.chdir(tmp_path / "runs")
    assert adapter_base(saved) == tmp_path / "runs" / "base"
