"""Tiny models and tokenizers built on the spot (no hub, a few seconds on a CPU)."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "terrible",
    "plot",
    "actor",
    "story",
    "i",
    "loved",
    "hated",
    "it",
    "what",
    "is",
    "capital",
    "of",
    "france",
    "paris",
    "say",
    "hello",
    "world",
    "answer",
    "question",
    "one",
    "two",
    "three",
    "four",
    "five",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "yes",
    "no",
    "please",
    "thanks",
    "sure",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


def make_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "<|im_end|>", "<pad>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def make_llama(out: Path, *, tie: bool = False, **sizes: int) -> int:
    """The tiny tokenizer and a Llama (tiny unless `sizes` overrides LlamaConfig fields;
    `tie`: one matrix for the embeddings and the head); returns the parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    make_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg = LlamaConfig(
        **{**shape, **sizes},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def make_bert(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    make_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(cfg).save_pretrained(out)  # a "pretrained encoder": the task head is new


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable 2-class task: the label follows the sentiment words in the text."""
    rng = random.Random(seed)
    pos, neg, filler = ["good", "great", "loved"], ["bad", "awful", "hated"], WORDS[:8]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(pos if label == "pos" else neg))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    colors = ["red", "blue", "green"]
    rows = []
    for _ in range(n):
        c = rng.choice(colors)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "answer with one word"},
                    {"role": "user", "content": f"say {c} please"},
                    {"role": "assistant", "content": c},
                ]
            }
        )
    return rows
