"""Format registry: how one data row becomes one tokenized training example.

Each format is `fn(row, ctx) -> example`, where an example is a dict with `input_ids`
and `labels` (a token list for language modelling, one class id for classification).
A row the format cannot use raises `RowError`; the reader turns it into an error with
the file and line, or skips it when the recipe says `on_bad_row: skip`.

Language-modelling labels mark loss positions explicitly (-100 elsewhere), so padding is
masked by position and never by token id: a pad token equal to EOS cannot hide EOS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IGNORE = -100

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class RowError(ValueError):
    """This row cannot be used; the message says why."""


@dataclass
class FormatContext:
    tokenizer: Any
    max_length: int
    text_field: str = "text"
    label_field: str = "label"
    messages_field: str = "messages"
    label2id: dict[str, int] = field(default_factory=dict)
    prompt_template: str | None = None
    stats: dict[str, int] = field(default_factory=lambda: {"truncated": 0})


def _field(row: dict[str, Any], name: str, kind: type = str) -> Any:
    if name not in row:
        raise RowError(f"missing field '{name}' (row has: {', '.join(map(str, row)) or 'nothing'})")
    value = row[name]
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise RowError(f"field '{name}' must be a non-empty {kind.__name__}")
    return value


def _encode(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _finish_lm(ctx: FormatContext, ids: list[int], labels: list[int]) -> dict[str, Any]:
    if len(ids) > ctx.max_length:
        ctx.stats["truncated"] += 1
        ids, labels = ids[: ctx.max_length], labels[: ctx.max_length]
    if all(x == IGNORE for x in labels):
        raise RowError(f"nothing left to learn after truncation to max_length={ctx.max_length}")
    return {"input_ids": ids, "labels": labels}


def _bos(tok: Any) -> list[int]:
    # Llama-style tokenizers want BOS first; templates that render it already skip this.
    return (
        [tok.bos_token_id]
        if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None
        else []
    )


def completion(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """Raw text; loss on every token, EOS appended."""
    tok = ctx.tokenizer
    ids = _bos(tok) + _encode(tok, _field(row, ctx.text_field)) + [tok.eos_token_id]
    return _finish_lm(ctx, ids, list(ids))


def alpaca(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """instruction / input / output; loss on the output and EOS only."""
    tok = ctx.tokenizer
    instruction = _field(row, "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RowError("field 'input' must be a string")
    template = ctx.prompt_template or ALPACA_TEMPLATE
    prompt = template.format(
        instruction=instruction,
        input=extra,
        with_input=", paired with an input that provides further context" if extra else "",
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
    prompt_ids = _bos(tok) + _encode(tok, prompt)
    answer_ids = _encode(tok, _field(row, "output")) + [tok.eos_token_id]
    return _finish_lm(ctx, prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids)


def chat(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """OpenAI-style messages rendered with the tokenizer's chat template.

    Loss falls on assistant turns only, including the template's end-of-turn token.
    Spans come from rendering each prefix of the conversation: the text the template
    adds for assistant turn i is render(msgs[:i+1]) minus render(msgs[:i], generation
    prompt). The whole conversation is tokenized once and characters map to tokens
    through the offsets, so tokens match exactly what the model sees at inference.
    """
    tok = ctx.tokenizer
    msgs = _field(row, ctx.messages_field, list)
    for i, m in enumerate(msgs):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise RowError(f"message {i} must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RowError("no assistant message: nothing to learn")
    if msgs[0]["role"] == "assistant":
        raise RowError("the conversation starts with an assistant message (nothing prompts it)")
    if tok.chat_template is None:
        raise RowError("the tokenizer has no chat template (use format: alpaca or completion)")

    def render(part: list[dict[str, Any]], gen: bool) -> str:
        try:
            return tok.apply_chat_template(part, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja's raise_exception(): e.g. roles must alternate
            raise RowError(f"the chat template refused this conversation: {e}") from None

    full = render(msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prompt, turn = render(msgs[:i], True), render(msgs[: i + 1], False)
        if not (full.startswith(turn) and turn.startswith(prompt)):
            raise RowError("the chat template does not render conversations incrementally")
        spans.append((len(prompt), len(turn)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        if any(s <= a and b <= e and b > a for s, e in spans):
            labels[t] = ids[t]
    # EOS must be learned, or the model never stops: add it if the template lacks it.
    if tok.eos_token_id not in [x for x in labels if x != IGNORE]:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    return _finish_lm(ctx, ids, labels)


def label_of(row: dict[str, Any], name: str) -> str:
    """A class label as text: a non-empty string or an integer (1 and "1" are one class)."""
    if name not in row:
        raise RowError(f"missing field '{name}'")
    value = row[name]
    if (
        isinstance(value, bool)
        or not isinstance(value, (str, int))
        or (isinstance(value, str) and not value.strip())
    ):
        raise RowError(f"field '{name}' must be a non-empty string or an integer, got {value!r}")
    return str(value).strip()


def text_classification(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """text + label -> truncated token ids and one class id."""
    text = _field(row, ctx.text_field)
    label = label_of(row, ctx.label_field)
    if label not in ctx.label2id:
        raise RowError(f"label '{label}' is not in the label set {sorted(ctx.label2id)}")
    ids = ctx.tokenizer(text, truncation=True, max_length=ctx.max_length)["input_ids"]
    return {"input_ids": ids, "labels": ctx.label2id[label]}


FORMATS: dict[str, Callable[[dict[str, Any], FormatContext], dict[str, Any]]] = {
    "completion": completion,
    "alpaca": alpaca,
    "chat": chat,
    "text_classification": text_classification,
}
