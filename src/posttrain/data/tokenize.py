"""Canonical rows -> token ids and a `response_mask` of the tokens that are trained.

The mask comes from the chat template's `{% generation %}` markers when it has them
(`apply_chat_template(..., return_assistant_tokens_mask=True)`). A template without them falls
back to prefix tokenisation: the conversation up to each trained turn is rendered with the
generation prompt, and its tokens must be a prefix of the whole conversation's tokens — a template
that rewrites earlier turns (or a tokenizer that merges across the boundary) is an error, never a
silently shifted mask. The token that ends an assistant turn is always trained (it is how the model learns
to stop), whatever the pad token is: the mask is explicit, never `input_ids != pad`; a special token the
template writes right after the turn's marked block (`<|im_end|>` where EOS is `<|endoftext|>`) is trained
with it, and a template that ends the answer with no such token gets an EOS appended. Where the tokenizer adds
a BOS itself (Llama's, ours), a sequence opens with exactly one BOS (later ones are the template's own);
where it does not (ChatML tokenizers, whose `bos_token` may be `<|im_start|>`, the token that opens every
turn), the template's text is taken as it renders.

Rows too long for `max_length` are dropped, cut from the left (BOS kept; a row whose cut would reach a
trained token is dropped as too long), or an error, by `truncation`; a row left with no trained token is
dropped. Nothing is dropped silently: every row's fate is a column of the mapped dataset and `TokenStats`
counts them.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import jinja2
import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from posttrain.data import schemas
from posttrain.data.columns import column_values, row_sums
from posttrain.data.config import DataConfig
from posttrain.data.schemas import THINK_CLOSE, THINK_OPEN, shared_start
from posttrain.data.sources import Rows, code_digest
from posttrain.errors import ConfigError, DataError

IGNORE_INDEX = -100
logger = logging.getLogger("posttrain.data")

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Columns every tokenised row carries until `tokenize_rows` has counted and filtered them.
_BOOKKEEPING = ("original_length", "truncated", "drop", "error", "error_field")


class RowProblem(Exception):
    """A row that cannot be tokenised (turned into a DataError naming its file and line by the caller)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class TokenStats:
    """What tokenisation did to the rows: what a user checks before a long run."""

    rows: int
    kept: int
    truncated: int
    dropped_too_long: int
    dropped_no_completion: int
    length_min: int
    length_mean: float
    length_p50: float
    length_p95: float
    length_max: int
    response_tokens: int
    original_p95: float = 0.0
    """The rows' lengths before data.max_length cut or dropped any (what to choose max_length by)."""
    original_max: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """A tokenised dataset (columns by format, see `tokenize_rows`) with its stats."""

    dataset: Dataset
    format: str
    stats: TokenStats
    name: str


# ----------------------------------------------------------------------------------------------
# Rendering one conversation.


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Tokenises canonical rows with one tokenizer and one set of settings (picklable for `map`)."""

    tokenizer: PreTrainedTokenizerBase
    template: str = "chat"
    thinking: str = "on"
    loss_on: str = "all"
    max_length: int = 512
    truncation: str = "drop"
    tools: str | None = None
    """The function schemas (JSON text) of the row being encoded, for templates that render them."""

    @classmethod
    def from_config(cls, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Encoder:
        if cfg.template == "chat" and not tokenizer.chat_template:
            raise ConfigError("the tokenizer has no chat template: use data.template=plain, or a model whose "
                              "tokenizer has one", field="data.template")
        if cfg.template == "chat" and isinstance(tokenizer.chat_template, dict) and \
                "default" not in tokenizer.chat_template:
            raise ConfigError(f"the tokenizer has named chat templates ({', '.join(sorted(tokenizer.chat_template))}) "
                              "and no `default` one, which transformers renders with: name one `default`, or use "
                              "data.template=plain", field="data.template")
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token: a model trained on it could never stop",
                              field="model.path")
        encoder = cls(tokenizer=tokenizer, template=cfg.template, thinking=cfg.thinking, loss_on=cfg.loss_on,
                      max_length=cfg.max_length, truncation=cfg.truncation)
        encoder.adds_bos  # noqa: B018 - computed before `datasets.map` hashes the encoder, so its cache key is stable
        encoder.closers  # noqa: B018 - the same
        encoder.special_texts  # noqa: B018 - the same
        if cfg.template == "chat":
            encoder.reasoning_key  # noqa: B018 - the same
        return encoder

    # -- public -------------------------------------------------------------------------------

    def for_row(self, row: dict[str, Any]) -> Encoder:
        """This encoder for one row: with the row's `tools`, if it has any."""
        if not row.get("tools"):
            return self
        encoder = copy.copy(self)  # keeps the cached `adds_bos`
        object.__setattr__(encoder, "tools", row["tools"])
        return encoder

    def encode(self, messages: Sequence[dict[str, Any]], prompt_turns: int = 0) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its response mask (1 = trained).

        Trained: the assistant turns at index >= `prompt_turns` (all of them, or only the last with
        loss_on=last), each with the EOS that ends it.
        """
        self._check_special_text(messages)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= prompt_turns]
        trained = assistant[-1:] if self.loss_on == "last" else assistant
        mode = self._mode(messages)
        if self.template == "plain":
            ids, spans = self._plain(messages, trained)
        elif self._has_markers():
            ids, spans = self._marked(messages, trained, mode)
        else:
            ids, spans = self._prefixes(messages, trained, mode)
        mask = [0] * len(ids)
        closers, eos = self.closers, self.tokenizer.eos_token_id
        for start, end, turn_end in spans:
            mask[start:end] = [1] * (end - start)
            last = self._last_token(ids[start:end])
            if last == eos:
                continue
            # What the template writes after the trained tokens, up to where the turn's rendering ends (found by
            # rendering it again, for a marked turn: only here, where it is needed): its first end-of-turn token is
            # trained with what comes before it (`<|im_end|>` after the block; a newline then `<|end|>`; the
            # `<|im_end|>` after a tool call whose closing tag is itself a special token).
            turn_end = turn_end(ids) if callable(turn_end) else turn_end
            closer = next((k for k in range(end, turn_end) if ids[k] in closers), None)
            if closer is not None:
                mask[end:closer + 1] = [1] * (closer + 1 - end)
            elif last not in closers:
                # A turn rendered with no end-of-turn token ("Assistant: 5\n"; "<|assistant|>5" whose next turn
                # opens with "<|user|>", which sampling does not stop on): trained through its rendering, as a turn
                # located by its prefixes is, and the row's last one gets an EOS appended, or the model could never
                # stop. Earlier turns are left as the template renders them (a prompt's history has no EOS either).
                mask[end:turn_end] = [1] * (turn_end - end)
                if turn_end == len(ids):
                    ids, mask = [*ids, eos], [*mask, 1]
        return self._one_bos(ids, mask)

    def _last_token(self, ids: Sequence[int]) -> int | None:
        """The last of a turn's trained tokens but whitespace the template writes after an end-of-turn token
        (ChatML's newline after `<|im_end|>`)."""
        tail = list(ids)
        while tail and tail[-1] not in self.closers and not self.tokenizer.decode([tail[-1]]).strip():
            tail.pop()
        return tail[-1] if tail else None

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        """Language modelling on plain text: the text and an EOS, every token trained (but an opening BOS)."""
        self._check_special_in(text, "text")
        ids = [*self._tokens(text), self.tokenizer.eos_token_id]
        return self._one_bos(ids, [1] * len(ids))

    def encode_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of a prompt ready for generation (the assistant header, thinking switch applied)."""
        self._check_special_text(messages)
        mode = self._mode(messages)
        if self.template == "plain":
            ids = self._tokens(self._plain_text(messages))
        else:
            ids = self._tokens(self._render(messages, mode, add_generation_prompt=True))
        return self._one_bos(ids, [0] * len(ids))[0]

    def generation_prompt_length(self, messages: Sequence[dict[str, Any]]) -> int:
        """How many of the last tokens of `encode_prompt(messages)` the template writes to open the answer
        (ChatML's `<|im_start|>assistant` and newline): what a left cut of a too-long prompt must keep, so that the
        model still answers after a whole header. At least one (the plain template writes none)."""
        if self.template == "plain":
            return 1
        mode = self._mode(messages)
        opened = self._tokens(self._render(messages, mode, add_generation_prompt=True))
        bare = self._tokens(self._render(messages, mode, add_generation_prompt=False))
        # Where the two part, not their lengths' difference: a template may close the bare conversation with a
        # token that the opened one lacks (Phi-3's <|endoftext|>)
        return max(1, len(opened) - shared_start(opened, bare))

    def render_text(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The text a conversation renders to (what `inspect` shows)."""
        if self.template == "plain":
            return self._plain_text(messages)
        return self._render(messages, self._mode(messages), add_generation_prompt)

    # -- chat template paths ------------------------------------------------------------------

    def _mode(self, messages: Sequence[dict[str, Any]]) -> str:
        if self.thinking != "fusion":
            return self.thinking
        return "on" if any(m.get("reasoning") is not None for m in messages) else "off"

    def _has_markers(self) -> bool:
        return bool(_GENERATION_MARKER.search(self._template_text()))

    def _template_text(self) -> str:
        """The template transformers renders this row with: the tokenizer's, or of its named ones (Hermes-2-Pro,
        Command-R) `tool_use` for a row with tools and `default` otherwise."""
        if isinstance(self.tokenizer.chat_template, dict):
            return self.tokenizer.get_chat_template(tools=json.loads(self.tools) if self.tools else None)
        return self.tokenizer.chat_template or ""

    def _template_messages(self, messages: Sequence[dict[str, Any]], mode: str) -> list[dict[str, str]]:
        """Canonical messages as the template expects them. Thinking off: an empty block on every
        assistant turn. A template that does not read `reasoning` gets the block inline."""
        key = self.reasoning_key
        out = []
        for m in messages:
            item = {"role": m["role"], "content": m["content"]}
            if m.get("tool_calls") is not None:
                item["tool_calls"] = [_arguments_as_object(call) for call in json.loads(m["tool_calls"])]
            item |= {key: m[key] for key in ("name", "tool_call_id") if m.get(key) is not None}
            if m["role"] == "assistant":
                reasoning = "" if mode == "off" else m.get("reasoning")
                if reasoning is not None:
                    if key is not None:
                        item[key] = reasoning
                    else:
                        item["content"] = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{m['content']}"
            out.append(item)
        return out

    def _render(self, messages: Sequence[dict[str, Any]], mode: str, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                self._template_messages(messages, mode), tokenize=False,
                add_generation_prompt=add_generation_prompt, enable_thinking=mode != "off", **self._tool_kwargs())
        except Exception as err:  # jinja's TemplateError, or a template's own raise_exception
            raise RowProblem(f"the chat template cannot render this conversation: {err}") from None

    def _tool_kwargs(self) -> dict[str, Any]:
        return {"tools": json.loads(self.tools)} if self.tools else {}

    def _marked(self, messages: Sequence[dict[str, Any]], trained: list[int],
                mode: str) -> tuple[list[int], list[tuple[int, int, Any]]]:
        try:
            out = self.tokenizer.apply_chat_template(
                self._template_messages(messages, mode), tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True, enable_thinking=mode != "off", **self._tool_kwargs())
        except Exception as err:
            raise RowProblem(f"the chat template cannot render this conversation: {err}") from None
        ids, marks = list(out["input_ids"]), out["assistant_masks"]
        runs = _runs(marks)
        assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(runs) != len(assistant):  # adjacent assistant turns merge into one run: split them by prefixes
            return self._prefixes(messages, trained, mode)
        return ids, [(start, end, functools.partial(self._turn_end, through=messages[:i + 1], mode=mode, end=end))
                     for (start, end), i in zip(runs, assistant, strict=True) if i in trained]

    def _turn_end(self, ids: list[int], through: Sequence[dict[str, Any]], mode: str, end: int) -> int:
        """Where the rendering of the conversation `through` a marked turn ends in `ids`: what the template writes
        after the turn's generation block belongs to the turn up to there. A template that closes the whole
        conversation after its last turn (Phi-3's `<|endoftext|>`) renders `through` with those tokens at its end:
        the turn ends where the two part (as in `_span`). Otherwise, where the render is not a prefix of the whole
        (a template that rewrites earlier turns), the end-of-turn token right after the block, if one is."""
        if end >= len(ids):
            return end
        parted = self._renders_part(ids, self._tokens(self._render(through, mode, add_generation_prompt=False)))
        if parted is not None and parted >= end:
            return parted
        return end + 1 if ids[end] in self.closers else end

    def _renders_part(self, ids: list[int], through_ids: list[int]) -> int | None:
        """Where `ids` and `through_ids` (the render of the conversation through a turn) part, when all the render
        has beyond that are end-of-turn tokens (none, for a prefix; a template that closes the whole conversation
        after its last turn, Phi-3's `<|endoftext|>`, gives a turn with more after it those tokens); else None."""
        common = shared_start(ids, through_ids)
        return common if all(t in self.closers for t in through_ids[common:]) else None

    def _prefixes(self, messages: Sequence[dict[str, Any]], trained: list[int],
                  mode: str) -> tuple[list[int], list[tuple[int, int, Any]]]:
        text = self._render(messages, mode, add_generation_prompt=False)
        ids = self._tokens(text)
        spans = []
        for i in trained:
            if i == 0:
                raise RowProblem("the conversation opens with an assistant turn; this chat template has no "
                                 "generation markers, so its tokens can only be located after a user turn",
                                 "messages[0]")
            start, end = self._span(text, ids, self._render(messages[:i], mode, add_generation_prompt=True),
                                    self._render(messages[:i + 1], mode, add_generation_prompt=False),
                                    f"messages[{i}]")
            spans.append((start, end, end))  # the turn's rendering ends with its span
        return ids, spans

    # -- plain text path ----------------------------------------------------------------------

    def _plain_pieces(self, messages: Sequence[dict[str, Any]]) -> list[str]:
        pieces = []
        for m in messages:
            if m["role"] == "assistant":
                reasoning = "" if self._mode(messages) == "off" else m.get("reasoning")
                block = f"{THINK_OPEN}{reasoning}{THINK_CLOSE}" if reasoning is not None else ""
                pieces.append(block + m["content"] + self.tokenizer.eos_token)
            else:
                pieces.append(m["content"])
        return pieces

    def _plain_text(self, messages: Sequence[dict[str, Any]]) -> str:
        text = self._opening_bos_text + "".join(self._plain_pieces(messages))
        # The pieces join with nothing between them: two that are each clean may still hold a special token across
        # the join ("hello <|en" + "d|> 5"), one the text would be tokenised as. Every special text of the joined
        # text is one posttrain wrote (BOS, each answer's EOS, thinking tags) or it is refused.
        blank = [{**m, "content": "", **({"reasoning": ""} if m.get("reasoning") is not None else {})}
                 for m in messages]
        skeleton = self._opening_bos_text + "".join(self._plain_pieces(blank))
        forged = next((t for t in self.special_texts if text.count(t) > skeleton.count(t)), None)
        if forged is not None:
            raise RowProblem(f"its messages, joined as data.template=plain joins them (with nothing between), hold the "
                             f"special token {forged!r} across two of them", "messages")
        return text

    def _plain(self, messages: Sequence[dict[str, Any]],
               trained: list[int]) -> tuple[list[int], list[tuple[int, int, Any]]]:
        bos = self._opening_bos_text
        pieces = self._plain_pieces(messages)
        text = self._plain_text(messages)
        ids = self._tokens(text)
        spans = [self._span(text, ids, bos + "".join(pieces[:i]), bos + "".join(pieces[:i + 1]), f"messages[{i}]")
                 for i in trained]
        return ids, [(start, end, end) for start, end in spans]  # each answer's piece ends with its EOS

    # -- shared checks ------------------------------------------------------------------------

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _span(self, text: str, ids: list[int], before: str, through: str, field: str) -> tuple[int, int]:
        """The trained span [start, end) of one turn in `ids` (the tokens of `text`): the tokens of `through` (the
        conversation up to the turn's end) after those of `before` (up to the turn's start), both prefixes of
        `text`. Where the tokenizer merges characters across the turn's start (a completion opening with "\n\n"
        after a template's "assistant\n": Qwen's tokenizer makes one token of the three), the turn's tokens are
        those holding any of its characters, found by their offsets."""
        before_ids, through_ids = self._tokens(before), self._tokens(through)
        if ids[:len(before_ids)] == before_ids and ids[:len(through_ids)] == through_ids:
            return len(before_ids), len(through_ids)
        # A template that closes the whole conversation after its last turn (Phi-3's `<|endoftext|>`): a turn with more
        # after it lacks those special tokens, and ends where the two renders part.
        parted = self._renders_part(ids, through_ids)
        if ids[:len(before_ids)] == before_ids and parted is not None and parted > len(before_ids):
            return len(before_ids), parted
        if text.startswith(before) and text.startswith(through) and self.tokenizer.is_fast:
            offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            touching = [k for k, (first, end) in enumerate(offsets) if first < len(through) and end > len(before)]
            if touching:
                return touching[0], touching[-1] + 1
        raise RowProblem("the prompt's tokens are not a prefix of the conversation's tokens (the template rewrites "
                         "earlier turns, as Qwen3's drops their reasoning once they are not the last), so the trained "
                         "tokens cannot be located: data.loss_on=last trains the last turn only, or use a template "
                         "with {% generation %} markers", field)

    @functools.cached_property
    def closers(self) -> frozenset[int]:
        """Tokens that may end an assistant turn: EOS and the tokenizer's other special tokens but BOS and UNK
        (`<|im_end|>`, `<|eot_id|>`, `<|end|>`)."""
        special = {*self.tokenizer.all_special_ids,
                   *(i for i, token in self.tokenizer.added_tokens_decoder.items() if token.special)}
        openers = {self.tokenizer.bos_token_id, self.tokenizer.unk_token_id} - {self.tokenizer.eos_token_id}
        return frozenset(special - openers) | {self.tokenizer.eos_token_id}

    @functools.cached_property
    def special_texts(self) -> tuple[str, ...]:
        """The text of every special token, the tokenizer's named ones and every added token marked special (Llama-3's
        `<|start_header_id|>` is neither BOS, EOS nor an `additional_special_tokens` entry): text holding one would
        be tokenised as the control token itself, a forged turn."""
        special = {*self.tokenizer.all_special_tokens,
                   *(token.content for token in self.tokenizer.added_tokens_decoder.values() if token.special)}
        return tuple(sorted(t for t in special if t))

    @functools.cached_property
    def reasoning_key(self) -> str | None:
        """The message key the chat template renders an assistant's reasoning from ("reasoning", Qwen3's
        "reasoning_content", "thinking"), found by rendering a probe; None when it renders none of them (the
        reasoning then goes inline as a thinking block). Reading the template's text instead took a template that
        merely says "reasoning" (in a default system prompt) for one that renders it, and dropped the reasoning."""
        probe = "posttrain-reasoning-probe"
        for key in ("reasoning", "reasoning_content", "thinking"):
            try:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", key: probe}],
                    tokenize=False)
            except Exception:  # noqa: BLE001 - a template that cannot render the probe renders no reasoning from it
                continue
            if probe in text:
                return key
        return None

    @functools.cached_property
    def answer_ending(self) -> list[tuple[int, int]]:
        """How a training row's answer ends, each token with its response-mask mark: its end-of-turn token (the first
        special token trained after the answer's own tokens: `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, Phi-3's
        `<|end|>`, or EOS) and what the template writes after it (ChatML's newline; Phi-3's newline and
        `<|endoftext|>`). Rendered once, from probe conversations."""
        def probe(answer: str) -> tuple[list[int], list[int]]:
            return self.encode([{"role": "user", "content": "q"}, {"role": "assistant", "content": answer}],
                               prompt_turns=1)

        ids, mask = probe("a")
        # The answer's own tokens start where a render of another answer parts from this one: special tokens the
        # template writes before it (a thinking block's <think>, where it is a special token) end nothing.
        other = probe("b")[0]
        answer = next((i for i, (x, y) in enumerate(zip(ids, other, strict=False)) if x != y), 0)
        closing = [i for i, t in enumerate(ids) if t in self.closers and i > answer]
        # A template whose end-of-turn token no row trains (written a newline after a generation block) ends it
        # with its first special token after the answer all the same.
        end = next((i for i in closing if mask[i]), closing[0] if closing else len(ids) - 1)
        return list(zip(ids[end:], mask[end:], strict=True))

    @functools.cached_property
    def adds_bos(self) -> bool:
        """Whether the tokenizer opens a text with BOS itself (`tokenizer(text)`): then BOS means "start of
        sequence", and a sample must start with exactly one. A tokenizer that does not add one (ChatML ones,
        even when their `bos_token` is set: it is `<|im_start|>`, the opener of every turn) gets no BOS added
        and no count: its template decides."""
        bos = self.tokenizer.bos_token_id
        return bos is not None and list(self.tokenizer("a")["input_ids"][:1]) == [bos]

    @property
    def _opening_bos_text(self) -> str:
        return self.tokenizer.bos_token if self.adds_bos else ""

    def _one_bos(self, ids: list[int], mask: list[int]) -> tuple[list[int], list[int]]:
        """Exactly one BOS opening the sample: added where the render has none there, a doubled one (a template's
        and its text's) made one. Further BOS tokens are the template's own (Llama-2-chat opens every user turn
        with one; OPT's BOS is also its EOS, ending each answer) and are kept."""
        if not self.adds_bos:
            return ids, mask
        bos = self.tokenizer.bos_token_id
        if not ids or ids[0] != bos:
            return [bos, *ids], [0, *mask]
        while len(ids) > 1 and ids[1] == bos and not mask[1]:
            ids, mask = ids[1:], mask[1:]
        return ids, mask

    def _check_special_text(self, messages: Sequence[dict[str, Any]]) -> None:
        """Special-token text inside a message would be tokenised as the control token itself: an EOS
        mid-answer, a fake turn. Reject it rather than train on it."""
        for i, m in enumerate(messages):
            for key in ("content", "reasoning", "tool_calls", "name", "tool_call_id"):  # tool calls: JSON text
                self._check_special_in(m.get(key) or "", f"messages[{i}].{key}")
        self._check_special_in(self.tools or "", "tools")  # the row's function schemas, rendered in its prompt

    def _check_special_in(self, text: str, field: str) -> None:
        found = next((t for t in self.special_texts if t in text), None)
        if found:
            # A pad token set to a character of ordinary text ("!", GPT-2's id 0) is special to the tokenizer too:
            # every row holding it would be refused, and decoding would drop it from completions.
            hint = (" (the tokenizer's pad token: text made special; save the tokenizer with another pad token, "
                    "e.g. its EOS)" if found == self.tokenizer.pad_token and found.isprintable()
                    and not found.startswith("<") else "")
            raise RowProblem(f"contains the special token {found!r} as text{hint}", field)

    # -- whole rows ---------------------------------------------------------------------------

    def fit(self, ids: list[int], mask: list[int], excess: int) -> tuple[list[int], list[int]]:
        """Cut `excess` tokens from the left, keeping a leading BOS."""
        keep = self._kept_bos(ids)
        return ids[:keep] + ids[keep + excess:], mask[:keep] + mask[keep + excess:]

    def cuttable(self, ids: list[int], mask: list[int]) -> int:
        """How many tokens `fit` may cut before it reaches the first trained token, leaving the BOS, or else one
        prompt token, before it."""
        first = mask.index(1) if 1 in mask else len(mask)
        keep = self._kept_bos(ids)
        return max(0, first - keep - (0 if keep else 1))

    def _kept_bos(self, ids: list[int]) -> int:
        return 1 if self.adds_bos and ids and ids[0] == self.tokenizer.bos_token_id else 0


def _runs(marks: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) of every run of 1s."""
    runs, start = [], None
    for i, mark in enumerate([*marks, 0]):
        if mark and start is None:
            start = i
        elif not mark and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ----------------------------------------------------------------------------------------------
# Rows of each format -> tokenised columns.


def _fit_group(encoder: Encoder, sequences: list[tuple[list[int], list[int]]],
               field: str | None = None) -> tuple[list, dict]:
    """Apply the truncation policy to sequences that share one prompt (one sequence, a pair, a
    ranking): the same number of prompt tokens is cut from each, so they keep one prompt. `field`: the column an
    error names, for a row held in one column (text, messages) rather than prompt and completion."""
    longest = max(len(ids) for ids, _ in sequences)
    status = {"original_length": longest, "truncated": False, "drop": "", "error": "", "error_field": ""}
    excess = longest - encoder.max_length
    if excess > 0:
        # Left truncation cuts the prompt, never into a trained token: the kept BOS, or one prompt token, stays
        # before the first of them (a sample that opens with a trained token has nothing to predict it from).
        if encoder.truncation == "truncate_left" and excess <= min(encoder.cuttable(ids, mask)
                                                                   for ids, mask in sequences):
            sequences = [encoder.fit(ids, mask, excess) for ids, mask in sequences]
            status["truncated"] = True
        else:
            status["drop"] = "too_long"
            if encoder.truncation == "error":
                prompt = min(mask.index(1) if 1 in mask else len(mask) for _, mask in sequences)
                status["error"] = (f"the sample is {longest} tokens ({prompt} of them prompt), longer than "
                                   f"data.max_length={encoder.max_length} (data.truncation=error)")
                status["error_field"] = field or ("prompt" if prompt >= encoder.max_length else "completion")
            return sequences, status
    if any(sum(mask) == 0 for _, mask in sequences):
        status["drop"] = "no_completion_tokens"
    return sequences, status


def _problem_status(problem: RowProblem) -> dict[str, Any]:
    return {"original_length": 0, "truncated": False, "drop": "error", "error": str(problem),
            "error_field": problem.field or ""}


_CODE = code_digest(__file__, schemas.__file__)


def _arguments_as_object(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call with arguments given as JSON text of an object (as OpenAI's API writes them) turned into that
    object, as chat templates take them (transformers' convention): Qwen2.5's and others print them with `tojson`,
    which encoded the text a second time. Other arguments, and the row as stored, stay as given."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return call
    if not isinstance(parsed, dict):
        return call
    function = {**function, "arguments": parsed}
    return {**call, "function": function} if "function" in call else function


def _encode_row(row: dict[str, Any], encoder: Encoder, fmt: str, code: str = "") -> dict[str, Any]:
    """`code`: only part of the cache key (`tokenize_rows`)."""
    try:
        return _ENCODERS[fmt](row, encoder.for_row(row))
    except RowProblem as problem:
        return _EMPTY[fmt]() | _problem_status(problem)


def _sft(row: dict[str, Any], encoder: Encoder) -> dict[str, Any]:
    if "messages" in row:
        ids, mask = encoder.encode(row["messages"])
    else:
        ids, mask = encoder.encode([*row["prompt"], *row["completion"]], prompt_turns=len(row["prompt"]))
    [(ids, mask)], status = _fit_group(encoder, [(ids, mask)], "messages" if "messages" in row else None)
    return {"input_ids": ids, "response_mask": mask, "length": len(ids)} | status


def _text(row: dict[str, Any], encoder: Encoder) -> dict[str, Any]:
    [(ids, mask)], status = _fit_group(encoder, [encoder.encode_text(row["text"])], "text")
    return {"input_ids": ids, "response_mask": mask, "length": len(ids)} | status


def _preference(row: dict[str, Any], encoder: Encoder) -> dict[str, Any]:
    pair = [encoder.encode([*row["prompt"], *row[key]], prompt_turns=len(row["prompt"]))
            for key in ("chosen", "rejected")]
    [(chosen, chosen_mask), (rejected, rejected_mask)], status = _fit_group(encoder, pair)
    if status["error_field"] == "completion":  # the answer too long: the longer of the two, as the row names it
        status["error_field"] = "chosen" if len(chosen) >= len(rejected) else "rejected"
    return {"chosen_input_ids": chosen, "chosen_response_mask": chosen_mask, "rejected_input_ids": rejected,
            "rejected_response_mask": rejected_mask, "length": max(len(chosen), len(rejected))} | status


def _ranking(row: dict[str, Any], encoder: Encoder) -> dict[str, Any]:
    encoded = [encoder.encode([*row["prompt"], *response], prompt_turns=len(row["prompt"]))
               for response in row["responses"]]
    encoded, status = _fit_group(encoder, encoded)
    if status["error_field"] == "completion":  # the row's column of answers
        status["error_field"] = "responses"
    return {"ranked_input_ids": [ids for ids, _ in encoded], "ranked_response_mask": [m for _, m in encoded],
            "length": max(len(ids) for ids, _ in encoded)} | status


def _verifiable(row: dict[str, Any], encoder: Encoder) -> dict[str, Any]:
    ids = encoder.encode_prompt(row["prompt"])
    # The prompt is all there is to fit: a left cut (truncate_left) takes its oldest tokens, never the header that
    # opens the answer, which counts as its "completion" (so it is never empty)
    kept = encoder.generation_prompt_length(row["prompt"]) if len(ids) > encoder.max_length else 1
    [(ids, _)], status = _fit_group(encoder, [(ids, [0] * (len(ids) - kept) + [1] * kept)])
    if status["error"]:
        status["error"] = (f"the prompt is {status['original_length']} tokens, longer than "
                           f"data.max_length={encoder.max_length} (data.truncation=error)")
        status["error_field"] = "prompt"
    return {"prompt_input_ids": ids, "length": len(ids)} | status


def _stepwise(row: dict[str, Any], encoder: Encoder) -> dict[str, Any]:
    """The steps as one assistant turn, one step per line; `step_ends` holds the token index of each
    step's newline — where a process reward model reads that step's score."""
    content = "".join(step + "\n" for step in row["completions"])
    prompt = row["prompt"]
    turn = {"role": "assistant", "content": content, "reasoning": None}
    ids, mask = encoder.encode([*prompt, turn], prompt_turns=len(prompt))
    step_ends = _step_token_ends(encoder, [*prompt, turn], content, row["completions"], ids)
    [(fitted, mask)], status = _fit_group(encoder, [(ids, mask)])
    cut = len(ids) - len(fitted)
    if any(end - cut < 1 for end in step_ends) and not status["drop"]:
        status["drop"] = "too_long"  # the cut reached into the steps: their labels have nowhere to go
    return {"input_ids": fitted, "response_mask": mask, "step_ends": [max(end - cut, 0) for end in step_ends],
            "step_labels": row["labels"], "length": len(fitted)} | status


def encode_stepwise(encoder: Encoder, prompt: list[dict[str, Any]], steps: list[str],
                    cut_steps: bool = False) -> tuple[list[int], list[int | None]]:
    """Token ids of a prompt and its steps rendered exactly as stepwise rows are for training (one step
    per line), and the index of each step's separator token — where a process reward model reads the
    step's score. Raises DataError when there are no steps, they cannot be located, or do not fit.

    `cut_steps` (scoring, not training): a solution longer than `encoder.max_length` is cut from the left
    whatever it reaches (keeping BOS), and the steps whose separators were cut off get None, not an error.
    """
    if not steps:
        raise DataError("no steps to score", field="completions")
    whole = encoder
    if cut_steps:  # render it whole, then cut here
        whole = copy.copy(encoder)
        object.__setattr__(whole, "max_length", 1 << 62)
    try:
        row = _stepwise({"prompt": prompt, "completions": steps, "labels": [0.0] * len(steps)}, whole)
    except RowProblem as problem:
        raise DataError(str(problem), field=problem.field) from None
    if row["drop"]:
        raise DataError(f"the steps cannot be scored: {row['error'] or row['drop']}", field="completions")
    ids, ends = row["input_ids"], row["step_ends"]
    excess = len(ids) - encoder.max_length
    if not cut_steps or excess <= 0:
        return ids, ends
    bos = encoder._kept_bos(ids)  # 1 when `fit` keeps a leading BOS, before the tokens it keeps
    kept = encoder.fit(ids, row["response_mask"], excess)[0]
    return kept, [end - excess if end - excess >= bos else None for end in ends]


def _step_token_ends(encoder: Encoder, messages: list[dict[str, Any]], content: str, steps: list[str],
                     ids: list[int]) -> list[int]:
    text = encoder.render_text(messages)
    start = text.rfind(content)
    if start < 0:
        raise RowProblem("the template does not render the steps verbatim, so step ends cannot be located",
                         "completions")
    encoding = encoder.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    # `ids` are the text's tokens after `_one_bos` (one BOS opens them: prepended, or a repeated one dropped), and
    # maybe an EOS appended at the end (a template that closes no turn): only the opening BOS tokens shift them.
    bos = encoder.tokenizer.bos_token_id
    shift = _leading(ids, bos) - _leading(encoding["input_ids"], bos) if bos is not None else 0
    ends, position = [], start
    for step in steps:
        position += len(step)  # the index of this step's newline
        token = next((t for t, (a, b) in enumerate(offsets) if a <= position < b), None)
        if token is None:
            raise RowProblem("a step's newline is not covered by any token", "completions")
        ends.append(token + shift)
        position += 1
    return ends


def _leading(ids: Sequence[int], token: int) -> int:
    """How many times `ids` opens with `token`."""
    return next((i for i, t in enumerate(ids) if t != token), len(ids))


def kl_pairs(dataset: Dataset, encoder: Encoder) -> Dataset:
    """Add to tokenised unpaired rows the mismatched pair KTO estimates its reference point from.

    Row i's pair is its prompt with the completion of the next row whose prompt differs (the next row when
    every prompt is the same; in dataset order, wrapping around): columns kl_input_ids and kl_response_mask.
    The pair is spliced from tokens — row i up to its first trained token, then row j from its first trained
    token — as TRL concatenates a prompt's tokens with another row's completion tokens; too long, its prompt
    is cut from the left as `Encoder.fit` cuts (a leading BOS kept), whatever `truncation` says, since it only
    feeds an estimate.

    Fixed pairs (TRL pairs within a batch, in dataset order, too) let the reference logprobs of the pairs be
    computed once before training like those of the rows themselves; the next row *with another prompt*
    because data unpaired from preference pairs holds a prompt's desirable and undesirable answers side by
    side, and pairing those would compare a prompt with its own answer.
    """
    ids, masks = column_values(dataset, "input_ids"), column_values(dataset, "response_mask")
    starts = [mask.index(1) for mask in masks]  # every kept row has a trained token
    prompts = [tuple(row[:start]) for row, start in zip(ids, starts, strict=True)]
    partners = _next_other(prompts)
    kl_ids, kl_masks = [], []
    for i, j in enumerate(partners):
        row = ids[i][:starts[i]] + ids[j][starts[j]:]
        mask = [0] * starts[i] + masks[j][starts[j]:]
        excess = len(row) - encoder.max_length
        if excess > 0:
            row, mask = encoder.fit(row, mask, excess)
        kl_ids.append(row)
        kl_masks.append(mask)
    return dataset.add_column("kl_input_ids", kl_ids).add_column("kl_response_mask", kl_masks)


def _next_other(keys: list[tuple]) -> list[int]:
    """For each index, the next index (cyclically) whose key differs from its own; the next index if none does."""
    n = len(keys)
    partners = [(i + 1) % n for i in range(n)]
    if len(set(keys)) == 1:
        return partners
    # Walk backwards twice around the cycle, remembering the nearest later index of another key.
    following: int | None = None
    for step in range(2 * n - 1, -1, -1):
        i = step % n
        if following is not None and keys[following] != keys[i]:
            partners[i] = following
        elif following is not None:
            partners[i] = partners[following]
        following = i
    return partners


_ENCODERS = {"completion": _sft, "messages": _sft, "text": _text, "preference": _preference, "ranking": _ranking,
             "verifiable": _verifiable, "stepwise": _stepwise, "unpaired": _sft}
_EMPTY = {
    "completion": lambda: {"input_ids": [], "response_mask": [], "length": 0},
    "messages": lambda: {"input_ids": [], "response_mask": [], "length": 0},
    "text": lambda: {"input_ids": [], "response_mask": [], "length": 0},
    "preference": lambda: {"chosen_input_ids": [], "chosen_response_mask": [], "rejected_input_ids": [],
                           "rejected_response_mask": [], "length": 0},
    "ranking": lambda: {"ranked_input_ids": [], "ranked_response_mask": [], "length": 0},
    "verifiable": lambda: {"prompt_input_ids": [], "length": 0},
    "stepwise": lambda: {"input_ids": [], "response_mask": [], "step_ends": [], "step_labels": [], "length": 0},
    "unpaired": lambda: {"input_ids": [], "response_mask": [], "length": 0},
}
# Canonical columns that stay beside the tokens (RL needs the prompt text and the gold answer).
_KEEP = {"completion": ("line",), "messages": ("line",), "text": ("line",),
         "preference": ("line", "margin", "preference_prob"), "ranking": ("line", "scores"),
         "verifiable": ("line", "prompt", "answer", "steps", "row"), "stepwise": ("line",),
         "unpaired": ("line", "label")}


def tokenize_rows(rows: Rows, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> Tokenized:
    """Tokenise validated rows (cached `datasets.map`, `cfg.num_proc` processes) and drop what cannot train.

    Columns by format, besides `line` and `length` (tokens, after truncation):
      completion, messages, text: input_ids, response_mask
      preference:           chosen_input_ids, chosen_response_mask, rejected_input_ids, rejected_response_mask, margin,
                            preference_prob
      ranking:              ranked_input_ids, ranked_response_mask (one list per response, best first), scores
      verifiable:           prompt_input_ids, prompt (messages), answer (None for prompt-only rows), steps,
                            row (the row as given, JSON text)
      stepwise:             input_ids, response_mask, step_ends, step_labels
      unpaired:             input_ids, response_mask, label, and its mismatched pair (`kl_pairs`): kl_input_ids,
                            kl_response_mask
    Raises DataError (file, line, field) for a row the template cannot render or, with
    truncation=error, the first row longer than max_length.
    """
    encoder = Encoder.from_config(tokenizer, cfg)
    fmt = rows.format
    drop_columns = [c for c in rows.dataset.column_names if c not in _KEEP[fmt]]
    # The cache key `datasets` derives hashes the encoder's settings and tokenizer, not this module's code: the code's
    # digest goes in too, so a posttrain that tokenises differently never reads an older one's masks.
    mapped = rows.dataset.map(_encode_row, fn_kwargs={"encoder": encoder, "fmt": fmt, "code": _CODE},
                              remove_columns=drop_columns, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                              desc=f"tokenising {rows.name}")
    _raise_first_error(mapped, rows.name)
    stats = _stats(mapped, fmt)
    if stats.dropped_too_long or stats.dropped_no_completion:
        logger.warning("%s: dropped %d rows longer than max_length=%d and %d rows with no trained token "
                       "(%d truncated, %d kept; the rows are up to %d tokens, p95 %g)", rows.name,
                       stats.dropped_too_long, cfg.max_length, stats.dropped_no_completion, stats.truncated,
                       stats.kept, stats.original_max, stats.original_p95)
    kept = mapped.filter(lambda drop: not drop, input_columns="drop").remove_columns(list(_BOOKKEEPING))
    if fmt == "unpaired" and len(kept):
        kept = kl_pairs(kept, encoder)
    return Tokenized(dataset=kept, format=fmt, stats=stats, name=rows.name)


def _raise_first_error(mapped: Dataset, name: str) -> None:
    errors = mapped.filter(lambda error: bool(error), input_columns="error")
    if len(errors):
        first = errors[0]
        raise DataError(first["error"], file=name, line=first["line"], field=first["error_field"] or None)


def _stats(mapped: Dataset, fmt: str) -> TokenStats:
    drop = np.asarray(column_values(mapped, "drop"), dtype=object)
    kept = drop == ""
    lengths = np.asarray(column_values(mapped, "length"), dtype=np.int64)[kept]
    response_tokens = sum(int(row_sums(mapped, column)[kept].sum()) for column in _mask_columns(fmt))
    if not len(lengths):
        lengths = np.zeros(1, dtype=np.int64)
    original = np.asarray(column_values(mapped, "original_length"), dtype=np.int64)[drop != "error"]
    if not len(original):
        original = np.zeros(1, dtype=np.int64)
    return TokenStats(
        rows=len(mapped), kept=int(kept.sum()),
        truncated=int(np.sum(np.asarray(column_values(mapped, "truncated"), dtype=bool) & kept)),
        dropped_too_long=int(np.sum(drop == "too_long")),
        dropped_no_completion=int(np.sum(drop == "no_completion_tokens")),
        length_min=int(lengths.min()), length_mean=float(lengths.mean()),
        length_p50=float(np.percentile(lengths, 50)), length_p95=float(np.percentile(lengths, 95)),
        length_max=int(lengths.max()), response_tokens=response_tokens,
        original_p95=float(np.percentile(original, 95)), original_max=int(original.max()))


def _mask_columns(fmt: str) -> tuple[str, ...]:
    return {"preference": ("chosen_response_mask", "rejected_response_mask"),
            "ranking": ("ranked_response_mask",), "verifiable": ()}.get(fmt, ("response_mask",))


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The special tokens a model trained on `tokenizer`'s chat template ends its answers with: EOS, and the
    template's end-of-turn token where it is another (`<|im_end|>` of a base Qwen tokenizer whose EOS is
    `<|endoftext|>`, Llama-3's `<|eot_id|>`, Gemma's `<end_of_turn>`, Phi-3's `<|end|>`). Sampling stops at any of
    them: at EOS alone, a model that learned the template would write its end of turn and go on into made-up turns
    that its reward then reads. EOS alone without a chat template, or with one that cannot render a plain exchange."""
    eos = frozenset({tokenizer.eos_token_id} - {None})
    if not tokenizer.chat_template or tokenizer.eos_token_id is None:
        return eos
    encoder = Encoder(tokenizer=tokenizer)
    try:
        ending = encoder.answer_ending
    except (RowProblem, ValueError, TypeError, jinja2.TemplateError):
        return eos  # the data's own rows then say what is wrong with the template, where they are encoded
    return eos | {t for t, trained in ending if trained and t in encoder.closers}
