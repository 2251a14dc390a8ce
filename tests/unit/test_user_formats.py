"""TRL's dataset conventions, as a user brings them: text rows, implicit-prompt pairs, prompt-only RL rows with
extra columns, tool-call turns; each read from the shipped example files and checked against rows worked by hand."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from posttrain.data import DataConfig, load_rows, tokenize_rows
from posttrain.data.config import STAGE_FORMATS
from posttrain.data.schemas import message
from posttrain.errors import DataError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _rows(tmp_path, source, stage, **kwargs):
    return load_rows(DataConfig(source=str(source), cache_dir=str(tmp_path / "cache"), **kwargs), STAGE_FORMATS[stage])


def _jsonl(tmp_path, *rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_rows_train_every_token_and_the_eos(tmp_path, tokenizer):
    rows = _rows(tmp_path, EXAMPLES / "text.jsonl", "sft")
    assert rows.format == "text" and len(rows.dataset) == 24
    tokenized = tokenize_rows(rows, tokenizer, DataConfig())
    first = tokenized.dataset[0]
    text = json.loads((EXAMPLES / "text.jsonl").read_text().splitlines()[0])["text"]
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert first["input_ids"] == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
    assert first["response_mask"] == [0] + [1] * (len(body) + 1)


def test_implicit_prompt_pairs_split_at_the_shared_beginning(tmp_path):
    rows = _rows(tmp_path, EXAMPLES / "preference_implicit.jsonl", "dpo").dataset
    raw = [json.loads(line) for line in (EXAMPLES / "preference_implicit.jsonl").read_text().splitlines()]
    # Texts: the prompt ends at the last space before the first differing character (TRL's extract_prompt).
    chosen, rejected = raw[0]["chosen"], raw[0]["rejected"]
    cut = chosen.rindex(" ", 0, next(i for i, (a, b) in enumerate(zip(chosen, rejected, strict=False)) if a != b) + 1)
    assert rows[0]["prompt"] == [message("user", chosen[:cut])]
    assert rows[0]["chosen"] == [message("assistant", chosen[cut:])]
    assert rows[0]["rejected"] == [message("assistant", rejected[cut:])]
    assert rows[0]["prompt"][0]["content"] + rows[0]["chosen"][0]["content"] == chosen  # plain text reproduces it
    # Conversations: the shared turns are the prompt, the differing assistant turns the answers.
    user, answer = raw[1]["chosen"]
    assert rows[1]["prompt"] == [message("user", user["content"])]
    assert rows[1]["chosen"] == [message("assistant", answer["content"])]
    assert rows[1]["rejected"] == [message("assistant", raw[1]["rejected"][1]["content"])]


@pytest.mark.parametrize(("row", "field", "words"), [
    ({"chosen": "abc", "rejected": "xyz"}, "prompt", "share no beginning"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "2"}]},
     "prompt", "first message"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"},
                   {"role": "user", "content": "more"}]}, "chosen[2]", "must be an assistant turn"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "1"}], "rejected": "a 2"},
     "rejected", "both be conversations"),
])
def test_implicit_prompt_pairs_without_a_usable_prompt_are_errors(tmp_path, row, field, words):
    path = _jsonl(tmp_path, row)
    with pytest.raises(DataError) as err:
        _rows(tmp_path, path, "dpo")
    assert (err.value.file, err.value.line, err.value.field) == (str(path), 1, field) and words in str(err.value)


def test_prompt_only_rows_keep_every_column_for_rewards(tmp_path, tokenizer):
    rows = _rows(tmp_path, EXAMPLES / "prompt_only.jsonl", "grpo")
    raw = [json.loads(line) for line in (EXAMPLES / "prompt_only.jsonl").read_text().splitlines()]
    assert rows.format == "verifiable"
    assert rows.dataset["answer"] == [None] * len(raw)
    assert [json.loads(r) for r in rows.dataset["row"]] == raw
    tokenized = tokenize_rows(rows, tokenizer, DataConfig())
    assert json.loads(tokenized.dataset[3]["row"]) == raw[3] and tokenized.dataset[3]["answer"] is None


def test_tool_call_turns_are_rendered_by_the_models_template(tmp_path, chatml_tokenizer):
    """The assistant's tool call and its final answer are trained; the tool's result (a user-side turn in ChatML)
    is not. Worked by hand from Qwen2.5's template."""
    rows = _rows(tmp_path, EXAMPLES / "tool_calls.jsonl", "sft")
    raw = json.loads((EXAMPLES / "tool_calls.jsonl").read_text().splitlines()[0])["messages"]
    tokenized = tokenize_rows(rows, chatml_tokenizer, DataConfig())
    ids, mask = tokenized.dataset[0]["input_ids"], tokenized.dataset[0]["response_mask"]
    expression = raw[1]["tool_calls"][0]["function"]["arguments"]["expression"]
    call = ('<|im_start|>assistant\n<tool_call>\n{"name": "calculator", "arguments": '
            f'{{"expression": "{expression}"}}}}\n</tool_call><|im_end|>\n')
    expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                f"<|im_start|>user\n{raw[0]['content']}<|im_end|>\n{call}"
                f"<|im_start|>user\n<tool_response>\n{raw[2]['content']}\n</tool_response><|im_end|>\n"
                f"<|im_start|>assistant\n{raw[3]['content']}<|im_end|>\n")
    assert chatml_tokenizer.decode(ids) == expected
    trained = chatml_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == call.removeprefix("<|im_start|>assistant\n") + f"{raw[3]['content']}<|im_end|>\n"


def test_tool_call_arguments_given_as_json_text_render_as_the_object_they_hold(tmp_path, chatml_tokenizer):
    """OpenAI's API writes a call's arguments as JSON text: Qwen2.5's template (`arguments | tojson`) encoded that
    text a second time ("{\\"city\\": ..."). They render as the object; the row keeps them as given."""
    def row(arguments):
        return {"messages": [{"role": "user", "content": "Weather in Paris?"},
                             {"role": "assistant", "content": "", "tool_calls": [
                                 {"id": "c1", "type": "function",
                                  "function": {"name": "get_weather", "arguments": arguments}}]},
                             {"role": "tool", "tool_call_id": "c1", "content": "20C"},
                             {"role": "assistant", "content": "It is 20C."}]}

    texts = []
    for arguments in ({"city": "Paris"}, '{"city": "Paris"}'):
        rows = _rows(tmp_path, _jsonl(tmp_path, row(arguments)), "sft")
        assert json.loads(rows.dataset[0]["messages"][1]["tool_calls"])[0]["function"]["arguments"] == arguments
        ids = tokenize_rows(rows, chatml_tokenizer, DataConfig()).dataset[0]["input_ids"]
        texts.append(chatml_tokenizer.decode(ids))
    assert texts[0] == texts[1] and '"arguments": {"city": "Paris"}' in texts[1]


@pytest.mark.parametrize(("turn", "field", "words"), [
    ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}, "messages[1].tool_calls",
     "only assistant turns"),
    ({"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]},
     "messages[1].tool_calls[0]", "function name"),
    ({"role": "assistant", "content": ""}, "messages[1].content", "empty completion"),
    ({"role": "tool", "content": ""}, "messages[1].content", "empty tool message"),
])
def test_bad_tool_turns_are_errors(tmp_path, turn, field, words):
    path = _jsonl(tmp_path, {"messages": [{"role": "user", "content": "q"}, turn,
                                          {"role": "assistant", "content": "a"}]})
    with pytest.raises(DataError) as err:
        _rows(tmp_path, path, "sft")
    assert (err.value.line, err.value.field) == (1, field) and words in str(err.value)


def test_a_rows_tools_are_rendered_by_the_template(tmp_path, chatml_tokenizer):
    """TRL's `tools` column: the function schemas go to the template (Qwen2.5's lists them in the system turn)."""
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    chat = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    path = _jsonl(tmp_path, {"messages": chat, "tools": tools}, {"messages": chat})
    tokenized = tokenize_rows(_rows(tmp_path, path, "sft"), chatml_tokenizer, DataConfig())
    with_tools, without = (chatml_tokenizer.decode(ids) for ids in tokenized.dataset["input_ids"])
    assert with_tools == chatml_tokenizer.apply_chat_template(chat, tools=tools, tokenize=False)
    assert without == chatml_tokenizer.apply_chat_template(chat, tokenize=False) and "<tools>" not in without
    assert "<tools>" in with_tools and json.dumps(tools[0]) in with_tools
    bad = _jsonl(tmp_path, {"messages": chat, "tools": {"name": "calculator"}})
    with pytest.raises(DataError, match="list of function schemas"):
        _rows(tmp_path, bad, "sft")


@pytest.mark.parametrize("fmt", ["preference", "ranking"])
def test_comparison_rows_render_their_tools_as_sft_rows_do(tmp_path, chatml_tokenizer, fmt):
    """DPO and reward models on tool-calling rows see the prompt SFT saw: the template's tool listing included."""
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    prompt = [{"role": "user", "content": "What is 2+3?"}]
    answers = {"preference": {"chosen": "5", "rejected": "6"}, "ranking": {"responses": ["5", "6"]}}[fmt]
    path = _jsonl(tmp_path, {"prompt": prompt, "tools": tools, **answers})
    tokenized = tokenize_rows(_rows(tmp_path, path, "rm"), chatml_tokenizer, DataConfig())
    first = tokenized.dataset["chosen_input_ids" if fmt == "preference" else "ranked_input_ids"][0]
    first = first if fmt == "preference" else first[0]
    chat = [*prompt, {"role": "assistant", "content": "5"}]
    assert chatml_tokenizer.decode(first) == chatml_tokenizer.apply_chat_template(chat, tools=tools, tokenize=False)


def test_the_token_a_turn_stops_on_is_trained_whatever_the_template(chatml_tokenizer, tokenizer):
    """Qwen2.5-base's setting (EOS <|endoftext|>, turns closed by <|im_end|> outside the template's generation block)
    and a template that writes no end-of-turn token at all: either way the model learns where to stop."""
    from posttrain.data import DataConfig as Data
    from posttrain.data import Encoder
    from posttrain.data.schemas import message

    chat = [message("user", "What is 2+3?"), message("assistant", "5")]
    base = copy.deepcopy(chatml_tokenizer)
    base.eos_token = "<|endoftext|>"
    base.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
                          "{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
                          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ids, mask = Encoder.from_config(base, Data()).encode(chat)
    assert base.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "5<|im_end|>"
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    ids, mask = Encoder.from_config(bare, Data()).encode(chat)
    assert ids[-1] == bare.eos_token_id and mask[-1] == 1
    assert bare.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "5\n" + bare.eos_token
