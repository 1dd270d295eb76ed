"""The supervised objective: the task's own loss on labelled data (next-token SFT of causal
LMs and VLMs, classification, regression, token tagging, seq2seq).

Causal LMs compute vocabulary logits only where the next token is a target
(`next_token_mask`, transformers' `logits_to_keep`): the same loss and gradients as
transformers' own full-logit loss, a fraction of the head's compute and memory.
"""

from __future__ import annotations

from typing import Any

from launcher.objectives import Context, Loss, Needs
from launcher.train.tasks import Task, next_token_mask


class Supervised:
    name = "supervised"
    needs = Needs()

    def __init__(self, task: Task, label_smoothing: float = 0.0) -> None:
        self.task, self.smoothing = task, label_smoothing
        self.kept_logits = False

    def bind(self, ctx: Context) -> None:
        from launcher import compat

        self.kept_logits = self.task.next_token and compat.supports_kept_logits(
            ctx.accelerator.unwrap_model(ctx.model)
        )

    def loss(self, model: Any, batch: dict[str, Any]) -> Loss:
        """The mean loss over the micro-batch's targets (label smoothing where asked)."""
        task, smoothing = self.task, self.smoothing
        if self.kept_logits:
            keep = next_token_mask(batch["labels"])
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = model(**inputs, logits_to_keep=keep)
            return Loss(task.smoothed_loss(out, batch, smoothing, keep=keep))
        out = model(**batch)
        return Loss(task.smoothed_loss(out, batch, smoothing) if smoothing > 0 else out.loss)

    def eval_batch(self, model: Any, batch: dict[str, Any]) -> tuple[Any, Any, Any]:
        task = self.task
        inputs = {k: v for k, v in batch.items() if k != "labels" or task.feeds_labels}
        if self.kept_logits:
            keep = next_token_mask(batch["labels"])
            return task.eval_batch(model(**inputs, logits_to_keep=keep), batch, keep=keep)
        return task.eval_batch(model(**inputs), batch)
