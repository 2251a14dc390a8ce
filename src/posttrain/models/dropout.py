"""Dropout off: what every stage that compares logprobs (or scores, or values) of one model needs.

PPO's and GRPO's first update must see a ratio of exactly 1 (the policy in train mode is the policy that
sampled), DPO's implicit rewards start at exactly 0 (the policy is its reference), and the sampler's and
the trainer's logprobs must agree: all false while dropout draws a fresh mask in every training forward.
TRL and OpenRLHF turn it off for the same reason.

Dropout lives in three places in transformers models, and all three are set to 0:
- `nn.Dropout` modules (GPT-2's embd/resid/attn dropout, Phi's resid and embed dropout);
- plain float attributes copied from the config at construction and read in forward
  (`LlamaAttention.attention_dropout`, passed to the attention kernel as its dropout probability);
- the config itself, which some models read at forward time (Falcon's `config.attention_dropout`,
  `config.hidden_dropout`). The config saved with the trained model therefore records dropout 0:
  the values it was trained with.

Mixture-of-experts routers draw noise of their own in training mode: Mixtral's and DBRX's jitter scales the
router's input by random factors, and PhiMoE samples its experts (SparseMixer) whenever it trains. Their jitter
settings cannot simply be zeroed (PhiMoE's `router_jitter_noise` is also the threshold its eval routing uses), so
a module that holds a jitter setting > 0 is kept in eval mode: it routes as the sampler does, deterministically.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn
from transformers import PretrainedConfig

# Name parts of dropout probabilities in transformers configs and modules: attention_dropout,
# hidden_dropout, classifier_dropout, resid_pdrop, embd_pdrop, attn_pdrop, encoder_layerdrop...
DROPOUT_NAMES = ("dropout", "pdrop", "layerdrop")


def _is_rate(name: str, value: Any) -> bool:
    return isinstance(value, float) and value > 0 and any(part in name for part in DROPOUT_NAMES)


def _zero_config(config: PretrainedConfig, seen: set[int]) -> None:
    if id(config) in seen:
        return
    seen.add(id(config))
    for name, value in list(vars(config).items()):
        if _is_rate(name, value):
            setattr(config, name, 0.0)
        elif isinstance(value, PretrainedConfig):  # text_config, vision_config... of composite models
            _zero_config(value, seen)


# Set on a model whose dropout `disable_dropout` turned off: an adapter added later (`models.adapters`) keeps its own
# dropout off too, or the stage's train-mode forwards would still draw masks in the adapter's layers.
DISABLED_ATTRIBUTE = "posttrain_dropout_disabled"


def _keep_in_eval_mode(module: nn.Module) -> None:
    """`module.train(True)` leaves it in eval mode from now on (its parents' train() calls included)."""
    module.training = False
    module.train = types.MethodType(lambda self, mode=True: self, module)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability of `model` to 0 (modules, attributes and config), and keep a router that draws
    jitter in training mode in eval mode; returns `model`, marked (`dropout_disabled`) so that an adapter wrapped
    around it later adds none."""
    setattr(model, DISABLED_ATTRIBUTE, True)
    seen: set[int] = set()
    for module in model.modules():
        if any("jitter" in name and isinstance(value, float) and value > 0 for name, value in vars(module).items()):
            _keep_in_eval_mode(module)
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_rate(name, value):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            _zero_config(config, seen)
    return model


def dropout_disabled(model: nn.Module) -> bool:
    """Whether `disable_dropout` turned `model`'s dropout off."""
    return bool(getattr(model, DISABLED_ATTRIBUTE, False))
