"""Task registry: what a task trains, which data formats feed it, which metrics it reports.

The loop only talks to a `Task`; a new task (token classification, seq2seq, vision) is a
new entry here plus its formats in `launcher.data.formats`, not a change to the loop.
Nothing heavy is imported at module level: the recipe schema reads the names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    name: str
    formats: tuple[str, ...]
    auto_class: str  # transformers Auto* class that builds the model
    metrics: tuple[str, ...]  # eval metrics it reports; the first is the default to watch
    peft_task_type: str
    # (model outputs, batch) -> per-example (loss sum, loss count, prediction or None), so
    # eval metrics can be gathered across processes without counting padding duplicates
    eval_batch: Callable[[Any, dict[str, Any]], tuple[Any, Any, Any]]
    # (predictions or None, labels or None, eval loss) over the eval set -> metrics besides eval_loss
    eval_metrics: Callable[[Any, Any, float], dict[str, float]]
    uses_labels: bool  # the model needs a label set (num_labels, id2label)
    needs_eos: bool  # the model generates text, so its tokenizer must define EOS


def _lm_eval_batch(out: Any, batch: dict[str, Any]) -> tuple[Any, Any, None]:
    """Summed next-token loss and token count per sequence (labels shift inside)."""
    import torch.nn.functional as F

    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return loss.sum(1), (labels != -100).sum(1), None


def _lm_metrics(_preds: Any, _labels: Any, loss: float) -> dict[str, float]:
    import math

    return {"perplexity": math.exp(min(loss, 50.0))}


def _classification_eval_batch(out: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch
    import torch.nn.functional as F

    logits = out.logits.float()
    loss = F.cross_entropy(logits, batch["labels"], reduction="none")
    return loss, torch.ones_like(loss), logits.argmax(-1)


def _classification_metrics(p: Any, y: Any, _loss: float) -> dict[str, float]:
    import torch

    accuracy = (p == y).float().mean().item()
    f1s = []
    for c in torch.unique(torch.cat([p, y])):
        tp = ((p == c) & (y == c)).sum().item()
        fp = ((p == c) & (y != c)).sum().item()
        fn = ((p != c) & (y == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s)}


TASKS: dict[str, Task] = {
    "causal_lm": Task(
        name="causal_lm",
        formats=("completion", "alpaca", "chat"),
        auto_class="AutoModelForCausalLM",
        metrics=("eval_loss", "perplexity"),
        peft_task_type="CAUSAL_LM",
        eval_batch=_lm_eval_batch,
        eval_metrics=_lm_metrics,
        uses_labels=False,
        needs_eos=True,
    ),
    "sequence_classification": Task(
        name="sequence_classification",
        formats=("text_classification",),
        auto_class="AutoModelForSequenceClassification",
        metrics=("eval_loss", "accuracy", "macro_f1"),
        peft_task_type="SEQ_CLS",
        eval_batch=_classification_eval_batch,
        eval_metrics=_classification_metrics,
        uses_labels=True,
        needs_eos=False,
    ),
}
