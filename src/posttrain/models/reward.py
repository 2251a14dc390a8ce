"""Reward models: a causal LM trunk with a scalar head, scored at the last real token.

A reward model is `AutoModelForSequenceClassification` with `num_labels=1`, built from a causal
LM checkpoint (the SFT model): the trunk's weights are loaded, the LM head is dropped and a fresh
`score` head maps the final hidden state to one number. The head is linear (the transformers
default, so the saved model loads with plain `AutoModelForSequenceClassification`) or a small MLP
(hidden -> hidden, GELU, -> 1; recorded in the config as `reward_head`, and loaded with
`load_reward_model`).

Many architectures have no sequence-classification class in transformers (Granite, Cohere, OLMoE, Gemma 4, Llama 4,
GLM-4 MoE, nanochat...: over half of its causal LMs). For those, `register_sequence_classification` builds one
the way transformers builds its own for Llama or Qwen (its `GenericForSequenceClassification`: the architecture's
trunk under the causal LM's prefix, so a causal LM checkpoint's trunk weights load into it, and a linear `score`
without bias) and registers it with `AutoModelForSequenceClassification`, so that every loader in this process
builds, saves and reloads such a reward model or critic as it does the others.

Scores are read here, not by the transformers forward: that one finds the last token that is not
`pad_token_id`, which is wrong whenever the tokenizer pads with its EOS (the last real token *is*
an EOS). Here the position comes from the attention mask — the last attended token whatever the
padding side — and the head runs only on the positions that are read (one per sequence, or one per
reasoning step for a process reward model), never on every token.

A third kind reads the reward where the answer is instead of re-deriving it at one position: the
*likelihood* reward model is the causal LM itself, and its reward is the log-likelihood it gives the
response, scaled: r(x, y) = reward_scale * sum_t log p(y_t | x, y_<t), or with reward_reduction="mean" the
same times 1/|y|, the average log-likelihood per response token (SimPO's length-normalised implicit reward, Meng
et al. 2024: a long right answer is not charged for its length against a short wrong one). Starting from the SFT
model it already ranks answers by how well they agree with what the model knows (a worked step it can check, an
answer it would give) and Bradley–Terry training sharpens that; a fresh scalar head on the last token has to
learn the same information from the comparisons alone. It saves as an ordinary causal LM whose config carries
`reward_head: likelihood`, `reward_scale` and `reward_reduction`, and scores through the same functions and scorers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

from posttrain.algos import last_token_index
from posttrain.errors import ConfigError
from posttrain.models.adapters import refuse_unmerged_adapter
from posttrain.models.attention import attention_inputs
from posttrain.models.cpu_attention import sample_tree_keywords
from posttrain.models.device import default_device
from posttrain.models.dropout import disable_dropout as drop_dropout
from posttrain.models.io import adapter_base, check_model_dir, from_model_dir, load_causal_lm
from posttrain.models.kernels import use_fast_kernels
from posttrain.models.likelihood import per_sequence_means, per_sequence_sums, response_logprobs
from posttrain.models.precision import upcast

REWARD_HEADS = ("linear", "mlp", "likelihood")
LIKELIHOOD_REDUCTIONS = ("sum", "mean")  # of a likelihood reward model's response token logprobs


class MLPHead(nn.Sequential):
    """hidden -> `width` -> 1 with a GELU between: a head with some capacity of its own, for when the
    trunk is frozen and only the head trains."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))


def register_sequence_classification(path: str | Path) -> type | None:
    """The sequence-classification class `AutoModelForSequenceClassification` builds for the model saved at `path`:
    transformers' own, or for an architecture that has none, one made here and registered (see the module doc).
    None for a model of custom code (its `auto_map` decides) or a model type with no trunk class to build on."""
    model_type = json.loads((check_model_dir(path) / "config.json").read_text()).get("model_type")
    if model_type not in CONFIG_MAPPING:
        return None
    config_class = CONFIG_MAPPING[model_type]  # (a lazy mapping: its .get finds nothing)
    registered = AutoModelForSequenceClassification._model_mapping
    if config_class in registered:
        return registered[config_class]
    if config_class not in MODEL_MAPPING:
        return None
    trunk = MODEL_MAPPING[config_class]
    base = next(c for c in trunk.__mro__ if issubclass(c, PreTrainedModel) and c.__name__.endswith("PreTrainedModel"))
    causal = MODEL_FOR_CAUSAL_LM_MAPPING[config_class] if config_class in MODEL_FOR_CAUSAL_LM_MAPPING else None
    # The trunk's attribute is the causal LM's, so that its checkpoint's "model.*" (or "transformer.*") keys land in it.
    prefix = getattr(causal, "base_model_prefix", "") or base.base_model_prefix or "model"
    name = trunk.__name__.removesuffix("Model") + "ForSequenceClassification"
    # Named as the trunk's module: transformers treats a class from outside its package as custom code and skips
    # initialising modules whose own weights all loaded, leaving e.g. Falcon-H1's non-persistent mup_vector unset.
    made = type(name, (GenericForSequenceClassification, base), {"base_model_prefix": prefix,
                                                                 "__module__": trunk.__module__})
    AutoModelForSequenceClassification.register(config_class, made, exist_ok=True)
    return made


def build_reward_model(path: str | Path, *, head: str = "linear", head_width: int = 0, pad_token_id: int | None = None,
                       dtype: str = "auto", trust_remote_code: bool = False, device: torch.device | str | None = None,
                       disable_dropout: bool = False, reward_scale: float = 1.0,
                       reward_reduction: str = "sum") -> PreTrainedModel:
    """A new reward model: the trunk of the causal LM at `path`, a freshly initialised scalar head; or, with
    head="likelihood", the causal LM itself, scoring a response by its log-likelihood (`reward_reduction`: summed
    over the response's tokens, or their mean) times `reward_scale`.

    `head_width` is the MLP head's hidden width (0: the trunk's hidden size). `pad_token_id` is
    written to the config so that transformers' own forward can batch too. `disable_dropout`: every
    dropout off (`models.dropout`), the classifier's included.
    """
    if head not in REWARD_HEADS:
        raise ValueError(f"unknown reward head {head!r}; allowed: {', '.join(REWARD_HEADS)}")
    if reward_reduction not in LIKELIHOOD_REDUCTIONS:
        raise ValueError(f"unknown reward reduction {reward_reduction!r}; allowed: {', '.join(LIKELIHOOD_REDUCTIONS)}")
    options = dict(head=head, head_width=head_width, pad_token_id=pad_token_id, dtype=dtype,
                   trust_remote_code=trust_remote_code, device=device, disable_dropout=disable_dropout,
                   reward_scale=reward_scale, reward_reduction=reward_reduction)
    if adapter_base(path) is not None:
        # A causal LM saved as a LoRA adapter: merged over its base (`io.load_causal_lm`), written out once, and
        # built from as from any model directory (a temporary copy of the weights on disk, for the same code path).
        merged = load_causal_lm(path, trust_remote_code=trust_remote_code, dtype=dtype, device="cpu")
        refuse_unmerged_adapter(merged)
        with tempfile.TemporaryDirectory(prefix="posttrain-merged-") as merged_dir:
            merged.save_pretrained(merged_dir)
            del merged
            return build_reward_model(merged_dir, **options)
    if head != "likelihood":
        register_sequence_classification(path)
    auto_class = AutoModelForCausalLM if head == "likelihood" else AutoModelForSequenceClassification
    extra = {} if head == "likelihood" else {"num_labels": 1}
    model, _ = from_model_dir(auto_class, path, trust_remote_code=trust_remote_code, dtype=dtype, **extra)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if head == "mlp":
        hidden = model.config.get_text_config().hidden_size
        width = head_width or hidden
        model.score = MLPHead(hidden, width).to(dtype=model.dtype)
        model.config.reward_head, model.config.reward_head_width = "mlp", width
    if head == "likelihood":
        model.config.reward_head, model.config.reward_scale = "likelihood", float(reward_scale)
        model.config.reward_reduction = reward_reduction
    use_fast_kernels(model)
    if disable_dropout:
        drop_dropout(model)
    return model.to(device or default_device())


def load_reward_model(path: str | Path, *, dtype: str = "auto", trust_remote_code: bool = False,
                      device: torch.device | str | None = None, disable_dropout: bool = False,
                      field: str = "model.path") -> PreTrainedModel:
    """A saved reward model (either head), ready to score (in eval mode); `disable_dropout` as
    `build_reward_model`'s, for one that trains on (a critic). A model that is no scalar scorer (a head of several
    outputs, or none saved: a causal LM or a base model, whose head transformers would start at random) is a
    one-line error naming `field`."""
    likelihood = saved_head(path, field) == "likelihood"
    if not likelihood:
        register_sequence_classification(path)
    auto_class = AutoModelForCausalLM if likelihood else AutoModelForSequenceClassification
    (model, loading), directory = from_model_dir(auto_class, path, trust_remote_code=trust_remote_code, dtype=dtype,
                                                 field=field, output_loading_info=True)
    config = model.config  # it keeps the reward_head keys build_reward_model wrote
    mlp = getattr(config, "reward_head", "linear") == "mlp"
    if not likelihood:  # an MLP head's weights are saved under other names than the linear `score` built here
        _check_scalar_head(model, [] if mlp else loading["missing_keys"], directory, field)
    if mlp:
        # transformers built (and could not fill) a linear `score`: put the MLP back and load its weights.
        model.score = MLPHead(config.get_text_config().hidden_size, config.reward_head_width).to(model.dtype)
        head = {k.removeprefix("score."): v for file in sorted(directory.glob("*.safetensors"))
                for k, v in load_file(str(file)).items() if k.startswith("score.")}
        model.score.load_state_dict(head)
    use_fast_kernels(model)
    if disable_dropout:
        drop_dropout(model)
    return model.to(device or default_device()).eval()


def _check_scalar_head(model: PreTrainedModel, missing: list[str], directory: Path, field: str) -> None:
    """A reward model's head has one output, and its weights were saved (none of `missing`)."""
    if any(k.startswith("score.") for k in missing):
        raise ConfigError(f"{directory} has no trained reward head ({', '.join(sorted(missing))} not saved): a causal "
                          "LM or a base model, not a reward model (train one with `posttrain rm`)", field=field)
    outputs = model.config.num_labels
    if outputs != 1:
        raise ConfigError(f"{directory} is a classifier with {outputs} outputs (num_labels), not a reward model "
                          "with one score", field=field)


def saved_head(path: str | Path, field: str = "model.path") -> str:
    """The head of the reward model saved at `path` (linear, mlp or likelihood), from its config.json."""
    config = json.loads((check_model_dir(path, field) / "config.json").read_text())
    return config.get("reward_head", "linear")


def is_likelihood_model(model: nn.Module) -> bool:
    """Whether `model` (or the model inside a peft wrapper) is a likelihood reward model."""
    return getattr(model.config, "reward_head", None) == "likelihood"


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer trunk (hidden states out) and the scalar head of a reward model, through any
    peft wrapper (LoRA layers are injected in place, so the unwrapped trunk still runs them)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.score


def freeze_backbone(model: nn.Module) -> None:
    """Train the head only: every trunk parameter stops requiring a gradient."""
    trunk, _ = trunk_and_head(model)
    for parameter in trunk.parameters():
        parameter.requires_grad_(False)


def _hidden_states(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, nn.Module]:
    """The trunk's last hidden states [B, T, H] for `batch`, and the head that scores them."""
    trunk, head = trunk_and_head(model)
    return trunk(**attention_inputs(trunk, batch), **sample_tree_keywords(trunk, batch),
                 use_cache=False).last_hidden_state, head


def scores_at(model: nn.Module, batch: dict[str, Tensor], positions: Tensor) -> Tensor:
    """Head outputs at `positions` [B, S] (token indices) of each row: [B, S]."""
    if is_likelihood_model(model):
        raise ValueError("a likelihood reward model scores whole responses; it has no head to read at positions")
    hidden, head = _hidden_states(model, batch)
    picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, S, H]
    return upcast(head(picked).squeeze(-1))  # scores feed losses and advantages: fp32 under autocast


def sample_end_index(sample_ids: Tensor) -> Tensor:
    """Flat index (row * T + column) of the last token of every sample of packed rows (`sample_ids`
    [R, T], -1 on padding): [N], in sample order."""
    ids = sample_ids.reshape(-1)
    real = ids >= 0
    positions = torch.arange(len(ids), device=ids.device)
    ends = torch.zeros(int(ids.max()) + 1, dtype=torch.long, device=ids.device)
    return ends.scatter_reduce(0, ids[real], positions[real], reduce="amax")


def sequence_scores(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The reward of every sequence, read at its last real token: [B] for a padded batch (either
    side), [N] in sample order for a padding-free one (sequences packed into rows, `sample_ids`; or with shared
    prompts, at `sequence_ends`).
    A likelihood reward model sums (or averages) the logprobs of the batch's trained tokens instead (those
    `batch["response_mask"]` marks, or a shared-prompt batch's `targets`)."""
    if is_likelihood_model(model):
        logprobs, mask = response_logprobs(model, batch)
        mean = getattr(model.config, "reward_reduction", "sum") == "mean"  # saved before the option: summed
        reduce = per_sequence_means if mean else per_sequence_sums
        return model.config.reward_scale * reduce(upcast(logprobs), mask, batch)
    if "sample_ids" in batch or "sequence_ends" in batch:
        hidden, head = _hidden_states(model, batch)
        ends = batch["sequence_ends"] if "sequence_ends" in batch else sample_end_index(batch["sample_ids"])
        return upcast(head(hidden.flatten(0, 1)[ends]).squeeze(-1))
    return scores_at(model, batch, last_token_index(batch["attention_mask"]).unsqueeze(-1)).squeeze(-1)
