"""Row formats: which columns each takes, and validation of one row into its canonical form.

Every conversational field (a prompt, a completion, chosen/rejected, each ranked response) is
normalised to a list of messages `{"role", "content", "reasoning", "tool_calls", "name", "tool_call_id"}`:
a plain string prompt becomes one user turn, a plain string answer one assistant turn, and a
`<think>...</think>` block at the start of an assistant turn moves into `reasoning`. Tool use is
kept as the model's own template renders it: an assistant turn may carry `tool_calls` (then its
content may be empty; stored as JSON text, because Arrow needs one schema and arguments differ per
tool) and `tool` turns hold the results. Downstream code then has one shape to handle,
and the plain-text template still reproduces the strings exactly (it joins the contents).

Every problem is a `DataError` naming the file, the line (or 1-based row) and the field, raised
while the rows are read — before any tokenisation or training.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Features, List, Value

from posttrain.errors import DataError
from posttrain.messages import plain_message

ROLES = ("system", "user", "assistant", "tool")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

MESSAGE = {"role": Value("string"), "content": Value("string"), "reasoning": Value("string"),
           "tool_calls": Value("string"), "name": Value("string"), "tool_call_id": Value("string")}
MESSAGES = List(MESSAGE)

# Canonical columns of each format (after renames and normalisation), as Arrow features. `line`
# is the row's line in its file (or its 1-based row number) so that later errors can point at it.
FEATURES: dict[str, Features] = {
    "completion": Features({"prompt": MESSAGES, "completion": MESSAGES, "tools": Value("string"),
                            "line": Value("int64")}),
    "messages": Features({"messages": MESSAGES, "tools": Value("string"), "line": Value("int64")}),
    "text": Features({"text": Value("string"), "line": Value("int64")}),
    "preference": Features({"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES,
                            "margin": Value("float64"), "preference_prob": Value("float64"),
                            "tools": Value("string"), "line": Value("int64")}),
    "ranking": Features({"prompt": MESSAGES, "responses": List(MESSAGES), "scores": List(Value("float64")),
                         "tools": Value("string"), "line": Value("int64")}),
    "verifiable": Features({"prompt": MESSAGES, "answer": Value("string"), "steps": List(Value("string")),
                            "tools": Value("string"), "row": Value("string"), "line": Value("int64")}),
    "stepwise": Features({"prompt": MESSAGES, "completions": List(Value("string")),
                          "labels": List(Value("float64")), "line": Value("int64")}),
    "unpaired": Features({"prompt": MESSAGES, "completion": MESSAGES, "tools": Value("string"), "label": Value("bool"),
                          "line": Value("int64")}),
}


@dataclass(frozen=True)
class FormatSpec:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    doc: str = ""


SPECS: dict[str, FormatSpec] = {
    "completion": FormatSpec("completion", ("prompt", "completion"), ("tools",),
                             doc="prompt (text or messages) -> completion (text or assistant messages)"),
    "messages": FormatSpec("messages", ("messages",), ("tools",),
                           doc="a conversation; every (or the last) assistant turn is trained; optional `tools` (the "
                               "function schemas the template renders)"),
    "text": FormatSpec("text", ("text",), doc="plain text for language modelling: every token is trained"),
    "preference": FormatSpec("preference", ("chosen", "rejected"), ("prompt", "margin", "preference_prob", "tools"),
                             doc="prompt with a preferred and a dispreferred answer, optional margin and "
                                 "preference_prob (the probability that chosen is preferred: a soft label); "
                                 "without a prompt column, chosen and rejected are whole conversations (or "
                                 "texts) and their shared beginning is the prompt"),
    "ranking": FormatSpec("ranking", ("prompt", "responses"), ("scores", "tools"),
                          doc="prompt with >= 2 responses, best first, or ordered by `scores`"),
    "verifiable": FormatSpec("verifiable", ("prompt",), ("answer", "steps", "tools"),
                             doc="prompt for RL, with an optional gold answer (and per-step gold values); every "
                                 "other column is kept for reward functions and graders"),
    "stepwise": FormatSpec("stepwise", ("prompt", "completions", "labels"),
                           doc="prompt with a list of steps and one label per step, for process reward models"),
    "unpaired": FormatSpec("unpaired", ("prompt", "completion", "label"), ("tools",),
                           doc="prompt -> completion with a label: true (or 1) if the completion is desirable, false "
                               "(or 0) if not (KTO)"),
}

# Fields that hold lists or numbers: a CSV cell holds them as JSON text (see sources.py).
STRUCTURED_FIELDS = ("messages", "responses", "scores", "steps", "completions", "labels", "margin",
                     "preference_prob", "label", "tools")

# Ambiguous column sets are resolved in this order (preference rows also have a prompt, etc.; unpaired rows
# are completion rows with a label, so they come first).
_DETECTION_ORDER = ("preference", "ranking", "stepwise", "unpaired", "completion", "messages", "text", "verifiable")


@dataclass(frozen=True)
class Where:
    """Where a row came from: a file (or `<rows>`, `task:<name>`) and its line or 1-based row number."""

    file: str
    line: int | None = None

    def error(self, message: str, field: str | None = None) -> DataError:
        return DataError(message, file=self.file, line=self.line, field=field)


def detect_format(columns: Sequence[str], accepts: Sequence[str], where: Where) -> str:
    """The first accepted format whose required columns are all present.

    When none fits, the error names the accepted format that came closest and the column it misses,
    with a close column name and the rename that would use it.
    """
    present = set(columns)
    for name in sorted(accepts, key=_DETECTION_ORDER.index):
        if all(column in present for column in SPECS[name].required):
            return name
    closest = max(accepts, key=lambda name: sum(c in present for c in SPECS[name].required))
    missing = next(c for c in SPECS[closest].required if c not in present)
    formats = " or ".join(f"{n} ({', '.join(SPECS[n].required)})" for n in accepts)
    raise where.error(f"missing column {missing!r}{suggest_column(missing, columns)} This stage takes "
                      f"{formats}; the rows have: {', '.join(columns) or 'no columns'}.", field=missing)


def suggest_column(missing: str, columns: Sequence[str]) -> str:
    """' — did you mean 'x'? (rename it with data.columns.missing=x).' or '.'"""
    close = difflib.get_close_matches(missing, list(columns), n=1, cutoff=0.5)
    if not close:
        return "."
    return f" — did you mean {close[0]!r}? (rename it with data.columns.{missing}={close[0]})."


def normalise_row(raw: Mapping[str, Any], fmt: str, where: Where, imitates: bool = False) -> dict[str, Any]:
    """Validate one (renamed) row of format `fmt` and return its canonical form (see FEATURES). `imitates`: the
    stage trains towards every completion it reads (SFT), so a completion row labelled undesirable is refused."""
    if not isinstance(raw, Mapping):
        raise where.error(f"a row must be an object of columns, got {_kind(raw)}")
    spec = SPECS[fmt]
    for column in spec.required:
        if column in raw and raw[column] is None:  # the column is there, this row's value is not
            raise where.error("is null: this row has no value for it", field=column)
        if column not in raw:
            raise where.error(f"missing column {column!r}{suggest_column(column, list(raw))}", field=column)
    if imitates and fmt == "completion":
        _refuse_undesirable(raw, where)
    return _NORMALISERS[fmt](raw, where) | {"line": where.line}


def _refuse_undesirable(raw: Mapping[str, Any], where: Where) -> None:
    """An unpaired (KTO) row labelled false (or 0) reads as a prompt-completion row too, and a stage that imitates
    its completions would train towards the one it is labelled to avoid. Other stages reading completion rows
    (offline RFT's graders, say) may read a `label` column as they like."""
    label = raw.get("label")
    if isinstance(label, (int, float)) and label == 0:  # False too (a bool is an int), as `_unpaired` reads it
        raise where.error(f"is {label!r}: an unpaired row whose completion is one to avoid, and this stage "
                          "trains towards every completion it is given; train such rows with `posttrain kto`, or "
                          "leave the rows labelled false out", field="label")


# ----------------------------------------------------------------------------------------------
# One normaliser per format.


def _completion(raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    prompt = _prompt(raw["prompt"], where)
    completion = _answer(raw["completion"], "completion", where)
    return {"prompt": prompt, "completion": completion, "tools": _tools(raw.get("tools"), where)}


def _messages(raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    messages = _message_list(raw["messages"], "messages", where)
    if not any(m["role"] == "assistant" for m in messages):
        raise where.error("the conversation has no assistant turn: nothing to train on", field="messages")
    return {"messages": messages, "tools": _tools(raw.get("tools"), where)}


def _text(raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    text = raw["text"]
    if not isinstance(text, str):
        raise where.error(f"must be text, got {_kind(text)}", field="text")
    if not text.strip():
        raise where.error("empty text: nothing to train on", field="text")
    return {"text": text}


def _preference(raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    if raw.get("prompt") is None:
        prompt, chosen, rejected = _split_implicit_prompt(raw["chosen"], raw["rejected"], where)
    else:
        prompt = _prompt(raw["prompt"], where)
        chosen = _answer(raw["chosen"], "chosen", where)
        rejected = _answer(raw["rejected"], "rejected", where)
    if chosen == rejected:
        raise where.error("chosen and rejected are identical: the pair carries no preference", field="rejected")
    margin = raw.get("margin")
    if margin is not None:
        margin = _number(margin, "margin", where)
    probability = raw.get("preference_prob")
    if probability is not None:
        probability = _number(probability, "preference_prob", where)
        if not 0.0 <= probability <= 1.0:
            raise where.error(f"must be a probability in [0, 1], got {probability}", field="preference_prob")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": margin,
            "preference_prob": probability, "tools": _tools(raw.get("tools"), where)}


def _split_implicit_prompt(chosen: Any, rejected: Any,
                           where: Where) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(prompt, chosen, rejected) of a pair given as two whole conversations (or texts) with a shared start
    (TRL's implicit prompt). Conversations split at the first message in which they differ, which must be an
    assistant turn; texts at the last whitespace before the first character in which they differ."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        common = shared_start(chosen, rejected)
        cut = max(chosen.rfind(" ", 0, common + 1), chosen.rfind("\n", 0, common + 1))
        if cut <= 0 or not chosen[:cut].strip():
            raise where.error("no prompt column, and chosen and rejected share no beginning to use as the prompt "
                              "(give a `prompt` column)", field="prompt")
        return ([message("user", chosen[:cut])], [_assistant_turn(chosen[cut:], None, "chosen", where)],
                [_assistant_turn(rejected[cut:], None, "rejected", where)])
    if isinstance(chosen, str) or isinstance(rejected, str):
        raise where.error("no prompt column: chosen and rejected must both be conversations (or both texts) that "
                          "share their beginning", field="rejected" if isinstance(chosen, list) else "chosen")
    chosen_turns = _message_list(chosen, "chosen", where)
    rejected_turns = _message_list(rejected, "rejected", where)
    common = shared_start(chosen_turns, rejected_turns)
    if common == 0:
        raise where.error("no prompt column, and the chosen and rejected conversations differ from their first "
                          "message: there is no shared prompt (give a `prompt` column)", field="prompt")
    for name, turns in (("chosen", chosen_turns), ("rejected", rejected_turns)):
        if common == len(turns) or turns[common]["role"] != "assistant":
            raise where.error(f"the conversations part at message {common}, which must be an assistant turn in "
                              "both (the shared turns before it are the prompt)", field=f"{name}[{common}]")
    return chosen_turns[:common], chosen_turns[common:], rejected_turns[common:]


def shared_start(a: Sequence[Any], b: Sequence[Any]) -> int:
    """How many leading items (characters, messages) `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _ranking(raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    prompt = _prompt(raw["prompt"], where)
    items = raw["responses"]
    if not isinstance(items, list):
        raise where.error(f"must be a list of responses, got {_kind(items)}", field="responses")
    if len(items) < 2:
        raise where.error(f"a ranking needs at least 2 responses, got {len(items)}", field="responses")
    responses = [_answer(r, f"responses[{i}]", where) for i, r in enumerate(items)]
    scores = raw.get("scores")
    if scores is not None:
        if not isinstance(scores, list):
            raise where.error(f"must be a list of numbers, got {_kind(scores)}", field="scores")
        if len(scores) != len(responses):
            raise where.error(f"{len(scores)} scores for {len(responses)} responses: need one score per "
                              "response", field="scores")
        scores = [_number(s, f"scores[{i}]", where) for i, s in enumerate(scores)]
        # Equal scores are a tie (the losses and metrics order nothing between tied responses); a ranking whose
        # scores are all equal states no preference at all.
        if len(set(scores)) == 1:
            raise where.error(f"all {len(scores)} responses have the same score ({scores[0]:g}): the ranking prefers "
                              "none of them (drop the row, or give the responses different scores)", field="scores")
    # A response listed twice must be tied with itself: no model can rank a response above itself.
    for i in range(len(responses)):
        for j in range(i):
            if responses[j] == responses[i] and (scores is None or scores[j] != scores[i]):
                raise where.error(f"responses[{j}] and responses[{i}] are identical"
                                  + (f" but scored {scores[j]:g} and {scores[i]:g}" if scores else "")
                                  + ": a ranking cannot put a response above itself (drop one, or give them equal "
                                  "`scores`: a tie)", field="scores" if scores else "responses")
    if scores is not None:
        order = sorted(range(len(responses)), key=lambda i: -scores[i])  # best first; ties keep their order
        responses, scores = [responses[i] for i in order], [scores[i] for i in order]
    return {"prompt": prompt, "responses": responses, "scores": scores, "tools": _tools(raw.get("tools"), where)}


def _verifiable(raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    prompt = _prompt(raw["prompt"], where)
    if prompt[-1]["role"] == "assistant":
        # The sampler opens a new assistant turn after the prompt; a prefilled start of the answer would be closed
        # as a finished turn (and the reward model, graders and kept samples would read it as one): refused.
        raise where.error("ends with an assistant message: a completion is sampled as a new assistant turn after "
                          "the prompt, and a prefilled answer start is not continued; end the prompt with the "
                          "user's (or a tool's) message", field=f"prompt[{len(prompt) - 1}].role")
    answer = None if raw.get("answer") is None else _scalar_text(raw["answer"], "answer", where)
    steps = raw.get("steps")
    if steps is not None:
        if not isinstance(steps, list) or not steps:
            raise where.error(f"must be a non-empty list of per-step gold values, got {_kind(steps)}",
                              field="steps")
        steps = [_scalar_text(s, f"steps[{i}]", where) for i, s in enumerate(steps)]
    return {"prompt": prompt, "answer": answer, "steps": steps, "tools": _tools(raw.get("tools"), where),
            "row": _row_json(raw, where)}


def _row_json(raw: Mapping[str, Any], where: Where) -> str:
    """The row as given (every column, under its name after renames) as JSON text: what reward functions and
    graders read beyond the canonical columns (a `solution`, the `tests` of a coding task)."""
    try:
        return json.dumps(dict(raw), ensure_ascii=False, default=_json_default)
    except (TypeError, ValueError) as err:
        raise where.error(f"a column cannot be kept for reward functions: {err}") from None


def _json_default(value: Any) -> Any:
    """Parquet and `datasets` cells that JSON has no spelling for: numpy scalars and arrays, dates, bytes."""
    for convert in ("tolist", "isoformat"):
        if hasattr(value, convert):
            return getattr(value, convert)()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _stepwise(raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    prompt = _prompt(raw["prompt"], where)
    steps, labels = raw["completions"], raw["labels"]
    if not isinstance(steps, list) or not steps:
        raise where.error(f"must be a non-empty list of steps, got {_kind(steps)}", field="completions")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise where.error(f"a step must be text, got {_kind(step)}", field=f"completions[{i}]")
        if not step.strip():
            raise where.error("empty step", field=f"completions[{i}]")
        if len(step.rstrip("\r\n").splitlines()) > 1:  # every break `splitlines` takes, as the PRM's scoring does
            # Steps render one per line and a process reward model is read at each line's end, in training and
            # when it scores RL completions line by line: a step of two lines would be scored as two there.
            raise where.error("a step holds a line break: steps are one line each (a process reward model is read "
                              "at the end of each line); split the step in two, or join its lines",
                              field=f"completions[{i}]")
    # A step's own line ending (steps written one per line) is the line break that renders it: not a second one
    steps = [step.rstrip("\r\n") for step in steps]
    if not isinstance(labels, list):
        raise where.error(f"must be a list of labels (bool or score), got {_kind(labels)}", field="labels")
    if len(labels) != len(steps):
        raise where.error(f"{len(labels)} labels for {len(steps)} steps: need one label per step", field="labels")
    values = []
    for i, label in enumerate(labels):
        if isinstance(label, bool):
            values.append(float(label))
        else:
            values.append(_number(label, f"labels[{i}]", where))
    return {"prompt": prompt, "completions": list(steps), "labels": values}


def _unpaired(raw: Mapping[str, Any], where: Where) -> dict[str, Any]:
    label = raw["label"]
    # 0/1 as well as booleans: CSV cells and many exported datasets spell the label as a number.
    if not isinstance(label, bool) and not (isinstance(label, (int, float)) and label in (0, 1)):
        raise where.error(f"must be true/false (or 1/0): whether the completion is desirable, got {label!r}",
                          field="label")
    return _completion(raw, where) | {"label": bool(label)}


_NORMALISERS = {"completion": _completion, "messages": _messages, "text": _text, "preference": _preference,
                "ranking": _ranking, "verifiable": _verifiable, "stepwise": _stepwise, "unpaired": _unpaired}


# ----------------------------------------------------------------------------------------------
# Field checks.


def _prompt(value: Any, where: Where) -> list[dict[str, Any]]:
    """A prompt: non-empty text (one user turn) or a message list."""
    if isinstance(value, str):
        if not value.strip():
            raise where.error("empty prompt", field="prompt")
        return [message("user", value)]
    messages = _message_list(value, "prompt", where)
    if not messages:
        raise where.error("empty prompt (no messages)", field="prompt")
    return messages


def _answer(value: Any, field: str, where: Where) -> list[dict[str, Any]]:
    """An answer: non-empty text (one assistant turn) or messages with at least one assistant turn."""
    if isinstance(value, str):
        return [_assistant_turn(value, None, field, where)]
    messages = _message_list(value, field, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise where.error("has no assistant turn: nothing to train on", field=field)
    return messages


def _message_list(value: Any, field: str, where: Where) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise where.error(f"must be text or a list of messages, got {_kind(value)}", field=field)
    if not value:
        raise where.error("empty list of messages", field=field)
    out = []
    for i, item in enumerate(value):
        here = f"{field}[{i}]"
        if not isinstance(item, Mapping):
            raise where.error(f"a message must be an object with role and content, got {_kind(item)}",
                              field=here)
        if "role" not in item:
            raise where.error(f"message has no 'role'{suggest_column('role', list(item))}", field=f"{here}.role")
        role, tool_calls = item["role"], _tool_calls(item.get("tool_calls"), f"{here}.tool_calls", where)
        if role not in ROLES:
            raise where.error(f"unknown role {role!r}: use one of {', '.join(ROLES)}", field=f"{here}.role")
        if tool_calls is not None and role != "assistant":
            raise where.error("only assistant turns make tool calls", field=f"{here}.tool_calls")
        content = item.get("content")
        if content is None and tool_calls is None:
            # A null content is there, only empty: the advice to rename a column to 'content' named itself
            raise where.error("content is null (only an assistant turn that makes tool calls may have none)"
                              if "content" in item else
                              f"message has no 'content'{suggest_column('content', list(item))}",
                              field=f"{here}.content")
        content = "" if content is None else content
        if not isinstance(content, str):
            raise where.error(f"content must be text, got {_kind(content)}", field=f"{here}.content")
        reasoning = item.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, str):
            raise where.error(f"reasoning must be text, got {_kind(reasoning)}", field=f"{here}.reasoning")
        names = {key: item.get(key) for key in ("name", "tool_call_id")}
        for key, value in names.items():
            if value is not None and not isinstance(value, str):
                raise where.error(f"{key} must be text, got {_kind(value)}", field=f"{here}.{key}")
        if role == "assistant":
            out.append(_assistant_turn(content, reasoning, f"{here}.content", where, tool_calls))
        else:
            if not content.strip():
                raise where.error(f"empty {role} message", field=f"{here}.content")
            out.append(message(role, content, **names))
    return out


def tools_json(value: Any) -> str | None:
    """A row's `tools` as given (a list of function schemas, or its JSON text) as the JSON text rows keep; a
    DataError for anything else."""
    return _tools(value, Where("<row>"))


def _tools(value: Any, where: Where) -> str | None:
    """The function schemas a row offers the model (TRL's `tools` column): a list of objects, or its JSON text;
    kept as JSON text for the chat template."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise where.error(f"tools given as text must be JSON: {err.msg}", field="tools") from None
    if not isinstance(value, list) or not all(isinstance(tool, Mapping) for tool in value):
        raise where.error(f"must be a list of function schemas (objects), got {_kind(value)}", field="tools")
    return json.dumps(value, ensure_ascii=False) if value else None


def _tool_calls(value: Any, field: str, where: Where) -> str | None:
    """An assistant turn's tool calls, OpenAI style ({"type": "function", "function": {"name", "arguments"}},
    or {"name", "arguments"}), checked and kept as JSON text for the template to render."""
    if value is None:
        return None
    if isinstance(value, str):  # as rows keep them (a prompt sampled from and written back into a row): JSON text
        try:
            value = json.loads(value)
        except ValueError:
            raise where.error("must be a non-empty list of tool calls, got text that is no JSON", field=field) \
                from None
    if not isinstance(value, list) or not value:
        raise where.error(f"must be a non-empty list of tool calls, got {_kind(value)}", field=field)
    for i, call in enumerate(value):
        function = call.get("function", call) if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise where.error("a tool call needs a function name: {\"type\": \"function\", \"function\": "
                              "{\"name\": ..., \"arguments\": {...}}}", field=f"{field}[{i}]")
    return json.dumps(value, ensure_ascii=False)


def holds_as_answer(text: str) -> bool:
    """Whether `text` (a sampled completion) can be an assistant turn's answer in a training row: not empty, and
    any <think>...</think> block opening it. A model can sample anything, a stray "<think>" included."""
    try:
        _assistant_turn(text, None, "answer", Where("<sample>"))
    except DataError:
        return False
    return True


def _assistant_turn(content: str, reasoning: str | None, field: str, where: Where,
                    tool_calls: str | None = None) -> dict[str, Any]:
    """An assistant turn with its thinking block (if any) moved into `reasoning`. A turn that calls tools may
    have no text."""
    text = content.strip()
    if text.startswith(THINK_OPEN):
        if reasoning is not None:
            raise where.error("both a `reasoning` field and a <think> block: give the chain of thought once",
                              field=field)
        close = text.find(THINK_CLOSE)
        if close < 0:
            raise where.error("<think> block is never closed with </think>", field=field)
        reasoning = text[len(THINK_OPEN):close].strip()
        content = text[close + len(THINK_CLOSE):].strip()
    if THINK_OPEN in content or THINK_CLOSE in content:
        raise where.error("a <think>...</think> block must open the assistant turn, before the answer",
                          field=field)
    if not content.strip() and tool_calls is None:
        what = "empty completion" if reasoning is None else "empty answer after the thinking block"
        raise where.error(f"{what}: nothing to train on", field=field)
    return message("assistant", content, reasoning, tool_calls=tool_calls)


def message(role: str, content: str, reasoning: str | None = None, *, tool_calls: str | None = None,
            name: str | None = None, tool_call_id: str | None = None) -> dict[str, Any]:
    """One canonical message (every key present: Arrow stores one schema)."""
    return {"role": role, "content": content, "reasoning": reasoning, "tool_calls": tool_calls, "name": name,
            "tool_call_id": tool_call_id}


def prompt_as_given(prompt: Any) -> Any:
    """A prompt for a person to read (samples.jsonl, error records): the text of a prompt that is one user message,
    as the data gave it, else its messages (a system prompt, earlier turns, a tool's result: the last message alone
    showed a multi-turn prompt as a tool's "17")."""
    if not isinstance(prompt, list) or not all(isinstance(m, Mapping) for m in prompt):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return prompt[0].get("content")
    return [plain_message(m) for m in prompt]


def tools_as_given(columns: Mapping[str, Any]) -> dict[str, Any]:
    """`{"tools": ...}` of a row (its columns as the data gave them) that has tool schemas, else `{}`: what a record
    of its completion (samples.jsonl, scored.jsonl) keeps beside the prompt, so that a kept completion is an SFT row
    again with the tools its prompt was rendered with."""
    tools = columns.get("tools")
    return {"tools": tools} if tools else {}


def _number(value: Any, field: str, where: Where) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"must be a number, got {_kind(value)}", field=field)
    if not math.isfinite(value):
        raise where.error(f"must be a finite number, got {value}", field=field)
    return float(value)


def _scalar_text(value: Any, field: str, where: Where) -> str:
    """Gold answers may be given as numbers; they are compared as text, so store them as text."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise where.error(f"must be text or a number, got {_kind(value)}", field=field)
    if isinstance(value, float) and not math.isfinite(value):
        raise where.error(f"must be a finite number, got {value}", field=field)
    if isinstance(value, float) and value.is_integer():
        # 5.0 is the answer 5: a JSON writer's float, or pandas' integer column with a missing value (float64)
        value = int(value)
    text = str(value).strip()
    if not text:
        raise where.error("empty", field=field)
    return text


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "an integer",
            float: "a number"}.get(type(value), type(value).__name__)
