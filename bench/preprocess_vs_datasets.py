"""ftl's preprocessing (a cache build) vs `datasets.map` running TRL's SFT preprocessing, in
one run.

    OMP_NUM_THREADS=1 python bench/preprocess_vs_datasets.py [--passes 3]

The same data and tokenizer as bench/packing_vs_trl.py: the 2003 BBC headline/topic
conversations of tools/make_bbc_chat.py (train.jsonl), the SmolLM2-135M-Instruct tokenizer
(the plain HF folder bench/adapters_cpu.py makes), max length 512, no packing. Sides, each
timed from the JSONL file to tokenized, masked examples:

- ftl: `launcher.data.cache.prepare(..., force=True)`: hash the inputs, read, render and
  tokenize every conversation (assistant-only labels), write the Parquet shards and the
  manifest; a build, never a cache hit.
- trl-default: `load_dataset("json")` into a fresh cache folder, then TRL 1.16's own
  `SFTTrainer._prepare_dataset` (the `datasets.map` calls SFTTrainer makes: tokenize through
  the chat template, build labels, truncate to 512, drop fully masked rows), with TRL's
  default `assistant_only_loss=False` (the loss falls on every token: one render and one
  tokenization per conversation, less work than ftl's masking).
- trl-assistant: the same with `assistant_only_loss=True`, a training chat template
  (SmolLM2's with `{% generation %}` markers, written here: TRL's
  `get_training_chat_template` refuses this template) and
  `return_assistant_tokens_mask`: the same masking work as ftl. Its examples are compared
  with ftl's (input ids and labels, row by row).

`_prepare_dataset` is called on a stand-in for the trainer holding the three attributes
it reads (`_tokenizer`, `chat_template`, `completion_only_loss`, set as SFTTrainer's
`__init__` sets them), so no model is loaded. `datasets` caching is disabled, so no side
reads a previous result. Imports and the tokenizer load are outside the timings. Sides
alternate over `--passes` (order reversed every pass) after one untimed warm-up pass;
medians are reported. Writes .cache/bench/preprocess_vs_datasets.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters_cpu import CACHE, DATA_DIR, MODEL_DIR, prepare  # noqa: E402

MAX_LENGTH = 512
# SmolLM2-Instruct's chat template with TRL's `{% generation %}` markers around what an
# assistant turn adds (its text, <|im_end|> and the newline: what ftl's labels cover).
# TRL's get_training_chat_template() does not know this template ("patching is not
# supported"), so a TRL user writes this by hand; rendered, it is the same text.
TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def run_ftl(tok, train: Path) -> tuple[float, list[dict]]:
    from launcher.data.cache import prepare as build
    from launcher.recipe.schema import DataCfg

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DataCfg(format="chat", train=str(train), max_length=MAX_LENGTH, cache_dir=tmp)
        start = time.perf_counter()
        done = build(cfg, tok, label_kind="tokens", force=True)
        return time.perf_counter() - start, done.datasets.train


def run_trl(tok, train: Path, assistant_only: bool) -> tuple[float, list[dict]]:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    class Stub:  # what SFTTrainer.__init__ sets and _prepare_dataset reads
        _tokenizer = tok
        chat_template = TRAINING_TEMPLATE if assistant_only else None
        completion_only_loss = False  # a `messages` dataset: TRL's default

    args = SFTConfig(
        output_dir=tempfile.gettempdir(),
        max_length=MAX_LENGTH,
        packing=False,
        assistant_only_loss=assistant_only,
        report_to=[],
        bf16=False,  # TRL's default; only its check of the (absent) GPU reads it
        use_cpu=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ds = load_dataset("json", data_files=str(train), split="train", cache_dir=tmp)
        ds = ds.select_columns(["messages"])
        ds = SFTTrainer._prepare_dataset(Stub(), ds, tok, args, False, None, "train")
        elapsed = time.perf_counter() - start
        rows = ds.select_columns(["input_ids", "labels"]).to_list()
    return elapsed, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args(argv)
    prepare()

    import datasets
    from transformers import AutoTokenizer

    datasets.disable_caching()
    datasets.disable_progress_bars()
    from launcher.models.build import load_tokenizer
    from launcher.recipe.schema import ModelCfg

    tok = load_tokenizer(ModelCfg(name_or_path=str(MODEL_DIR)), needs_eos=True)
    trl_tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    train = DATA_DIR / "train.jsonl"
    sides = {
        "ftl": lambda: run_ftl(tok, train),
        "trl-default": lambda: run_trl(trl_tok, train, False),
        "trl-assistant": lambda: run_trl(trl_tok, train, True),
    }
    results: dict[str, dict] = {}
    examples: dict[str, list[dict]] = {}
    for name, fn in sides.items():  # warm-up: lazy imports, jinja compilation
        _, examples[name] = fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for p in range(args.passes):
        order = list(sides) if p % 2 == 0 else list(reversed(sides))
        for name in order:
            t, _ = sides[name]()
            times[name].append(t)
            print(f"pass {p + 1} {name}: {t:.2f} s", flush=True)
    for name in sides:
        rows = examples[name]
        tokens = sum(len(r["input_ids"]) for r in rows)
        t = statistics.median(times[name])
        results[name] = {
            "seconds": [round(x, 3) for x in times[name]],
            "median_s": round(t, 3),
            "rows": len(rows),
            "tokens": tokens,
            "rows_per_s": round(len(rows) / t, 1),
            "tokens_per_s": round(tokens / t, 1),
        }
    same = sum(
        a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        for a, b in zip(examples["ftl"], examples["trl-assistant"], strict=False)
    )
    print("\n| side | median s | rows | tokens | rows/s | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['median_s']:.2f} | {r['rows']} | {r['tokens']} | "
            f"{r['rows_per_s']:,.0f} | {r['tokens_per_s']:,.0f} |"
        )
    ratios = {
        f"ftl / {name} (rows/s)": round(
            results["ftl"]["rows_per_s"] / results[name]["rows_per_s"], 3
        )
        for name in ("trl-default", "trl-assistant")
    }
    for k, v in ratios.items():
        print(f"{k}: {v}")
    print(f"ftl examples equal to trl-assistant's: {same} / {len(examples['ftl'])}")
    out = CACHE / "preprocess_vs_datasets.json"
    out.write_text(
        json.dumps(
            {"sides": results, "ratios": ratios, "equal_examples": same, "passes": args.passes},
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
