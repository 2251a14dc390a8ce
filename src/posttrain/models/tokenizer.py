"""A byte-level BPE tokenizer trained locally with `tokenizers`, with a chat template.

Digits are split one per token before BPE (as Llama 3, Qwen and DeepSeek tokenizers do): when BPE
may merge arbitrary digit runs, "123" and "23" share no structure and arithmetic is unlearnable.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|bos|>"
EOS = "<|end|>"
PAD = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS.values()]

# One turn is `<|role|>content<|end|>`; the whole conversation starts with a single BOS. The
# assistant's content and its closing EOS sit inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly the trained tokens
# (the EOS is trained: it is how the model learns to stop). An assistant turn may carry its chain
# of thought in `reasoning` (or inline as <think>...</think>): it is rendered as a thinking block.
# `enable_thinking=false` renders the generation prompt with an empty thinking block, so one model
# can be trained and prompted in both modes.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ ': use system, user or assistant') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}"
    "{%- if message.get('reasoning') is not none and message.get('reasoning') is defined -%}"
    "<think>{{ message['reasoning'] }}</think>"
    "{%- endif -%}"
    "{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "<|assistant|>"
    "{%- if enable_thinking is defined and enable_thinking is false -%}<think></think>{%- endif -%}"
    "{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` and wrap it for `transformers`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The thinking markers are single tokens but not "special": they stay in decoded text.
    tok.add_tokens([AddedToken(THINK_OPEN, normalized=False), AddedToken(THINK_CLOSE, normalized=False)])
    bos_id = tok.token_to_id(BOS)
    # Plain `tokenizer(text)` starts with BOS (as Llama's does); the chat template writes its own BOS
    # and `apply_chat_template` tokenizes without special tokens, so a chat has exactly one.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS.values()), clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> None:
    tokenizer.save_pretrained(str(directory))
