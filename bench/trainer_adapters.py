"""One ftl recipe's training run done with HF `Trainer` + PEFT + bitsandbytes: the peer side
of bench/adapters_cpu.py.

    python bench/trainer_adapters.py RECIPE OUT.json [-o key=value ...]

Reads the same recipe and overrides as the `ftl train` run it is compared with and does
the same work: the same model directory (float32), the same tokenized examples (ftl's
own reader and chat format), the same micro-batches in the same order (ftl's
`epoch_batches` permutation, fed to Trainer sequentially, padded by ftl's `collate`),
the same steps, AdamW (Trainer's default fused kernel, as ftl's), lr, schedule, warmup,
clipping and seed. Adapters: PEFT `LoraConfig` from the recipe's adapter section;
4-bit / 8-bit: `BitsAndBytesConfig` from the quant section, `device_map={"": "cpu"}`, and
`prepare_model_for_kbit_training` (no gradient checkpointing, as on the ftl side).
No eval, `save_strategy="no"`, nothing saved.

Writes to OUT.json what ftl writes to summary.json and metrics.jsonl, measured the same
way: peak RSS (`ru_maxrss` of this process at the end, as ftl's `peak_memory_mb`), the
non-padding tokens of every step (attention-mask sum, as ftl counts), the loss of every
step, the wall time from the start of `train()` to the end of the last step, and the
time at the end of every step (for tokens/s after a warm-up).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str]) -> None:
    import torch
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from launcher.data.batches import epoch_batches
    from launcher.data.build import collate, load_datasets
    from launcher.models.build import load_tokenizer, model_location
    from launcher.recipe import load_recipe

    recipe_path, out_path, rest = argv[0], Path(argv[1]), argv[2:]
    overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] in ("-o", "--override")]
    r = load_recipe(recipe_path, overrides)
    t = r.train
    if r.task != "causal_lm" or r.model.gguf_file or r.model.gradient_checkpointing:
        sys.exit("this peer covers causal_lm on a plain HF directory without checkpointing")
    if t.grad_accum != 1 or t.global_batch_size or t.max_steps is None:
        sys.exit("this peer covers grad_accum 1 and an explicit train.max_steps")
    if t.precision != "fp32" or r.model.dtype != "float32" or t.optimizer != "adamw":
        sys.exit("this peer covers fp32 with AdamW")

    tok = load_tokenizer(r.model, needs_eos=True)
    data = load_datasets(r.data, tok, label_kind="tokens")
    # ftl's micro-batches of epoch 0, in ftl's order, fed sequentially
    batches = epoch_batches(len(data.train), t.micro_batch_size, t.seed, 0)[: t.max_steps]
    if len(batches) < t.max_steps or len(batches[-1]) < t.micro_batch_size:
        sys.exit("train.max_steps must fit in one epoch of full micro-batches")
    train = [
        {"input_ids": data.train[i]["input_ids"], "labels": data.train[i]["labels"]}
        for b in batches
        for i in b
    ]
    step_tokens = [sum(len(data.train[i]["input_ids"]) for i in b) for b in batches]

    set_seed(t.seed)  # as ftl: seeded before the model (and the adapter) is built
    kw: dict = {"dtype": torch.float32}
    q = r.quant
    if q.bits == 8:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif q.bits == 4:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        )
    if q.bits is not None:
        kw["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_location(r.model), **kw)
    if r.adapter.enabled:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if q.bits is not None:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        a = r.adapter
        model = get_peft_model(
            model,
            LoraConfig(
                r=a.r,
                lora_alpha=a.alpha,
                lora_dropout=a.dropout,
                target_modules=a.target_modules,
                use_dora=a.type == "dora",
                use_rslora=a.rslora,
                task_type="CAUSAL_LM",
            ),
        )
    elif q.bits is not None:
        sys.exit("quantized weights need an adapter")

    from _common import step_clock

    clock = step_clock()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=t.micro_batch_size,
            gradient_accumulation_steps=1,
            max_steps=t.max_steps,
            learning_rate=t.lr,
            lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup_steps,
            max_grad_norm=t.max_grad_norm if t.max_grad_norm is not None else 0.0,
            weight_decay=t.weight_decay,
            adam_beta1=t.betas[0],
            adam_beta2=t.betas[1],
            adam_epsilon=t.eps,
            train_sampling_strategy="sequential",
            logging_steps=1,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=t.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            data_collator=lambda batch: collate(batch, tok.pad_token_id),
            callbacks=[clock],
        )
        state = trainer.train()
    train_time = clock.step_end[-1] - clock.start
    result = {
        "steps": state.global_step,
        "losses": clock.losses,
        "final_train_loss": clock.losses[-1],
        "train_time_s": round(train_time, 3),
        "tokens_seen": sum(step_tokens),
        "tokens_per_s": round(sum(step_tokens) / train_time, 1),
        "step_tokens": step_tokens,
        "step_end_s": [round(x - clock.start, 4) for x in clock.step_end],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out_path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
