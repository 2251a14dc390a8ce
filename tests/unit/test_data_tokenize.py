"""Chat template rendering, assistant masks, BOS/EOS, thinking modes, truncation and its counts."""

from __future__ import annotations

import copy
import json
import re

import pytest

from posttrain.data import DataConfig, Encoder, load_rows, tokenize_rows
from posttrain.data.schemas import message
from posttrain.data.tokenize import encode_stepwise
from posttrain.errors import ConfigError, DataError
from posttrain.models.tokenizer import CHAT_TEMPLATE

SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"

CHAT = [message("system", "You are terse."), message("user", "What is 2+3?"),
        message("assistant", "5", reasoning="2 plus 3 is 5"), message("user", "And 4*4?"),
        message("assistant", "16")]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hand_built(tokenizer, messages, trained: set[int], empty_think: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and mask built piece by piece: special tokens split BPE, so pieces tokenise alone."""
    ids, mask = [tokenizer.bos_token_id], [0]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            piece = _ids(tokenizer, f"<|{m['role']}|>{m['content']}<|end|>")
            ids, mask = ids + piece, mask + [0] * len(piece)
            continue
        head = _ids(tokenizer, ASSISTANT)
        reasoning = "" if empty_think else m["reasoning"]
        body = (_ids(tokenizer, f"<think>{reasoning}</think>") if reasoning is not None else []) + _ids(
            tokenizer, m["content"]) + [tokenizer.eos_token_id]
        ids += head + body
        mask += [0] * len(head) + [int(i in trained)] * len(body)
    return ids, mask


def _encoder(tokenizer, **kwargs) -> Encoder:
    return Encoder(tokenizer=tokenizer, **kwargs)


def _without_markers(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = re.sub(r"\{% (end)?generation %\}", "", CHAT_TEMPLATE)
    assert "{% generation %}" not in plain.chat_template and "endgeneration" not in plain.chat_template
    return plain


def test_mask_equals_hand_built_mask_on_multi_turn_chat(tokenizer):
    ids, mask = _encoder(tokenizer).encode(CHAT)
    assert (ids, mask) == hand_built(tokenizer, CHAT, trained={2, 4})


def test_loss_on_last_turn_only(tokenizer):
    ids, mask = _encoder(tokenizer, loss_on="last").encode(CHAT)
    assert (ids, mask) == hand_built(tokenizer, CHAT, trained={4})


def test_prompt_turns_are_never_trained(tokenizer):
    ids, mask = _encoder(tokenizer).encode(CHAT, prompt_turns=3)
    assert (ids, mask) == hand_built(tokenizer, CHAT, trained={4})


def test_prefix_fallback_gives_the_same_mask(tokenizer):
    """A template without generation markers: masks come from prompt-prefix tokenisation."""
    for loss_on in ("all", "last"):
        marked = _encoder(tokenizer, loss_on=loss_on).encode(CHAT)
        assert _encoder(_without_markers(tokenizer), loss_on=loss_on).encode(CHAT) == marked


def test_eos_is_trained_when_pad_is_eos(tokenizer):
    pad_is_eos = copy.deepcopy(tokenizer)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    ids, mask = _encoder(pad_is_eos).encode(CHAT)
    assert ids[-1] == pad_is_eos.eos_token_id == pad_is_eos.pad_token_id and mask[-1] == 1
    from posttrain.data import collate_padded

    short = _encoder(pad_is_eos).encode(CHAT[:3])
    batch = collate_padded([{"input_ids": ids, "response_mask": mask},
                            {"input_ids": short[0], "response_mask": short[1]}], pad_is_eos.pad_token_id)
    assert batch["labels"][1, len(short[0]) - 1] == pad_is_eos.eos_token_id  # the short row's own EOS
    assert (batch["labels"][1, len(short[0]):] == -100).all()  # its padding (also EOS ids) is not


def test_eos_closing_outside_the_generation_block_is_still_trained(tokenizer):
    outside = copy.deepcopy(tokenizer)
    outside.chat_template = CHAT_TEMPLATE.replace("<|end|>{% endgeneration %}", "{% endgeneration %}<|end|>")
    assert outside.chat_template != CHAT_TEMPLATE
    assert _encoder(outside).encode(CHAT) == _encoder(tokenizer).encode(CHAT)


def test_exactly_one_bos(tokenizer):
    ids, _ = _encoder(tokenizer).encode(CHAT)
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    prompt = _encoder(tokenizer).encode_prompt(CHAT[:2])
    assert prompt.count(tokenizer.bos_token_id) == 1 and prompt[0] == tokenizer.bos_token_id
    no_bos = copy.deepcopy(tokenizer)
    no_bos.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "")
    assert no_bos.chat_template != CHAT_TEMPLATE
    assert _encoder(no_bos).encode(CHAT) == (ids, _)  # a template that forgets BOS gets it added
    doubled = copy.deepcopy(tokenizer)
    doubled.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}{{ bos_token }}")
    assert _encoder(doubled).encode(CHAT) == (ids, _)  # a doubled opening BOS is one


def test_a_template_may_open_turns_with_bos_and_a_bos_may_be_the_eos(tokenizer):
    """Llama-2-chat opens every user turn with BOS; OPT's BOS is its EOS too, so each answer ends with one: the
    sample still opens with exactly one BOS, and the template's others stay where it put them."""
    per_turn = copy.deepcopy(tokenizer)
    per_turn.chat_template = CHAT_TEMPLATE.replace("{{ bos_token }}", "").replace(
        "<|{{ message['role'] }}|>", "{% if message['role'] == 'user' %}{{ bos_token }}{% endif %}"
                                     "<|{{ message['role'] }}|>")
    assert per_turn.chat_template.count("bos_token") == 1
    ids, mask = _encoder(per_turn).encode(CHAT)
    bos, users = tokenizer.bos_token_id, sum(m["role"] == "user" for m in CHAT)
    assert ids[0] == bos and ids.count(bos) == 1 + users  # the opening one added, one before each user turn
    assert not any(m for t, m in zip(ids, mask, strict=True) if t == bos)
    same = copy.deepcopy(tokenizer)
    same.eos_token = same.bos_token  # OPT: </s> opens every text and ends every answer
    ids, mask = _encoder(same, template="plain").encode_text("Once upon a time.")
    assert ids[0] == bos and ids[-1] == bos and mask[0] == 0 and mask[-1] == 1 and ids.count(bos) == 2


def test_plain_template(tokenizer):
    """Raw text: BOS + prompt + completion + EOS, the completion (and EOS) trained."""
    messages = [message("user", "What is 2+3?"), message("assistant", " 5")]
    ids, mask = _encoder(tokenizer, template="plain").encode(messages, prompt_turns=1)
    prompt = [tokenizer.bos_token_id, *_ids(tokenizer, "What is 2+3?")]
    assert ids == prompt + _ids(tokenizer, " 5") + [tokenizer.eos_token_id]
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def test_thinking_modes(tokenizer):
    turn = [message("user", "What is 2+3?"), message("assistant", "5", reasoning="2 plus 3")]
    on = _encoder(tokenizer, thinking="on").render_text(turn)
    off = _encoder(tokenizer, thinking="off").render_text(turn)
    assert on.endswith("<|assistant|><think>2 plus 3</think>5<|end|>")
    assert off.endswith("<|assistant|><think></think>5<|end|>")
    assert _encoder(tokenizer, thinking="off").encode(turn) == hand_built(tokenizer, turn, {1}, empty_think=True)
    # Generation prompts: thinking off closes an empty block so the model answers directly.
    assert _encoder(tokenizer, thinking="off").render_text(turn[:1], True).endswith("<|assistant|><think></think>")
    assert _encoder(tokenizer, thinking="on").render_text(turn[:1], True).endswith("<|assistant|>")


def test_thinking_fusion_renders_each_row_in_its_own_mode(tokenizer):
    fusion = _encoder(tokenizer, thinking="fusion")
    with_reasoning = [message("user", "q"), message("assistant", "5", reasoning="because")]
    without = [message("user", "q"), message("assistant", "5")]
    assert fusion.render_text(with_reasoning).endswith("<think>because</think>5<|end|>")
    assert fusion.render_text(without).endswith("<think></think>5<|end|>")


def test_reasoning_is_inlined_for_templates_that_do_not_read_it(tokenizer):
    other = copy.deepcopy(tokenizer)
    other.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>"
        "{% endif %}{% endfor %}")
    assert _encoder(other).encode(CHAT) == _encoder(tokenizer).encode(CHAT)


def test_think_block_in_content_becomes_reasoning(tmp_path, tokenizer):
    rows = [{"prompt": "What is 2+3?", "completion": "<think>\n2 plus 3\n</think>\n5"}]
    loaded = load_rows(DataConfig(cache_dir=str(tmp_path)), ("completion",), rows=rows)
    assert loaded.dataset[0]["completion"] == [message("assistant", "5", reasoning="2 plus 3")]


def _lengths_rows(tokenizer):
    """Completion rows whose rendered lengths are known."""
    rows = [{"prompt": "What is 1+1?" + " 1+1" * n, "completion": "2"} for n in (0, 5, 20, 40)]
    encoder = _encoder(tokenizer)
    lengths = [len(encoder.encode([message("user", r["prompt"]), message("assistant", "2")], 1)[0]) for r in rows]
    return rows, lengths


@pytest.mark.parametrize("policy", ["drop", "truncate_left"])
def test_truncation_counts(tmp_path, tokenizer, policy):
    rows, lengths = _lengths_rows(tokenizer)
    max_length = sorted(lengths)[1]  # two rows fit, two do not
    cfg = DataConfig(cache_dir=str(tmp_path), max_length=max_length, truncation=policy)
    result = tokenize_rows(load_rows(cfg, ("completion",), rows=rows), tokenizer, cfg)
    stats = result.stats
    assert stats.rows == 4
    # how long the rows were before max_length cut or dropped them (data inspect had only the kept ones' lengths)
    ordered = sorted(lengths)
    assert stats.original_max == ordered[3]
    assert stats.original_p95 == pytest.approx(ordered[2] + 0.85 * (ordered[3] - ordered[2]))  # position 0.95 x 3
    if policy == "drop":
        assert (stats.kept, stats.dropped_too_long, stats.truncated) == (2, 2, 0)
        assert sorted(result.dataset["length"]) == sorted(lengths)[:2]
    else:
        assert (stats.kept, stats.dropped_too_long, stats.truncated) == (4, 0, 2)
        assert max(result.dataset["length"]) == max_length == stats.length_max
        for ids, mask in zip(result.dataset["input_ids"], result.dataset["response_mask"], strict=True):
            assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
            assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 1  # the answer survives whole
            assert sum(mask) == 2  # "2" and EOS
    assert stats.response_tokens == 2 * stats.kept


@pytest.mark.parametrize("fmt,rows", [
    ("completion", [{"prompt": "q" + " 1+1" * n, "completion": "a" * (n + 1)} for n in (0, 3, 40)]),
    ("preference", [{"prompt": "q" + " 1+1" * n, "chosen": "yes" * (n + 1), "rejected": "no"} for n in (1, 40, 2)]),
    ("ranking", [{"prompt": "q" + " 1+1" * n, "responses": ["a" * (n + 1), "bb", "c c c"], "scores": [3, 2, 1]}
                 for n in (40, 0, 5)])])
def test_response_tokens_count_the_trained_tokens_of_the_kept_rows(tmp_path, tokenizer, fmt, rows):
    """The statistic against a plain loop over the kept rows' masks (one row in each set is too long, dropped)."""
    cfg = DataConfig(cache_dir=str(tmp_path), max_length=64, truncation="drop")
    result = tokenize_rows(load_rows(cfg, (fmt,), rows=rows), tokenizer, cfg)
    masks = {"completion": ["response_mask"], "preference": ["chosen_response_mask", "rejected_response_mask"],
             "ranking": ["ranked_response_mask"]}[fmt]

    def total(mask):
        return sum(total(m) for m in mask) if isinstance(mask, list) else mask

    expected = sum(total(row[column]) for row in result.dataset for column in masks)
    assert result.stats.kept == 2 and result.stats.dropped_too_long == 1
    assert result.stats.response_tokens == expected > 0


def test_a_cut_that_would_reach_the_trained_tokens_drops_the_row_as_too_long(tmp_path, tokenizer):
    """A conversation that ends with a long user turn: cutting it from the left would cut into (here: through) the
    trained assistant turn, so the row is dropped as too long, not trained on a remnant."""
    talk = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                          {"role": "user", "content": "Count: " + " ".join(map(str, range(40)))}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    cfg = DataConfig(cache_dir=str(tmp_path), max_length=32, truncation="truncate_left")
    result = tokenize_rows(load_rows(cfg, ("messages",), rows=talk), tokenizer, cfg)
    assert (result.stats.kept, result.stats.dropped_too_long, result.stats.truncated) == (1, 1, 0)
    assert result.dataset["line"] == [2]


def test_left_truncation_never_cuts_into_the_completion(tmp_path, tokenizer):
    """A long answer after a short prompt: the prompt alone cannot absorb the cut, so the row is dropped (before,
    the cut went on into the answer, leaving a sample that opens mid-answer); a long prompt is still cut."""
    rows = [{"prompt": "q", "completion": " ".join(map(str, range(40)))},
            {"prompt": "Count: " + " ".join(map(str, range(40))), "completion": "done"}]
    cfg = DataConfig(cache_dir=str(tmp_path), max_length=40, truncation="truncate_left")
    result = tokenize_rows(load_rows(cfg, ("completion",), rows=rows), tokenizer, cfg)
    assert (result.stats.kept, result.stats.dropped_too_long, result.stats.truncated) == (1, 1, 1)
    [row] = result.dataset
    assert row["line"] == 2 and len(row["input_ids"]) == 40 and row["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.decode([t for t, m in zip(row["input_ids"], row["response_mask"], strict=True) if m]).startswith(
        "done")


def test_pairs_share_one_prompt_after_truncation(tmp_path, tokenizer):
    rows = [{"prompt": "Sort: " + " ".join(map(str, range(30))), "chosen": "0 1 2", "rejected": "2 1 0 5 5 5"}]
    cfg = DataConfig(cache_dir=str(tmp_path), max_length=40, truncation="truncate_left")
    row = tokenize_rows(load_rows(cfg, ("preference",), rows=rows), tokenizer, cfg).dataset[0]
    chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
    prompt_c = chosen[:row["chosen_response_mask"].index(1)]
    prompt_r = rejected[:row["rejected_response_mask"].index(1)]
    assert prompt_c == prompt_r and max(len(chosen), len(rejected)) == 40


def test_stepwise_step_ends_sit_on_each_steps_newline(tmp_path, tokenizer):
    rows = [{"prompt": "Start with 2. Add 3. Multiply by 4.", "completions": ["2+3=5", "5*4=20"],
             "labels": [True, False]}]
    cfg = DataConfig(cache_dir=str(tmp_path))
    row = tokenize_rows(load_rows(cfg, ("stepwise",), rows=rows), tokenizer, cfg).dataset[0]
    ids = row["input_ids"]
    assert [tokenizer.decode([ids[e]]) for e in row["step_ends"]] == ["\n", "\n"]
    assert tokenizer.decode(ids[row["step_ends"][0] + 1:row["step_ends"][1]]) == "5*4=20"
    assert row["step_labels"] == [1.0, 0.0] and all(row["response_mask"][e] for e in row["step_ends"])


def test_stepwise_steps_written_with_their_line_ending_are_the_same_rows_and_a_two_line_step_is_refused(tmp_path,
                                                                                                      tokenizer):
    """A step ending with its newline ("2+3=5\\n") rendered an empty line after it, and its score was read at that
    second newline; a step holding a line break was scored as one line in training and as two when the process
    reward model scores RL completions line by line."""
    cfg = DataConfig(cache_dir=str(tmp_path))
    prompt = "Start with 2. Add 3. Multiply by 4."
    plain, ended = [tokenize_rows(load_rows(cfg, ("stepwise",), rows=[
        {"prompt": prompt, "completions": steps, "labels": [True, False]}]), tokenizer, cfg).dataset[0]
        for steps in (["2+3=5", "5*4=20"], ["2+3=5\n", "5*4=20\r\n"])]
    assert {k: ended[k] for k in ("input_ids", "response_mask", "step_ends")} == \
        {k: plain[k] for k in ("input_ids", "response_mask", "step_ends")}
    for broken in ("2+3\n=5", "2+3\r=5", "2+3\u2028=5"):  # every break the PRM's line split takes
        with pytest.raises(DataError, match=r":1: completions\[0\]: a step holds a line break"):
            load_rows(cfg, ("stepwise",), rows=[{"prompt": prompt, "completions": [broken, "5*4=20"],
                                                  "labels": [True, False]}])


NO_CLOSER = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.mark.parametrize("which", ["project", "chatml"])
@pytest.mark.parametrize("template", ["own", "no_closer"])
def test_step_ends_sit_on_each_steps_newline_whatever_the_template_adds(tokenizer, chatml_tokenizer, which, template):
    """A template that closes no turn gets an EOS appended at the end, and ChatML's BOS opens every turn: neither
    may move the step ends (an appended EOS once shifted every score read one token late, onto the next step)."""
    tok = copy.deepcopy(tokenizer if which == "project" else chatml_tokenizer)
    if template == "no_closer":
        tok.chat_template = NO_CLOSER
    encoder = Encoder.from_config(tok, DataConfig())
    steps = ["7+5=12", "12*3=36", "So the answer is 36."]
    ids, ends = encode_stepwise(encoder, [message("user", "Start with 7. Add 5. Multiply by 3.")], steps)
    assert [tok.decode([ids[e]]) for e in ends] == ["\n"] * 3
    assert [tok.decode(ids[a + 1:b]) for a, b in zip([ends[0], ends[1]], ends[1:], strict=True)] == steps[1:]
    if template == "no_closer":
        assert ids[-1] == tok.eos_token_id  # the case: an EOS after the last step's newline


def test_verifiable_prompts_end_with_the_generation_prompt(tmp_path, tokenizer):
    cfg = DataConfig(cache_dir=str(tmp_path), thinking="off")
    rows = [{"prompt": "What is 2+3?", "answer": 5}]
    row = tokenize_rows(load_rows(cfg, ("verifiable",), rows=rows), tokenizer, cfg).dataset[0]
    assert tokenizer.decode(row["prompt_input_ids"]).endswith("<|assistant|><think></think>")
    assert row["answer"] == "5"


@pytest.mark.parametrize("which", ["project", "chatml", "phi3"])
def test_left_truncation_cuts_an_rl_prompt_from_the_left_up_to_its_answer_header(tmp_path, tokenizer,
                                                                                  chatml_tokenizer, phi3_tokenizer,
                                                                                  which):
    """A too-long RL prompt was always dropped with truncate_left (the whole prompt counted as 'completion', which
    no cut may reach): its oldest tokens are cut now, keeping BOS and the whole header that opens the answer; one
    whose header alone is too long is dropped; truncation=error names the prompt's length."""
    tok = {"project": tokenizer, "chatml": chatml_tokenizer, "phi3": phi3_tokenizer}[which]
    history = [message("system", "Be brief. " * 30), message("user", "What is 2+3?")]
    rows = [{"prompt": history, "answer": "5"}, {"prompt": "What is 1+1?", "answer": "2"}]
    full = Encoder.from_config(tok, DataConfig(max_length=4096, thinking="off")).encode_prompt(history)
    turn = [{"role": "user", "content": "x"}]
    opened = list(tok.apply_chat_template(turn, add_generation_prompt=True, enable_thinking=False,
                                          return_dict=True)["input_ids"])
    bare = list(tok.apply_chat_template(turn, enable_thinking=False, return_dict=True)["input_ids"])
    if opened[:len(bare)] != bare:  # Phi-3's template closes a conversation that opens no answer with its EOS
        assert bare[-1] == tok.eos_token_id and opened[:len(bare) - 1] == bare[:-1]
        bare = bare[:-1]
    header_ids = opened[len(bare):]
    assert header_ids and len(full) > 40
    cfg = DataConfig(cache_dir=str(tmp_path / "a"), max_length=40, truncation="truncate_left", thinking="off")
    result = tokenize_rows(load_rows(cfg, ("verifiable",), rows=rows), tok, cfg)
    assert (result.stats.kept, result.stats.truncated, result.stats.dropped_too_long) == (2, 1, 0)
    cut = result.dataset[0]["prompt_input_ids"]
    bos = [tok.bos_token_id] if full[0] == tok.bos_token_id and Encoder.from_config(tok, cfg).adds_bos else []
    assert cut == bos + full[len(full) - 40 + len(bos):] and cut[-len(header_ids):] == header_ids
    least = max(len(bos), 1) + len(header_ids)  # BOS, or else one prompt token, before the header: the shortest cut
    tight = DataConfig(cache_dir=str(tmp_path / "b"), max_length=least, truncation="truncate_left", thinking="off")
    assert tokenize_rows(load_rows(tight, ("verifiable",), rows=rows[:1]), tok, tight).dataset[0][
        "prompt_input_ids"] == bos + full[len(full) - least + len(bos):]
    tighter = DataConfig(cache_dir=str(tmp_path / "d"), max_length=least - 1, truncation="truncate_left",
                         thinking="off")
    assert tokenize_rows(load_rows(tighter, ("verifiable",), rows=rows), tok, tighter).stats.dropped_too_long >= 1
    error = DataConfig(cache_dir=str(tmp_path / "c"), max_length=40, truncation="error", thinking="off")
    with pytest.raises(Exception, match=rf"prompt: the prompt is {len(full)} tokens, longer than data.max_length=40"):
        tokenize_rows(load_rows(error, ("verifiable",), rows=rows), tok, error)


def test_an_rl_prompt_that_ends_with_an_assistant_message_is_refused(tmp_path):
    """A prefilled answer start was closed as a finished turn and a new one opened after it, without a word."""
    rows = [{"prompt": "What is 1+1?", "answer": "2"},
            {"prompt": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is"}],
             "answer": "5"}]
    cfg = DataConfig(cache_dir=str(tmp_path))
    with pytest.raises(Exception, match=r":2: prompt\[1\]\.role: ends with an assistant message"):
        load_rows(cfg, ("verifiable",), rows=rows)


def test_tokenisation_is_cached_and_num_proc_changes_nothing(tmp_path, tokenizer):
    results = {}
    for num_proc in (1, 2):
        cfg = DataConfig(source="multistep", size=64, num_proc=num_proc, cache_dir=str(tmp_path / str(num_proc)))
        first = tokenize_rows(load_rows(cfg, ("messages",)), tokenizer, cfg)
        again = tokenize_rows(load_rows(cfg, ("messages",)), tokenizer, cfg)
        assert first.dataset.cache_files and again.dataset.cache_files == first.dataset.cache_files
        results[num_proc] = first.dataset.to_list()
    assert results[1] == results[2]


# ----------------------------------------------------------------------------------------------
# Templates as real models ship them.

MULTI = [message("user", "What is 2+3?"), message("assistant", "5"), message("user", "And 4*4?"),
         message("assistant", "16")]


def _chatml_hand_built(tok, messages, system="You are a helpful assistant."):
    """ChatML by hand: every turn `<|im_start|>role\\ncontent<|im_end|>\\n`, the assistant's content, its
    `<|im_end|>` and the newline after it trained (the template's text up to the next turn)."""
    ids, mask = [], []
    for m in [message("system", system), *messages]:
        head = [tok.convert_tokens_to_ids("<|im_start|>"), *_ids(tok, f"{m['role']}\n")]
        body = [*_ids(tok, m["content"]), tok.convert_tokens_to_ids("<|im_end|>"), *_ids(tok, "\n")]
        trained = int(m["role"] == "assistant")
        ids, mask = ids + head + body, mask + [0] * len(head) + [trained] * len(body)
    return ids, mask


def test_chatml_tokenizer_whose_bos_opens_every_turn(chatml_tokenizer):
    """A ChatML tokenizer with bos_token=<|im_start|> that adds no BOS itself: no BOS is added, the many
    turn openers are not "extra BOS tokens", and the mask (prefix rendering: no generation markers) covers
    exactly the assistant turns."""
    encoder = Encoder.from_config(chatml_tokenizer, DataConfig())
    assert chatml_tokenizer.bos_token == "<|im_start|>" and not encoder.adds_bos
    assert encoder.encode(MULTI) == _chatml_hand_built(chatml_tokenizer, MULTI)
    prompt = encoder.encode_prompt(MULTI[:1])
    opener = [chatml_tokenizer.convert_tokens_to_ids("<|im_start|>"), *_ids(chatml_tokenizer, "assistant\n")]
    assert prompt == _chatml_hand_built(chatml_tokenizer, MULTI[:1])[0] + opener
    plain_ids, _ = Encoder.from_config(chatml_tokenizer, DataConfig(template="plain")).encode(MULTI[:2], 1)
    assert chatml_tokenizer.decode(plain_ids) == "What is 2+3?5<|im_end|>"  # no BOS text prepended either


def test_tokenizer_without_bos(chatml_tokenizer):
    """Qwen2's own setting: no bos_token at all."""
    no_bos = copy.deepcopy(chatml_tokenizer)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    assert Encoder.from_config(no_bos, DataConfig()).encode(MULTI) == _chatml_hand_built(chatml_tokenizer, MULTI)


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|system|>{{ m['role'] }}<|user|>\n\n{{ m['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|system|>assistant<|user|>\n\n{% endif %}")


def test_llama3_style_headers_with_a_tokenizer_that_adds_bos(tokenizer):
    """Llama-3's layout (`<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`, spelled with this
    tokenizer's special tokens), BOS written by the template and also added by the tokenizer: one BOS."""
    llama = copy.deepcopy(tokenizer)
    llama.chat_template = LLAMA3_TEMPLATE
    encoder = Encoder.from_config(llama, DataConfig())
    assert encoder.adds_bos
    ids, mask = [tokenizer.bos_token_id], [0]
    for m in MULTI:
        head = _ids(tokenizer, f"<|system|>{m['role']}<|user|>\n\n")
        body = [*_ids(tokenizer, m["content"]), tokenizer.eos_token_id]
        ids, mask = ids + head + body, mask + [0] * len(head) + [int(m["role"] == "assistant")] * len(body)
    assert encoder.encode(MULTI) == (ids, mask)
    without = copy.deepcopy(llama)
    without.chat_template = LLAMA3_TEMPLATE.replace("{{ bos_token }}", "")
    assert Encoder.from_config(without, DataConfig()).encode(MULTI) == (ids, mask)  # the tokenizer's BOS added


def test_named_chat_templates_render_as_transformers_picks_them(tmp_path, tokenizer):
    """Hermes-2-Pro and Command-R ship a dict of templates: `default`, and `tool_use` for rows with tools."""
    named = copy.deepcopy(tokenizer)
    tool_use = CHAT_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}<|system|>tools here<|end|>")
    named.chat_template = {"default": CHAT_TEMPLATE, "tool_use": tool_use}
    cfg = DataConfig(cache_dir=str(tmp_path))
    encoder = Encoder.from_config(named, cfg)
    assert encoder.encode(CHAT) == _encoder(tokenizer).encode(CHAT)  # the default one, its generation markers read
    tools = json.dumps([{"type": "function", "function": {"name": "calculator"}}])
    ids, mask = encoder.for_row({"tools": tools}).encode(CHAT)
    assert named.decode(ids).startswith(named.bos_token + "<|system|>tools here<|end|>")
    assert named.decode([t for t, m in zip(ids, mask, strict=True) if m]) == tokenizer.decode(
        [t for t, m in zip(*_encoder(tokenizer).encode(CHAT), strict=True) if m])
    named.chat_template = {"tool_use": tool_use}
    with pytest.raises(ConfigError, match="no `default` one"):
        Encoder.from_config(named, cfg)


def _qwen_like_tokenizer(chat_template: str):
    """A byte-level BPE with Qwen2's pre-tokenizer pattern, which makes one pre-token of "\\n" + "\\n\\n" (the
    template's "assistant\\n" and an answer's opening "\\n\\n") and a token of it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
               r"""|\s+(?!\S)|\s+""")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = ["assistant\n\n\nHi there! Say hello.\n\nSure.\n"] * 50
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = chat_template
    return fast


@pytest.mark.parametrize("loss_on", ["all", "last"])
def test_an_answer_whose_first_characters_merge_with_the_prompts_last_is_trained_from_that_token(
        chatml_tokenizer, loss_on):
    """A completion opening with "\\n\\n" (as API outputs often do) stopped the run on a template without generation
    markers: the prompt's tokens were no prefix of the conversation's, and the suggested loss_on=last failed too."""
    tok = _qwen_like_tokenizer(chatml_tokenizer.chat_template)
    conversation = [message("user", "Say hello"), message("assistant", "\n\nHi there!")]
    assert "\u010a\u010a\u010a" in tok.convert_ids_to_tokens(tok("assistant\n\n\nHi")["input_ids"])  # merged
    ids, mask = Encoder.from_config(tok, DataConfig(loss_on=loss_on)).encode(conversation)
    assert ids == tok(tok.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)["input_ids"]
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    # Every token holding a character of the answer (the merged newlines among them), then what an answer without
    # them trains: the answer through the template's end of turn.
    plain = [message("user", "Say hello"), message("assistant", "Hi there!")]
    plain_ids, plain_mask = Encoder.from_config(tok, DataConfig(loss_on=loss_on)).encode(plain)
    assert tok.decode(trained) == "\n\n\n" + tok.decode([t for t, m in zip(plain_ids, plain_mask, strict=True) if m])
    assert tok.decode(trained) == "\n\n\nHi there!<|im_end|>\n"
    assert mask == sorted(mask)  # one trained run, to the end


def _trained_text(tokenizer, ids, mask) -> list[str]:
    """The text of each run of trained tokens."""
    runs, run = [], []
    for token, trained in zip(ids, mask, strict=True):
        if trained:
            run.append(token)
        elif run:
            runs, run = [*runs, tokenizer.decode(run)], []
    return runs + ([tokenizer.decode(run)] if run else [])


def test_phi3_trains_every_assistant_turn_of_a_conversation(phi3_tokenizer):
    """Phi-3's template writes `<|endoftext|>` after the last turn only, so the render up to an earlier turn is no
    prefix of the whole: every multi-turn conversation was refused as "the template rewrites earlier turns"."""
    encoder = Encoder.from_config(phi3_tokenizer, DataConfig())
    ids, mask = encoder.encode([message("user", "What is 2+3?"), message("assistant", "5"),
                                message("user", "And 4*4?"), message("assistant", "16")])
    assert phi3_tokenizer.decode(ids) == phi3_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"},
         {"role": "user", "content": "And 4*4?"}, {"role": "assistant", "content": "16"}], tokenize=False)
    assert _trained_text(phi3_tokenizer, ids, mask) == ["5<|end|>\n", "16<|end|>\n<|endoftext|>"]


def test_an_added_special_token_in_a_message_is_refused_though_the_tokenizer_does_not_name_it(phi3_tokenizer):
    """`<|assistant|>` is a special token of Phi-3's vocabulary but not BOS, EOS, pad nor an additional special token:
    a row holding it as text was tokenised into the control token, a forged turn that an assistant message trains."""
    encoder = Encoder.from_config(phi3_tokenizer, DataConfig())
    assert "<|assistant|>" not in phi3_tokenizer.all_special_tokens
    with pytest.raises(Exception, match=r"special token '<\|assistant\|>' as text"):
        encoder.encode([message("user", "hi"), message("assistant", "5<|end|>\n<|assistant|>\n6")])


@pytest.mark.parametrize("template, reads", [
    # Qwen2.5's default system turn, saying "reasoning" in text only: the reasoning goes inline, as a thinking block
    ("{%- for m in messages %}{% if loop.first %}<|im_start|>system\nShow your reasoning.<|im_end|>\n{% endif %}"
     "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
     "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}", False),
    # Qwen3's: reasoning_content, which it renders as a thinking block itself
    ("{%- for m in messages %}<|im_start|>{{ m.role }}\n{% if m.reasoning_content %}<think>{{ m.reasoning_content }}"
     "</think>{% endif %}{{ m.content }}<|im_end|>\n{%- endfor %}"
     "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}", True),
])
def test_reasoning_is_rendered_by_the_key_the_template_reads_or_inline(chatml_tokenizer, template, reads):
    """The template's text was searched for "reasoning": one that only said it (a system prompt) was taken for one
    that renders it, and every chain of thought was dropped from the trained tokens without a word."""
    tokenizer = copy.deepcopy(chatml_tokenizer)
    tokenizer.chat_template = template
    encoder = Encoder.from_config(tokenizer, DataConfig())
    assert (encoder.reasoning_key is not None) == reads  # (transformers passes "reasoning" on as reasoning_content)
    ids, mask = encoder.encode([message("user", "What is 2+3?"), message("assistant", "5", reasoning="2 plus 3")])
    # (the template's "\n" before the answer merges with "<" into one token here: trained with it)
    assert [text.strip() for text in _trained_text(tokenizer, ids, mask)] == ["<think>2 plus 3</think>5<|im_end|>"]


TURNS = [message("user", "What is 2+3?"), message("assistant", "5"), message("user", "And 4*4?"),
         message("assistant", "16")]


def _trained_runs(tokenizer, ids, mask) -> list[str]:
    """The text of every run of trained tokens."""
    runs, current = [], []
    for token, mark in zip([*ids, None], [*mask, 0], strict=True):
        if mark:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def _templated(tokenizer, template: str):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


# The turn's rendering after its trained tokens; <|end|> is the test tokenizer's EOS.
NEWLINE_AFTER_BLOCK = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'Assistant: ' }}"
                       "{% generation %}{{ m['content'] }}{% endgeneration %}{{ '\\n' }}{% else %}"
                       "{{ 'User: ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")


PHI3_MARKED = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' }}{% if m['role'] == 'assistant' %}"
               "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
               "{{ '\\n<|end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}"
               "{{ eos_token }}{% endif %}")


@pytest.mark.parametrize(("phi3", "template", "runs"), [
    # No end-of-turn token anywhere: none was trained and none appended (text followed the block), so a model
    # trained on it never stopped. The last turn gets an EOS after its rendering, trained with the newline before it.
    (False, NEWLINE_AFTER_BLOCK, ["5\n", "16\n<|end|>"]),
    # The end-of-turn token after a newline that follows the block: it was left untrained.
    (False, NEWLINE_AFTER_BLOCK.replace("{{ '\\n' }}{% else %}", "{{ '\\n' }}<|end|>{% else %}"),
     ["5\n<|end|>", "16\n<|end|>"]),
    # A special token opening the block (a tool call's tag, a special <think>) was taken for the turn's end, and the
    # real one after the block went untrained; so was one closing the block (a special </tool_call>).
    (False, CHAT_TEMPLATE.replace("<|assistant|>{% generation %}", "<|assistant|>{% generation %}<|system|>").replace(
        "<|end|>{% endgeneration %}", "{% endgeneration %}<|end|>"), ["<|system|>5<|end|>", "<|system|>16<|end|>"]),
    (False, CHAT_TEMPLATE.replace("<|end|>{% endgeneration %}", "<|system|>{% endgeneration %}<|end|>"),
     ["5<|system|><|end|>", "16<|system|><|end|>"]),
    # Role tokens and no end-of-turn token (prefix tokenisation): the next turn's <|user|> was trained as the end
    # of a turn, which sampling does not stop on. Now only the last turn ends, with an EOS.
    (False, "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}", ["5", "16<|end|>"]),
    # Phi-3's shape, marked: a newline and <|end|> after the block, <|endoftext|> (its EOS) closing the conversation.
    # A turn before the last rendered through itself ends with <|endoftext|>, which the row has not there.
    (True, PHI3_MARKED, ["5\n<|end|>", "16\n<|end|>"]),
])
def test_every_trained_turn_ends_with_a_trained_stop_token(tokenizer, phi3_tokenizer, phi3, template, runs):
    base = phi3_tokenizer if phi3 else tokenizer
    templated = _templated(base, template)
    ids, mask = _encoder(templated).encode(TURNS)
    assert _trained_runs(base, ids, mask) == runs
    if base.bos_token_id is not None:
        assert ids[0] == base.bos_token_id and ids.count(base.bos_token_id) == 1
    if "{% generation %}" in template and not phi3:  # the same tokens without the markers (prefix tokenisation)
        unmarked = _templated(base, re.sub(r"\{% (end)?generation %\}", "", template))
        assert _encoder(unmarked).encode(TURNS) == (ids, mask)


def test_plain_messages_cannot_forge_a_special_token_across_their_join(tokenizer):
    """Each message was checked alone; data.template=plain joins them with nothing between, so two halves made
    the control token itself (an EOS inside the trained answer, a forged user turn)."""
    from posttrain.data.tokenize import RowProblem

    encoder = _encoder(tokenizer, template="plain")
    with pytest.raises(RowProblem, match=r"hold the special token '<\|end\|>' across two of them"):
        encoder.encode([message("user", "hello <|en"), message("assistant", "d|> 5")])
    with pytest.raises(RowProblem, match=r"hold the special token '<\|user\|>' across two of them"):
        encoder.encode_prompt([message("system", "Be <|us"), message("user", "er|>hi")])
    ids, mask = encoder.encode([message("user", "hello <|"), message("assistant", "5")])  # no token made: kept
    assert tokenizer.decode(ids) == "<|bos|>hello <|5<|end|>" and ids.count(tokenizer.eos_token_id) == 1


def test_a_pad_token_of_ordinary_text_is_named_as_the_cause(tokenizer):
    """A pad token set to "!" (GPT-2 users' id 0) makes it special: every row holding one is refused, which read
    as if the data were at fault."""
    from posttrain.data.tokenize import RowProblem

    bang = copy.deepcopy(tokenizer)
    bang.pad_token = "!"
    with pytest.raises(RowProblem, match=r"contains the special token '!' as text \(the tokenizer's pad token: text "
                                         r"made special; save the tokenizer with another pad token"):
        _encoder(bang).encode([message("user", "Say hi!"), message("assistant", "hi")])
    with pytest.raises(RowProblem, match=r"contains the special token '<\|end\|>' as text$"):
        _encoder(tokenizer).encode([message("user", "Say <|end|>"), message("assistant", "hi")])


def test_truncation_error_of_a_comparison_names_the_column_that_is_too_long(tmp_path, tokenizer):
    """It named a `completion` field that preference and ranking rows do not have."""
    long = " ".join(map(str, range(60)))
    cfg = DataConfig(cache_dir=str(tmp_path), max_length=40, truncation="error")
    for fmt, row, field in [("preference", {"prompt": "q", "chosen": "1", "rejected": long}, "rejected"),
                            ("preference", {"prompt": "q", "chosen": long, "rejected": "1"}, "chosen"),
                            ("ranking", {"prompt": "q", "responses": ["1", long]}, "responses")]:
        with pytest.raises(DataError, match=rf":1: {field}: the sample is \d+ tokens"):
            tokenize_rows(load_rows(cfg, (fmt,), rows=[row]), tokenizer, cfg)
