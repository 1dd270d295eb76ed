"""Rules that span several keys, checked after the schema accepts each key on its own.

Each rule looks at a typed `Recipe` and yields `(dotted key, message, hint)`; none of
them changes anything. `load_recipe` reports every hit at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from launcher.recipe.schema import Recipe
from launcher.train.tasks import TASKS

Hit = tuple[str, str, str]


def _format_fits_task(r: Recipe) -> Iterator[Hit]:
    formats = TASKS[r.task].formats
    if r.data.format not in formats:
        yield (
            "data.format",
            f"format '{r.data.format}' does not fit task '{r.task}'",
            f"task '{r.task}' takes: {', '.join(formats)}",
        )


def _quant_needs_adapter(r: Recipe) -> Iterator[Hit]:
    if r.quant.bits is not None and r.adapter.type == "full":
        yield (
            "quant.bits",
            "quantized weights cannot be fully fine-tuned",
            "set adapter.type: lora (QLoRA), or remove quant.bits",
        )


def _one_eval_source(r: Recipe) -> Iterator[Hit]:
    if r.data.eval is not None and r.data.eval_split:
        yield (
            "data.eval_split",
            "data.eval and data.eval_split are both set",
            "keep one: an eval file, or a fraction of data.train to hold out",
        )


def _one_warmup(r: Recipe) -> Iterator[Hit]:
    if r.train.warmup_steps and r.train.warmup_ratio:
        yield (
            "train.warmup_ratio",
            "train.warmup_steps and train.warmup_ratio are both set",
            "keep one of them",
        )


def _eval_needs_data(r: Recipe) -> Iterator[Hit]:
    has_eval = r.data.eval is not None or r.data.eval_split > 0
    if r.train.early_stopping is not None and not has_eval:
        yield (
            "train.early_stopping",
            "early stopping needs eval data",
            "set data.eval or data.eval_split",
        )
    if r.train.eval_at_start and not has_eval:
        yield (
            "train.eval_at_start",
            "eval_at_start is set but there is no eval data",
            "set data.eval or data.eval_split",
        )
    if r.train.eval_every is not None and not has_eval:
        yield (
            "train.eval_every",
            "eval_every is set but there is no eval data",
            "set data.eval or data.eval_split, or remove train.eval_every",
        )


def _gguf_is_local(r: Recipe) -> Iterator[Hit]:
    if r.model.gguf_file and r.quant.bits is not None:
        yield (
            "quant.bits",
            "a GGUF model is dequantized on load and cannot be re-quantized",
            "remove quant.bits, or point model.name_or_path at an HF checkpoint",
        )


def _early_stopping_metric(r: Recipe) -> Iterator[Hit]:
    es = r.train.early_stopping
    if es is not None:
        known = TASKS[r.task].metrics
        if es.metric not in known:
            yield (
                "train.early_stopping.metric",
                f"unknown metric '{es.metric}' for task '{r.task}'",
                f"one of: {', '.join(known)}",
            )


RULES: list[Callable[[Recipe], Iterator[Hit]]] = [
    _format_fits_task,
    _quant_needs_adapter,
    _one_eval_source,
    _one_warmup,
    _eval_needs_data,
    _gguf_is_local,
    _early_stopping_metric,
]


def check(recipe: Recipe) -> list[Hit]:
    """Every cross-key problem of `recipe`."""
    return [hit for rule in RULES for hit in rule(recipe)]
