"""The quickstart's work done with HF `Trainer`: the peer side of bench/quickstart_vs_trainer.py.

Same model (all-MiniLM-L6-v2 + new 5-way head), same deterministic split and tokenization
(ftl's own reader and splitter), batch 16, length 128, one epoch (112 steps), linear
schedule with 10% warmup, lr 1e-4, evals at steps 50 and 100 plus a final one, fp32.
The seed is set before the model is built, so the new head is the same on every run
(Trainer's own seeding happens after the model exists).
Prints one JSON line: {"accuracy": ..., "eval_loss": ..., "steps": ...}.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from launcher.assets import resolve_path
    from launcher.data.build import load_datasets
    from launcher.recipe import load_recipe

    recipe = load_recipe(sys.argv[1] if len(sys.argv) > 1 else "recipes/quickstart.yaml")
    path = str(resolve_path(recipe.model.name_or_path))
    tok = AutoTokenizer.from_pretrained(path)
    data = load_datasets(recipe.data, tok, label_kind="class")
    train = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in data.train]
    evals = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in data.eval]

    set_seed(recipe.train.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(data.labels))

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=16,
            per_device_eval_batch_size=16,
            num_train_epochs=1,
            learning_rate=recipe.train.lr,
            lr_scheduler_type="linear",
            warmup_steps=recipe.train.warmup_ratio,
            max_grad_norm=1.0,
            weight_decay=0.0,
            eval_strategy="steps",
            eval_steps=50,
            logging_steps=10,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=recipe.train.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            eval_dataset=evals,
            data_collator=DataCollatorWithPadding(tok),
            compute_metrics=metrics,
        )
        state = trainer.train()
        final = trainer.evaluate()
    print(
        json.dumps(
            {
                "accuracy": final["eval_accuracy"],
                "eval_loss": final["eval_loss"],
                "steps": state.global_step,
            }
        )
    )


if __name__ == "__main__":
    main()
