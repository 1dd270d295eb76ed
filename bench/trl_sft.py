"""LoRA chat SFT with TRL's `SFTTrainer`, padded or packed: the TRL side of
bench/packing_vs_trl.py.

    python bench/trl_sft.py OUT.json --model DIR --train FILE.jsonl [--packing]
        [--steps 12] [--micro-batch 4] [--max-length 512] [--lr 1e-3] [--seed 42]

One process, one training run, as a TRL user would write it: the `messages` rows of the
JSONL file as a conversational dataset (TRL applies the tokenizer's chat template and
tokenizes), `SFTConfig(packing=..., max_length=..., per_device_train_batch_size=...)` and a
PEFT `LoraConfig` (r 16, alpha 32, dropout 0.05, all-linear) passed as `peft_config`.
Everything else is TRL 1.16's default except what the comparison needs the same on every
side: float32 (`bf16=False`; TRL defaults to bf16), no gradient checkpointing (TRL
defaults to it), AdamW with the given lr, cosine schedule with 2 warm-up steps, clipping
1.0, seed, a fixed number of optimizer steps, no eval, nothing saved, CPU. With
`--packing`, TRL's defaults apply: best-fit-decreasing packing into rows of `max_length`
and padding-free batches (the micro-batch's rows are concatenated into one sequence with
restarting `position_ids`, no attention mask). Loss masking is TRL's default for a
`messages` dataset: every token of the conversation (`assistant_only_loss=False`).

Writes to OUT.json: the non-padding tokens and examples of every step (counted on the
batch each `training_step` receives: the attention-mask sum when there is one, else the
length of the padding-free sequence), the loss of every step, the time at the end of
every step (from a `TrainerCallback`), peak RSS (`VmHWM` from /proc/self/status at the
end of the process; `ru_maxrss` would carry the parent's peak over fork and exec), and
for packed runs TRL's packing efficiency (tokens / (rows x max_length) over the whole
prepared dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def vmhwm_mb() -> float:
    """Peak resident memory of this process (Linux `VmHWM`), in MiB; 0 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", required=True, help="a plain HF model folder")
    ap.add_argument("--train", required=True, help="JSONL with a `messages` column")
    ap.add_argument("--packing", action="store_true")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    rss_start = vmhwm_mb()
    dataset = load_dataset("json", data_files=args.train, split="train")
    dataset = dataset.select_columns(["messages"])
    tok = AutoTokenizer.from_pretrained(args.model)
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    peft_config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )

    step_tokens: list[int] = []
    step_examples: list[int] = []
    step_loss_tokens: list[int] = []
    step_padded_tokens: list[int] = []

    class CountingSFTTrainer(SFTTrainer):
        """Counts the real tokens of every micro-batch (grad_accum 1: one per step)."""

        def training_step(self, *a, **kw):
            inputs = a[1] if len(a) > 1 else kw["inputs"]
            if "attention_mask" in inputs:  # padded: the mask marks the real tokens
                step_tokens.append(int(inputs["attention_mask"].sum()))
                step_examples.append(int(inputs["input_ids"].shape[0]))
            else:  # padding-free: one flat sequence (no pad_to_multiple_of: no padding)
                pos = inputs["position_ids"]
                step_tokens.append(int(pos.numel()))
                step_examples.append(int((pos == 0).sum()))
            # targets after the causal shift (padding-free rows already start with -100)
            step_loss_tokens.append(int((inputs["labels"][:, 1:] != -100).sum()))
            step_padded_tokens.append(int(inputs["input_ids"].numel()))  # pad included
            return super().training_step(*a, **kw)

    from _common import step_clock

    clock = step_clock()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_length=args.max_length,
            packing=args.packing,
            per_device_train_batch_size=args.micro_batch,
            gradient_accumulation_steps=1,
            max_steps=args.steps,
            learning_rate=args.lr,
            lr_scheduler_type="cosine",
            warmup_steps=args.warmup_steps,
            max_grad_norm=1.0,
            seed=args.seed,
            bf16=False,
            gradient_checkpointing=False,
            logging_steps=1,
            eval_strategy="no",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = CountingSFTTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft_config,
            callbacks=[clock],
        )
        prepared = trainer.train_dataset
        data: dict = {"examples": len(dataset), "rows": len(prepared)}
        if args.packing:
            seq = prepared["seq_lengths"]
            tokens = sum(sum(s) for s in seq)
            data.update(
                packed_examples=sum(len(s) for s in seq),
                packed_rows=len(seq),
                packing_efficiency=round(tokens / (len(seq) * args.max_length), 4),
            )
            data["example_tokens"] = tokens
        else:
            data["example_tokens"] = sum(len(x) for x in prepared["input_ids"])
        data["mean_example_tokens"] = round(data["example_tokens"] / len(dataset), 2)
        rss_before_train = vmhwm_mb()
        state = trainer.train()
    model = trainer.model
    train_time = clock.step_end[-1] - clock.start
    result = {
        "side": "trl-packed" if args.packing else "trl-padded",
        "steps": state.global_step,
        "losses": clock.losses,
        "final_train_loss": clock.losses[-1],
        "train_time_s": round(train_time, 3),
        "tokens_seen": sum(step_tokens),
        "samples_seen": sum(step_examples),
        "tokens_per_s": round(sum(step_tokens) / train_time, 1),
        "step_tokens": step_tokens,
        "step_examples": step_examples,
        "step_loss_tokens": step_loss_tokens,
        "step_padded_tokens": step_padded_tokens,
        "step_end_s": [round(x - clock.start, 4) for x in clock.step_end],
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "data": data,
        "settings": {
            "packing": config.packing,
            "packing_strategy": config.packing_strategy,
            "padding_free": trainer.padding_free,
            "completion_only_loss": trainer.completion_only_loss,
            "assistant_only_loss": config.assistant_only_loss,
            "loss_type": config.loss_type,
            "optim": str(config.optim),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        },
        "versions": {n: version(n) for n in ("trl", "transformers", "peft", "torch")},
        "rss_mb": {
            "peak_after_imports": round(rss_start, 1),
            "peak_before_train": round(rss_before_train, 1),
        },
        "peak_rss_mb": round(vmhwm_mb(), 1),
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
