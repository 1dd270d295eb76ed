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
    # (predictions, labels: lists of gathered batches, eval loss, EvalContext) -> metrics
    # besides eval_loss
    eval_metrics: Callable[[list[Any], list[Any], float, Any], dict[str, float]]
    # what a label is: "tokens" (one per input token, -100 where no loss), "target" (seq2seq
    # output tokens), "class" (one id), "multi_hot" (one 0/1 per label), "score" (a float)
    label_kind: str
    needs_eos: bool  # the model generates text, so its tokenizer must define EOS
    # training loss with label smoothing (None: the task has no cross-entropy to smooth)
    smoothed_loss: Callable[[Any, dict[str, Any], float], Any] | None = None
    feeds_labels: bool = False  # evals pass labels in (seq2seq builds decoder inputs from them)
    generates: bool = False  # evals also generate text and score it (BLEU, chrF)
    problem_type: str | None = None  # transformers config.problem_type of the head
    # "image": an image processor instead of a tokenizer; "vision_language": the model's
    # processor (tokenizer, image processor, chat template)
    modality: str = "text"
    head_modules: tuple[str, ...] = ()  # new head modules PEFT does not know to train
    lower_is_better: tuple[str, ...] = ("eval_loss", "perplexity")
    # next-token loss: the model may compute logits only where the next token is a target
    # (eval_batch and smoothed_loss then take `keep=next_token_mask(labels)`)
    next_token: bool = False

    @property
    def uses_labels(self) -> bool:
        """The model needs a label set (num_labels, id2label) built from the data."""
        return self.label_kind in ("class", "multi_hot") or self.name == "token_classification"


@dataclass
class EvalContext:
    tokenizer: Any
    label_names: list[str] | None


def next_token_mask(labels: Any) -> Any:
    """[batch, length] bool, True where the next token is a target: the only positions whose
    logits a causal-LM loss reads. transformers' `logits_to_keep` takes it and projects
    just those hidden states onto the vocabulary (chat SFT learns ~1 token in 5, and the
    head is a fifth of a small model's compute and most of its activation memory)."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep


def _lm_eval_batch(out: Any, batch: dict[str, Any], keep: Any = None) -> tuple[Any, Any, None]:
    """Summed next-token loss and token count per sequence (labels shift inside). With
    `keep` (next_token_mask), the logits are those of the kept positions only, flattened."""
    import torch
    import torch.nn.functional as F

    if keep is not None:
        labels = batch["labels"]
        loss = F.cross_entropy(out.logits.float(), labels[:, 1:][keep[:, :-1]], reduction="none")
        rows = keep.nonzero()[:, 0]
        sums = torch.zeros(labels.shape[0], dtype=loss.dtype, device=loss.device)
        return sums.index_add_(0, rows, loss), keep.sum(1), None
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return loss.sum(1), (labels != -100).sum(1), None


def _lm_loss(out: Any, batch: dict[str, Any], smoothing: float, keep: Any = None) -> Any:
    """Mean next-token loss over the targets (as transformers' own); `keep` as above."""
    import torch.nn.functional as F

    if keep is not None:
        targets = batch["labels"][:, 1:][keep[:, :-1]]
        return F.cross_entropy(out.logits.float(), targets, label_smoothing=smoothing)
    logits = out.logits[:, :-1].float()
    return F.cross_entropy(
        logits.transpose(1, 2), batch["labels"][:, 1:], label_smoothing=smoothing
    )


def _lm_metrics(_p: list[Any], _y: list[Any], loss: float, _ctx: Any) -> dict[str, float]:
    import math

    return {"perplexity": math.exp(min(loss, 50.0))}


def _classification_eval_batch(out: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch
    import torch.nn.functional as F

    logits = out.logits.float()
    loss = F.cross_entropy(logits, batch["labels"], reduction="none")
    return loss, torch.ones_like(loss), logits.argmax(-1)


def _classification_loss(out: Any, batch: dict[str, Any], smoothing: float) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(out.logits.float(), batch["labels"], label_smoothing=smoothing)


def _classification_metrics(p: list[Any], y: list[Any], _loss: float, _ctx: Any) -> dict:
    import torch

    from launcher.train.metrics import class_scores

    return class_scores(torch.cat(p), torch.cat(y))


def _multi_label_eval_batch(out: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch
    import torch.nn.functional as F

    logits = out.logits.float()
    # the mean over labels per example: the eval loss equals the head's training loss
    loss = F.binary_cross_entropy_with_logits(logits, batch["labels"], reduction="none").mean(1)
    return loss, torch.ones_like(loss), (logits > 0).long()


def _multi_label_metrics(p: list[Any], y: list[Any], _loss: float, _ctx: Any) -> dict:
    import torch

    from launcher.train.metrics import multi_label_scores

    return multi_label_scores(torch.cat(p), torch.cat(y))


def _regression_eval_batch(out: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch

    pred = out.logits.float().squeeze(-1)
    loss = (pred - batch["labels"].float()) ** 2
    return loss, torch.ones_like(loss), pred


def _regression_metrics(p: list[Any], y: list[Any], _loss: float, _ctx: Any) -> dict:
    import torch

    from launcher.train.metrics import regression_scores

    return regression_scores(torch.cat(p), torch.cat(y))


def _token_eval_batch(out: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch.nn.functional as F

    logits = out.logits.float()
    labels = batch["labels"]
    loss = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    pred = logits.argmax(-1).masked_fill(labels == -100, -100)
    return loss.sum(1), (labels != -100).sum(1), pred


def _token_loss(out: Any, batch: dict[str, Any], smoothing: float) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(
        out.logits.float().transpose(1, 2), batch["labels"], label_smoothing=smoothing
    )


def _token_metrics(p: list[Any], y: list[Any], _loss: float, ctx: EvalContext) -> dict:
    from launcher.train.metrics import entity_scores, tag_sequences

    true, pred = tag_sequences(p, y, ctx.label_names or [])
    return entity_scores(true, pred)


def _seq2seq_eval_batch(out: Any, batch: dict[str, Any]) -> tuple[Any, Any, None]:
    """Teacher-forced loss per target token (the decoder saw the shifted labels)."""
    import torch.nn.functional as F

    labels = batch["labels"]
    loss = F.cross_entropy(
        out.logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    return loss.sum(1), (labels != -100).sum(1), None


def _seq2seq_metrics(p: list[Any], y: list[Any], loss: float, ctx: EvalContext) -> dict:
    import math

    from launcher.train.metrics import texts, translation_scores

    scores = translation_scores(texts(p, ctx.tokenizer), texts(y, ctx.tokenizer))
    return {**scores, "perplexity": math.exp(min(loss, 50.0))}


TASKS: dict[str, Task] = {
    "causal_lm": Task(
        name="causal_lm",
        formats=("completion", "alpaca", "chat"),
        auto_class="AutoModelForCausalLM",
        metrics=("eval_loss", "perplexity"),
        peft_task_type="CAUSAL_LM",
        eval_batch=_lm_eval_batch,
        eval_metrics=_lm_metrics,
        label_kind="tokens",
        needs_eos=True,
        smoothed_loss=_lm_loss,
        next_token=True,
    ),
    "vision_language": Task(
        name="vision_language",
        formats=("vision_chat",),
        auto_class="AutoModelForImageTextToText",
        metrics=("eval_loss", "perplexity"),
        peft_task_type="CAUSAL_LM",
        eval_batch=_lm_eval_batch,
        eval_metrics=_lm_metrics,
        label_kind="tokens",
        needs_eos=True,
        smoothed_loss=_lm_loss,
        modality="vision_language",
        next_token=True,
    ),
    "sequence_classification": Task(
        name="sequence_classification",
        formats=("text_classification",),
        auto_class="AutoModelForSequenceClassification",
        metrics=("eval_loss", "accuracy", "macro_f1"),
        peft_task_type="SEQ_CLS",
        eval_batch=_classification_eval_batch,
        eval_metrics=_classification_metrics,
        label_kind="class",
        needs_eos=False,
        smoothed_loss=_classification_loss,
        problem_type="single_label_classification",
    ),
    "image_classification": Task(
        name="image_classification",
        formats=("image_classification",),
        auto_class="AutoModelForImageClassification",
        metrics=("eval_loss", "accuracy", "macro_f1"),
        peft_task_type="",  # PEFT has no image task type: the head joins modules_to_save
        eval_batch=_classification_eval_batch,
        eval_metrics=_classification_metrics,
        label_kind="class",
        needs_eos=False,
        smoothed_loss=_classification_loss,
        problem_type="single_label_classification",
        modality="image",
        head_modules=("classifier",),
    ),
    "multi_label_classification": Task(
        name="multi_label_classification",
        formats=("text_classification",),
        auto_class="AutoModelForSequenceClassification",
        metrics=("eval_loss", "micro_f1", "macro_f1", "subset_accuracy"),
        peft_task_type="SEQ_CLS",
        eval_batch=_multi_label_eval_batch,
        eval_metrics=_multi_label_metrics,
        label_kind="multi_hot",
        needs_eos=False,
        problem_type="multi_label_classification",
    ),
    "sequence_regression": Task(
        name="sequence_regression",
        formats=("text_classification",),
        auto_class="AutoModelForSequenceClassification",
        metrics=("eval_loss", "rmse", "mae", "pearson", "spearman", "mse"),
        peft_task_type="SEQ_CLS",
        eval_batch=_regression_eval_batch,
        eval_metrics=_regression_metrics,
        label_kind="score",
        needs_eos=False,
        problem_type="regression",
        lower_is_better=("eval_loss", "rmse", "mae", "mse"),
    ),
    "token_classification": Task(
        name="token_classification",
        formats=("token_tags",),
        auto_class="AutoModelForTokenClassification",
        metrics=("eval_loss", "entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
        peft_task_type="TOKEN_CLS",
        eval_batch=_token_eval_batch,
        eval_metrics=_token_metrics,
        label_kind="tokens",
        needs_eos=False,
        smoothed_loss=_token_loss,
    ),
    "seq2seq": Task(
        name="seq2seq",
        formats=("translation",),
        auto_class="AutoModelForSeq2SeqLM",
        metrics=("eval_loss", "bleu", "chrf", "perplexity"),
        peft_task_type="SEQ_2_SEQ_LM",
        eval_batch=_seq2seq_eval_batch,
        eval_metrics=_seq2seq_metrics,
        label_kind="target",
        needs_eos=True,
        smoothed_loss=_token_loss,
        feeds_labels=True,
        generates=True,
    ),
}
