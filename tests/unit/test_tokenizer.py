"""The offline tokenizer: round trips, digit splitting, special tokens, chat template and masks."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from posttrain.models.tokenizer import BOS, EOS, PAD

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 40*4?"},
    {"role": "assistant", "content": "160"},
]


@pytest.mark.parametrize("text", ["What is 12+345? 357", "héllo wörld ✓ 日本", "  two  spaces\nand a newline\t",
                                  "-47 is minus forty-seven", ""])
def test_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_round_trip_keeps_special_tokens(tokenizer):
    text = f"{BOS}<|user|>hi{EOS}<|assistant|><think>1+1=2</think>2{EOS}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_ids_to_tokens(ids)[:2] == [BOS, "<|user|>"]


def test_digits_are_one_token_each(tokenizer):
    tokens = tokenizer.tokenize("x 1234567890 y")
    digits = [t for t in tokens if t.isdigit()]
    assert digits == list("1234567890")


def test_special_tokens_distinct(tokenizer):
    assert tokenizer.pad_token == PAD and tokenizer.eos_token == EOS and tokenizer.bos_token == BOS
    ids = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    assert len(ids) == 3
    assert len(tokenizer) <= 1024


def test_plain_text_starts_with_one_bos(tokenizer):
    ids = tokenizer("What is 1+1?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_chat_template_has_exactly_one_bos_and_assistant_mask(tokenizer):
    out = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id

    # Hand-built expectation: tokenize each piece separately and mark only assistant content + EOS.
    def piece(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    expected_ids, expected_mask = [tokenizer.bos_token_id], [0]
    for message in CHAT:
        head = piece(f"<|{message['role']}|>")
        body = piece(message["content"]) + [tokenizer.eos_token_id]
        trained = 1 if message["role"] == "assistant" else 0
        expected_ids += head + body
        expected_mask += [0] * len(head) + [trained] * len(body)
    assert ids == expected_ids
    assert mask == expected_mask


def test_reasoning_renders_as_thinking_block_inside_the_mask(tokenizer):
    chat = [{"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "5", "reasoning": "2+3=5"}]
    out = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    trained = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == f"<think>2+3=5</think>5{EOS}"


def test_generation_prompt_and_thinking_switch(tokenizer):
    chat = CHAT[:2]
    on = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    off = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert on.endswith("<|assistant|>")
    assert off.endswith("<|assistant|><think></think>")


def test_unknown_role_is_rejected(tokenizer):
    with pytest.raises(Exception, match="unknown role tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_reload_with_autotokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    out_a = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    out_b = loaded.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out_a["input_ids"] == out_b["input_ids"] and out_a["assistant_masks"] == out_b["assistant_masks"]
    assert loaded("12")["input_ids"] == tokenizer("12")["input_ids"]


def test_a_tokenizer_without_a_pad_token_pads_with_eos_in_memory_and_is_saved_as_it_came(chatml_tokenizer, tiny_model,
                                                                                        tmp_path):
    """posttrain pads with EOS where a tokenizer has no pad token; written into final/, a trainer that masks the pad
    token's labels (as TRL's collators do) would never train the EOS of the model saved."""
    import copy

    from posttrain.models import load_tokenizer, save_pretrained

    bare = copy.deepcopy(chatml_tokenizer)
    bare.pad_token = None
    bare.save_pretrained(tmp_path / "user")
    (tmp_path / "user" / "config.json").write_text('{"model_type": "llama"}')
    loaded = load_tokenizer(tmp_path / "user")
    assert loaded.pad_token == loaded.eos_token  # for batching here
    save_pretrained(tiny_model, loaded, tmp_path / "final")
    assert AutoTokenizer.from_pretrained(tmp_path / "final").pad_token is None
    assert loaded.pad_token == loaded.eos_token  # the live tokenizer keeps it
    assert load_tokenizer(tmp_path / "final").pad_token == loaded.eos_token
