"""The vocabulary every data format shares: the example being built (`FormatContext`),
why a row is refused (`RowError`, `TooLong`), label readers, and the chat-template span
finder. The text formats (`formats.py`), images (`images.py`) and vision-language
conversations (`vlm.py`) import it; nothing here imports them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the schema reads data.formats' registry: no import at run time
    from launcher.recipe.schema import DataCfg

IGNORE = -100  # the label of a position without loss


class RowError(ValueError):
    """This row cannot be used; the message says why."""


class TooLong(Exception):
    """`too_long: drop`: the row is longer than the limit; it is dropped and counted."""


@dataclass
class FormatContext:
    """What a format reads: the recipe's data section itself (field names, limits, the
    too-long policy; its defaults live in the schema only), the tokenizer or processor,
    the label vocabulary, and counters of what was cut."""

    tokenizer: Any
    cfg: DataCfg
    label2id: dict[str, int] = field(default_factory=dict)
    label_kind: str = "class"  # text_classification: class | multi_hot | score
    stats: dict[str, int] = field(default_factory=lambda: {"truncated": 0, "dropped_too_long": 0})

    @property
    def max_length(self) -> int:
        return self.cfg.max_length

    def over(self, n: int, limit: int, what: str, key: str) -> bool:
        """Apply the too_long policy to an example of `n` tokens: True means cut it."""
        if n <= limit:
            return False
        if self.cfg.too_long == "error":
            raise RowError(
                f"{what} is {n} tokens, longer than {key}={limit} "
                "(set data.too_long: truncate or drop, or raise the limit)"
            )
        if self.cfg.too_long == "drop":
            raise TooLong
        self.stats["truncated"] += 1
        return True


def render_with_spans(
    renderer: Any, msgs: list[dict[str, Any]]
) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by `renderer.apply_chat_template` (a tokenizer or a
    processor), and the character span each assistant turn adds: render(msgs[:i+1]) minus
    render(msgs[:i], generation prompt)."""

    def render(part: list[dict[str, Any]], gen: bool) -> str:
        try:
            return renderer.apply_chat_template(part, tokenize=False, add_generation_prompt=gen)
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
    return full, spans


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


def labels_of(row: dict[str, Any], name: str) -> list[str]:
    """Multi-label: a list of labels (possibly empty), or one label."""
    if name in row and isinstance(row[name], list):
        out = []
        for v in row[name]:
            label_of({name: v}, name)  # each item: a non-empty string or an integer
            out.append(str(v).strip())
        return out
    return [label_of(row, name)]


def score_of(row: dict[str, Any], name: str) -> float:
    """Regression: a number (CSV cells are numeric text)."""
    import math

    if name not in row:
        raise RowError(f"missing field '{name}'")
    value = row[name]
    try:
        if isinstance(value, bool):
            raise ValueError
        score = float(value)
    except (TypeError, ValueError):
        raise RowError(f"field '{name}' must be a number, got {value!r}") from None
    if not math.isfinite(score):
        raise RowError(f"field '{name}' must be a finite number, got {value!r}")
    return score
