"""Vision-language chat: the `vision_chat` format and its collator.

A row is a conversation whose user turns hold images, in either of two shapes:

- content parts: `{"role": "user", "content": [{"type": "image", "image": "cat.png"},
  {"type": "text", "text": "What is this?"}]}` (the transformers / OpenAI shape);
- an `images` list beside the messages, with one `<image>` placeholder per image in the
  message text (the LLaVA / ShareGPT shape): `{"images": ["cat.png"], "messages": [{"role":
  "user", "content": "<image>\\nWhat is this?"}, ...]}`.

Image paths are relative to the data file's folder. The conversation is rendered by the
processor's own chat template and expanded by the processor itself (one image becomes
as many image tokens as the model needs: fixed for LLaVA, size-dependent for Qwen2-VL
and Idefics3), so the token count is measured after expansion. Loss falls on assistant
text only: the spans are found in the rendered text, carried through the processor's
placeholder replacements (`return_text_replacement_offsets`) and mapped to tokens by
their character offsets. Image tokens never carry loss.

An example that does not fit `max_length` is never cut through its image tokens: under
`too_long: truncate` the text after the last image may be cut; if the images alone do
not fit, the example is dropped and counted (`dropped_images_too_long`).

The example keeps the rendered text and the image paths, not pixels: each micro-batch
runs the processor again (pixels, grids, masks as the model wants them) and checks that
it gives the same token ids.
"""

from __future__ import annotations

from typing import Any

from launcher.data.example import IGNORE, FormatContext, RowError, TooLong, render_with_spans
from launcher.data.images import check_image
from launcher.models.families import prefix_lm

PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


def _parts(row: dict[str, Any], ctx: FormatContext) -> tuple[list[dict[str, Any]], list[str]]:
    """The conversation as content parts (images as {"type": "image"}) and the image paths
    in order."""
    msgs = row.get(ctx.cfg.messages_field)
    if not isinstance(msgs, list) or not msgs:
        raise RowError(f"field '{ctx.cfg.messages_field}' must be a non-empty list of messages")
    listed = row.get(ctx.cfg.images_field)
    if listed is not None and (
        not isinstance(listed, list) or not all(isinstance(p, str) and p for p in listed)
    ):
        raise RowError(f"field '{ctx.cfg.images_field}' must be a list of image paths")
    out, paths, placeholders = [], [], 0
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RowError(f"message {i} must be an object with a role in {ROLES}")
        content = m.get("content")
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            pieces = content.split(PLACEHOLDER)
            for k, piece in enumerate(pieces):
                if k:
                    parts.append({"type": "image"})
                    placeholders += 1
                if piece.strip():
                    parts.append({"type": "text", "text": piece.strip()})
        elif isinstance(content, list):
            for j, p in enumerate(content):
                kind = p.get("type") if isinstance(p, dict) else None
                if kind == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                elif kind == "image":
                    path = p.get("image", p.get("path"))
                    if not isinstance(path, str) or not path:
                        raise RowError(f"message {i} part {j}: an image part needs an 'image' path")
                    parts.append({"type": "image"})
                    paths.append(path)
                else:
                    raise RowError(
                        f"message {i} part {j} must be {{'type': 'text', 'text': ...}} or "
                        "{'type': 'image', 'image': PATH}"
                    )
        else:
            raise RowError(f"message {i}: content must be a string or a list of parts")
        if not parts:
            raise RowError(f"message {i} is empty")
        if m["role"] != "user" and any(p["type"] == "image" for p in parts):
            raise RowError(f"message {i}: images belong in user turns, not in '{m['role']}'")
        out.append({"role": m["role"], "content": parts})
    if placeholders and paths:
        raise RowError(
            "use either image parts or <image> placeholders with an images list, not both"
        )
    if placeholders or listed is not None:
        listed = listed or []
        if placeholders != len(listed):
            raise RowError(
                f"{placeholders} {PLACEHOLDER} placeholders in the messages but "
                f"{len(listed)} images in '{ctx.cfg.images_field}': each image needs one placeholder"
            )
        paths = list(listed)
    if not any(m["role"] == "assistant" for m in out):
        raise RowError("no assistant message: nothing to learn")
    if out[0]["role"] == "assistant":
        raise RowError("the conversation starts with an assistant message (nothing prompts it)")
    return out, paths


def open_images(paths: list[str]) -> list[Any]:
    from PIL import Image

    images = []
    for p in paths:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return images


def vision_chat(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """One conversation with images -> expanded token ids, assistant-only labels, the
    rendered text and the image paths (see the module docstring)."""
    proc = ctx.tokenizer
    msgs, paths = _parts(row, ctx)
    for p in paths:
        check_image(p)
    if prefix_lm(proc):
        return _prefix_suffix(msgs, paths, ctx)

    full, spans = render_with_spans(proc, msgs)
    try:
        enc = proc(
            text=[full],
            images=open_images(paths) if paths else None,
            add_special_tokens=False,
            return_offsets_mapping=True,
            return_text_replacement_offsets=True,
        )
    except ValueError as e:  # e.g. the template rendered another number of image tokens
        raise RowError(f"the processor refused this conversation: {e}") from None
    ids = list(enc["input_ids"][0])
    replaced = enc.get("text_replacement_offsets") or [[]]
    shifts = [
        (r["span"][1], (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]))
        for r in replaced[0]
    ]

    def moved(pos: int) -> int:  # a position of `full` in the expanded text
        return pos + sum(d for end, d in shifts if end <= pos)

    spans = [(moved(a), moved(b)) for a, b in spans]
    image_ids = _image_token_ids(proc)
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(enc["offset_mapping"][0]):
        # a token overlapping an answer is learned: a template ending its prompt with a
        # space ("ASSISTANT: ") leaves the space in the answer's first token (" a")
        if b > a and ids[t] not in image_ids and any(a < e and b > s for s, e in spans):
            labels[t] = ids[t]
    if all(x == IGNORE for x in labels):
        raise RowError("no assistant tokens found after rendering the conversation")
    tok = proc.tokenizer
    if tok.eos_token_id not in [x for x in labels if x != IGNORE]:
        raise RowError(
            "the chat template does not end assistant turns with the EOS token "
            f"({tok.eos_token!r}): the model would not learn to stop"
        )
    return _fit(ids, labels, paths, ctx, {"text": full})


def _fit(
    ids: list[int], labels: list[int], paths: list[str], ctx: FormatContext, extra: dict
) -> dict[str, Any]:
    """The length rule: cut text after the last image, never image tokens."""
    image_ids = _image_token_ids(ctx.tokenizer)
    last_image = max((t for t, x in enumerate(ids) if x in image_ids), default=-1)
    if last_image >= ctx.max_length and ctx.cfg.too_long != "error":
        # never cut through image tokens: the example goes (counted in dropped_too_long too)
        ctx.stats["dropped_images_too_long"] = ctx.stats.get("dropped_images_too_long", 0) + 1
        raise TooLong
    if ctx.over(len(ids), ctx.max_length, "the example (image tokens included)", "data.max_length"):
        ids, labels = ids[: ctx.max_length], labels[: ctx.max_length]
        if all(x == IGNORE for x in labels):
            raise RowError(f"nothing left to learn after truncation to max_length={ctx.max_length}")
    return {"input_ids": ids, "labels": labels, "images": paths, **extra}


def _prefix_suffix(
    msgs: list[dict[str, Any]], paths: list[str], ctx: FormatContext
) -> dict[str, Any]:
    """One user turn (its images and text) as the prefix, one assistant turn as the suffix,
    through the processor's own prefix/suffix encoding."""
    roles = [m["role"] for m in msgs]
    if roles != ["user", "assistant"]:
        raise RowError(
            "PaliGemma learns one prompt and one answer: the conversation must be one user "
            f"turn then one assistant turn (got {roles})"
        )
    proc = ctx.tokenizer
    text = " ".join(p["text"] for p in msgs[0]["content"] if p["type"] == "text")
    answer = " ".join(p["text"] for p in msgs[1]["content"] if p["type"] == "text")
    prefix = proc.image_token * len(paths) + text
    try:
        enc = proc(text=[prefix], images=open_images(paths) if paths else None, suffix=[answer])
    except ValueError as e:
        raise RowError(f"the processor refused this example: {e}") from None
    ids = list(enc["input_ids"][0])
    kinds = list(enc["token_type_ids"][0])
    labels = [t if k == 1 else IGNORE for t, k in zip(ids, kinds, strict=True)]
    return _fit(ids, labels, paths, ctx, {"text": prefix, "suffix": answer})


def _image_token_ids(proc: Any) -> set[int]:
    """Every token id an image expands into (placeholders, patches, separators)."""
    tok = proc.tokenizer
    ids = set()
    for attr in (
        "image_token",
        "fake_image_token",
        "global_image_tag",
        "global_image_token",
        "vision_start_token",
        "vision_end_token",
        "boi_token",
        "eoi_token",
    ):
        value = getattr(proc, attr, None) or getattr(tok, attr, None)
        if isinstance(value, str):
            tid = tok.convert_tokens_to_ids(value)
            if isinstance(tid, int) and tid != tok.unk_token_id:
                ids.add(tid)
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(proc, attr, None)
        if isinstance(value, int):
            ids.add(value)
    ids.update(i for i in (getattr(proc, "row_col_ids", None) or []) if isinstance(i, int))
    return ids


def collate_vision_chat(examples: list[dict[str, Any]], processor: Any) -> dict[str, Any]:
    """Pixels (and grids, masks, token types) from the processor for a micro-batch; the token
    ids must come out as the format made them, labels pad with -100."""
    import torch

    texts = [e["text"] for e in examples]
    paths = [e["images"] for e in examples]
    images: Any = None
    if any(paths):
        nested = [open_images(p) for p in paths]
        # Idefics3/SmolVLM take one list per sample; the others a flat list in text order
        images = nested if _nested(processor) else [im for per in nested for im in per]
    longest = max(len(e["input_ids"]) for e in examples)
    kw: dict[str, Any] = {"add_special_tokens": False, "truncation": True}
    if prefix_lm(processor):  # the answer is the suffix: only it may be cut
        kw = {"suffix": [e["suffix"] for e in examples], "truncation": "only_second"}
    out = processor(
        text=texts,
        images=images,
        padding="max_length",
        max_length=longest,
        padding_side="right",
        return_tensors="pt",
        **kw,
    )
    ids = out["input_ids"]
    labels = torch.full_like(ids, IGNORE)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if ids[i, :n].tolist() != e["input_ids"]:
            raise RuntimeError(
                "the processor tokenized a micro-batch differently from the data it was "
                "prepared with (a processor or image changed during the run?)"
            )
        labels[i, :n] = torch.tensor(e["labels"])
        if "attention_mask" in out:
            out["attention_mask"][i, n:] = 0
    batch = {k: v for k, v in out.items() if k not in ("offset_mapping", "labels")}
    batch["labels"] = labels
    return batch


def _nested(processor: Any) -> bool:
    return type(processor).__name__ in (
        "Idefics3Processor",
        "SmolVLMProcessor",
        "Idefics2Processor",
    )
