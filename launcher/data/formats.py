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
from typing import Any

from launcher.data.example import (  # noqa: F401  (re-exported: the format vocabulary)
    IGNORE,
    FormatContext,
    RowError,
    TooLong,
    label_of,
    labels_of,
    render_with_spans,
    score_of,
)

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


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
    if ctx.over(len(ids), ctx.max_length, "the example", "data.max_length"):
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
    ids = _bos(tok) + _encode(tok, _field(row, ctx.cfg.text_field)) + [tok.eos_token_id]
    return _finish_lm(ctx, ids, list(ids))


def alpaca(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """instruction / input / output; loss on the output and EOS only."""
    tok = ctx.tokenizer
    instruction = _field(row, "instruction")
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise RowError("field 'input' must be a string")
    template = ctx.cfg.prompt_template or ALPACA_TEMPLATE
    prompt = template.format(
        instruction=instruction,
        input=extra,
        with_input=", paired with an input that provides further context" if extra else "",
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )
    prompt_ids = _bos(tok) + _encode(tok, prompt)
    answer_ids = _encode(tok, _field(row, "output")) + [tok.eos_token_id]
    ids = prompt_ids + answer_ids
    if ctx.cfg.train_on_prompt:
        return _finish_lm(ctx, ids, list(ids))
    return _finish_lm(ctx, ids, [IGNORE] * len(prompt_ids) + answer_ids)


def chat(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """OpenAI-style messages rendered with the tokenizer's chat template.

    Loss falls on assistant turns only, including the template's end-of-turn token.
    Spans come from rendering each prefix of the conversation: the text the template
    adds for assistant turn i is render(msgs[:i+1]) minus render(msgs[:i], generation
    prompt). The whole conversation is tokenized once and characters map to tokens
    through the offsets, so tokens match exactly what the model sees at inference.
    """
    tok = ctx.tokenizer
    msgs = _field(row, ctx.cfg.messages_field, list)
    for i, m in enumerate(msgs):
        if (
            isinstance(m, dict)
            and isinstance(m.get("content"), list)
            and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"])
        ):
            raise RowError(
                f"message {i} holds an image, but this task trains a text-only model "
                "(use task: vision_language, format: vision_chat with a vision-language model)"
            )
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

    full, spans = render_with_spans(tok, msgs)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(enc["offset_mapping"]):
        # a token overlapping an answer is learned: a template ending its prompt with a
        # space ("ASSISTANT: ") leaves the space in the answer's first token (" a")
        if b > a and any(a < e and b > s for s, e in spans):
            labels[t] = ids[t]
    # EOS must be learned, or the model never stops: add it if the template lacks it.
    if tok.eos_token_id not in [x for x in labels if x != IGNORE]:
        ids.append(tok.eos_token_id)
        labels.append(tok.eos_token_id)
    if ctx.cfg.train_on_prompt:  # every token: system, user and template text too
        labels = list(ids)
    return _finish_lm(ctx, ids, labels)


def _encode_text(ctx: FormatContext, text: str) -> list[int]:
    ids = ctx.tokenizer(text)["input_ids"]
    if ctx.over(len(ids), ctx.max_length, "the text", "data.max_length"):
        ids = ctx.tokenizer(text, truncation=True, max_length=ctx.max_length)["input_ids"]
    return ids


def text_classification(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """text + label -> token ids and one class id, a multi-hot row, or a score."""
    text = _field(row, ctx.cfg.text_field)
    if ctx.label_kind == "score":
        return {"input_ids": _encode_text(ctx, text), "labels": score_of(row, ctx.cfg.label_field)}
    if ctx.label_kind == "multi_hot":
        hot = [0.0] * len(ctx.label2id)
        for label in labels_of(row, ctx.cfg.label_field):
            if label not in ctx.label2id:
                raise RowError(f"label '{label}' is not in the label set {sorted(ctx.label2id)}")
            hot[ctx.label2id[label]] = 1.0
        return {"input_ids": _encode_text(ctx, text), "labels": hot}
    label = label_of(row, ctx.cfg.label_field)
    if label not in ctx.label2id:
        raise RowError(f"label '{label}' is not in the label set {sorted(ctx.label2id)}")
    return {"input_ids": _encode_text(ctx, text), "labels": ctx.label2id[label]}


def tags_of(row: dict[str, Any], ctx: FormatContext) -> tuple[list[str], list[str]]:
    """The words and their tags, checked: equal lengths, non-empty strings."""
    words = _field(row, ctx.cfg.tokens_field, list)
    tags = _field(row, ctx.cfg.tags_field, list)
    if len(words) != len(tags):
        raise RowError(
            f"{len(words)} {ctx.cfg.tokens_field} but {len(tags)} {ctx.cfg.tags_field}: "
            "every word needs exactly one tag"
        )
    for i, w in enumerate(words):
        if not isinstance(w, str) or not w.strip():
            raise RowError(f"{ctx.cfg.tokens_field}[{i}] must be a non-empty string, got {w!r}")
    for i, t in enumerate(tags):
        if not isinstance(t, str) or not t.strip():
            raise RowError(f"{ctx.cfg.tags_field}[{i}] must be a non-empty string, got {t!r}")
    return words, [t.strip() for t in tags]


def token_tags(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """Words + one tag per word -> sub-word ids; the first sub-token of each word carries
    the word's tag, the other sub-tokens and the special tokens are ignored (-100)."""
    words, tags = tags_of(row, ctx)
    for i, t in enumerate(tags):
        if t not in ctx.label2id:
            raise RowError(
                f"tag '{t}' ({ctx.cfg.tags_field}[{i}]) is not in the tag set the model was "
                f"built with: {sorted(ctx.label2id)} (add it to data.labels)"
            )
    tok = ctx.tokenizer
    if not getattr(tok, "is_fast", False):
        raise RowError("token classification needs a fast tokenizer (word_ids)")
    enc = tok(words, is_split_into_words=True)
    if ctx.over(len(enc["input_ids"]), ctx.max_length, "the sentence", "data.max_length"):
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=ctx.max_length)
    labels, seen = [], set()
    for w in enc.word_ids():
        if w is None or w in seen:
            labels.append(IGNORE)
        else:
            seen.add(w)
            labels.append(ctx.label2id[tags[w]])
    if all(x == IGNORE for x in labels):
        raise RowError("no word survived tokenization")
    return {"input_ids": list(enc["input_ids"]), "labels": labels}


def translation(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """source -> target for encoder-decoder models: the loss falls on every target token,
    EOS included; the decoder is fed the labels shifted right (teacher forcing)."""
    tok = ctx.tokenizer
    source = ctx.cfg.source_prefix + _field(row, ctx.cfg.source_field)
    target = _field(row, ctx.cfg.target_field)
    ids = tok(source)["input_ids"]
    if ctx.over(len(ids), ctx.max_length, "the source", "data.max_length"):
        ids = tok(source, truncation=True, max_length=ctx.max_length)["input_ids"]
    labels = tok(text_target=target)["input_ids"]
    if not labels or labels[-1] != tok.eos_token_id:
        labels = [*labels, tok.eos_token_id]  # the model must learn to stop
    if ctx.over(len(labels), ctx.cfg.max_target_length, "the target", "data.max_target_length"):
        labels = [*labels[: ctx.cfg.max_target_length - 1], tok.eos_token_id]
    return {"input_ids": ids, "labels": labels}


def image_classification(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """image path + label (see launcher.data.images, which imports PIL only when used)."""
    from launcher.data.images import image_classification as fn

    return fn(row, ctx)


def vision_chat(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """a conversation with images (see launcher.data.vlm: PIL and the processor)."""
    from launcher.data.vlm import vision_chat as fn

    return fn(row, ctx)


FORMATS: dict[str, Callable[[dict[str, Any], FormatContext], dict[str, Any]]] = {
    "completion": completion,
    "alpaca": alpaca,
    "chat": chat,
    "text_classification": text_classification,
    "token_tags": token_tags,
    "translation": translation,
    "image_classification": image_classification,
    "vision_chat": vision_chat,
}
