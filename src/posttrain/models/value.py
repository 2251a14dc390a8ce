"""The value side of PPO: a critic that scores every prefix, and the actor-critic module PPO trains.

The critic is either a separate value model — a causal LM trunk with a scalar head, i.e. a reward
model's architecture, initialised from a trained reward model (trunk and head) or from the policy's
checkpoint (trunk, with a zero head: every value starts at 0) — or a scalar head on the policy's own
final hidden states (shared trunk: one forward gives logits and values, and no second trunk is kept).

`ActorCritic` holds both, so the Trainer's one optimizer, gradient clipping and checkpoint cover the
critic as well as the actor (as in TRL's PolicyAndValueWrapper): a resumed run restores both
models and both sets of AdamW moments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from posttrain.errors import ConfigError
from posttrain.models.attention import attention_inputs
from posttrain.models.cpu_attention import tree_keywords
from posttrain.models.device import model_device
from posttrain.models.heads import forward_keeping, output_head_at
from posttrain.models.precision import upcast
from posttrain.models.prefix_attention import PrefixTree
from posttrain.models.reward import build_reward_model, load_reward_model, saved_head, trunk_and_head

CRITIC_INITS = ("policy", "reward_model")


def build_value_model(path: str | Path, init: str, *, trust_remote_code: bool = False,
                      dtype: str = "auto", disable_dropout: bool = False, field: str = "critic.path") -> nn.Module:
    """A separate critic: the reward model at `path` (init="reward_model"), or the trunk of the causal LM
    at `path` with a zero-initialised linear head (init="policy"); `disable_dropout`: every dropout off, so
    that the values a round records are those its first update computes; `field` the setting that gave `path`."""
    if init == "reward_model":
        if saved_head(path, field) == "likelihood":
            raise ConfigError(f"{path} is a likelihood reward model, which has no value head to start a critic "
                              "from: critic.init=policy", field="critic.init")
        return load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                 disable_dropout=disable_dropout, field=field).train()
    if init != "policy":
        raise ValueError(f"unknown critic init {init!r}; allowed: {', '.join(CRITIC_INITS)}")
    model = build_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code, disable_dropout=disable_dropout)
    _, head = trunk_and_head(model)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.zero_()
    return model


class ActorCritic(nn.Module):
    """The trained module of PPO: the policy (`actor`) and either a separate `critic` or a `value_head`
    on the actor's final hidden states; with `values=False` the policy alone (critic-free baselines:
    no critic, no head, and `forward` gives no values)."""

    def __init__(self, actor: nn.Module, critic: nn.Module | None = None, *, values: bool = True) -> None:
        super().__init__()
        if critic is not None and not values:
            raise ValueError("a critic-free ActorCritic (values=False) takes no critic")
        self.actor = actor
        self.critic = critic
        self.value_head: nn.Module | None = None
        if critic is None and values:
            # The width of the hidden states the output embedding reads: OPT projects them to word_embed_proj_dim
            # after its last layer, so config.hidden_size is not always it.
            head = actor.get_output_embeddings() if hasattr(actor, "get_output_embeddings") else None
            hidden = getattr(head, "in_features", None) or actor.config.get_text_config().hidden_size
            dtype = next(actor.parameters()).dtype
            # Zero-initialised: every value starts at 0, and the head's first gradients do not disturb the trunk.
            self.value_head = nn.Linear(hidden, 1, dtype=dtype, device=model_device(actor))
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @property
    def shared(self) -> bool:
        return self.value_head is not None

    @property
    def has_values(self) -> bool:
        return self.critic is not None or self.value_head is not None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor,
                keep: int | tuple[Tensor, Tensor],
                tree: Callable[[], PrefixTree] | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits [B, keep, V] and values [B, keep] of the last `keep` positions, or with `keep` = (rows, cols)
        (a padding-free batch) logits [1, N, V] and values [1, N] of the N positions (rows[k], cols[k]): the
        value at a position is that of the prefix ending there (the state from which the next token is
        drawn). None for the values of a critic-free module. `tree`: a padding-free batch's prompts and
        completions (built when called), for the attention of models that take it (`cpu_attention.tree_keywords`)."""
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        inputs = attention_inputs(self.actor, batch)  # a 4-D mask gets the model's sliding window
        if isinstance(keep, tuple):
            def kept(hidden: Tensor) -> Tensor:
                return hidden[keep][None]

            with output_head_at(self.actor, *keep):
                out = self.actor(**inputs, output_hidden_states=self.shared, use_cache=False,
                                 **tree_keywords(self.actor, tree))
        else:
            def kept(hidden: Tensor) -> Tensor:
                return hidden[:, -keep:]

            out = forward_keeping(self.actor, keep, **inputs, output_hidden_states=self.shared)
        if not self.has_values:
            return out.logits, None
        if self.shared:
            values = self.value_head(kept(out.hidden_states[-1])).squeeze(-1)
        else:
            trunk, head = trunk_and_head(self.critic)
            hidden = trunk(**attention_inputs(trunk, batch), use_cache=False, **tree_keywords(trunk, tree))
            values = head(kept(hidden.last_hidden_state)).squeeze(-1)
        return out.logits, upcast(values)  # values feed GAE and the value loss: fp32 under autocast

    def _unique_tensors(self) -> tuple[dict[str, Tensor], list[str]]:
        """The state dict with each shared (tied) tensor once, and the names of the copies left out."""
        seen: set[int] = set()
        tensors, copies = {}, []
        for name, tensor in self.state_dict().items():
            if tensor.data_ptr() in seen:
                copies.append(name)
                continue
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().contiguous()
        return tensors, copies

    @property
    def _tied_weights_keys(self) -> list[str]:
        # What a checkpoint load may find missing: loading the first copy restores the tied ones too.
        return self._unique_tensors()[1]

    def save_pretrained(self, directory: str | Path, safe_serialization: bool = True) -> None:
        """Every tensor of actor and critic in one `model.safetensors` (what a checkpoint restores with
        `load_state_dict`); the policy alone is saved in HF format by the recipe at the end."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file(self._unique_tensors()[0], str(out / "model.safetensors"))


ACTOR_PREFIX = "actor."  # of the policy's tensors in an ActorCritic's `model.safetensors` (its state dict's names)
CRITIC_PREFIXES = ("critic.", "value_head.")  # of the critic's: a separate value model's, or a shared trunk's head
