"""Sample packing: bins, exact loss equivalence with the examples one by one, a real run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from launcher.data.pack import best_fit_decreasing, collate_packed, pack
from launcher.recipe import load_recipe
from launcher.train.loop import Trainer


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert bins == best_fit_decreasing(lengths, 128)  # deterministic
    # close to the lower bound: at most 3% more bins than perfect packing needs
    assert len(bins) <= 1.03 * (sum(lengths) / 128) + 1
    # an example as long as a bin fills one alone (data.too_long keeps longer ones out)
    assert best_fit_decreasing([128, 5, 128], 128) == [[0], [2], [1]]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "ftl_segments"])
def test_packed_loss_equals_the_examples_one_by_one(attn, tiny_llama):
    """One packed batch against each example on its own: the logits of every segment and
    the token-weighted loss agree within 1e-5 (no attention across examples). ftl_segments:
    ftl's CPU backend, attention computed per segment from the batch's cu_seq_lens."""
    from transformers import AutoModelForCausalLM

    from launcher.models import fast_dropout

    impl = "sdpa" if attn == "ftl_segments" else attn
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=impl).eval()
    if attn == "ftl_segments":
        assert fast_dropout.enable(model)
        calls = []
        original = fast_dropout.segment_attention

        def counting(*args, **kw):
            calls.append(1)
            return original(*args, **kw)

        fast_dropout.segment_attention = counting
    rng = random.Random(1)
    examples = []
    for _ in range(7):
        ids = [rng.randrange(5, 300) for _ in range(rng.randint(4, 30))]
        labels = [x if rng.random() < 0.7 else -100 for x in ids]
        examples.append({"input_ids": ids, "labels": labels})
    rows, stats = pack(examples, 64)
    assert stats["packed_rows"] < len(examples) and stats["packed_examples"] == 7
    batch = collate_packed(rows, pad_id=0)
    assert batch.pop("_samples") == 7 and batch.pop("_tokens") == sum(
        len(e["input_ids"]) for e in examples
    )
    with torch.no_grad():
        packed = model(**batch)
        total, count = 0.0, 0
        singles = []
        for e in examples:
            out = model(
                input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])
            )
            n = sum(1 for x in e["labels"][1:] if x != -100)
            total += out.loss.item() * n
            count += n
            singles.append(out.logits[0])
    if attn == "ftl_segments":
        fast_dropout.segment_attention = original
        assert calls  # the per-segment path ran
    assert packed.loss.item() == pytest.approx(total / count, abs=1e-5)

    # every example's logits, found at its place in its packed row
    lengths = [len(e["input_ids"]) for e in examples]
    for row_i, members in enumerate(best_fit_decreasing(lengths, 64)):
        at = 0
        for i in sorted(members):
            got = packed.logits[row_i, at : at + lengths[i]]
            assert torch.allclose(got, singles[i], atol=1e-5), (attn, i)
            at += lengths[i]


def test_training_with_packing(chat_recipe, tmp_path):
    summary = Trainer(
        load_recipe(
            chat_recipe,
            [
                "data.packing=true",
                "data.max_length=128",
                "train.micro_batch_size=2",
                "train.eval_at_start=true",
                "train.max_steps=12",
                "train.eval_every=12",
            ],
        )
    ).fit()
    data = summary["data"]
    assert data["packing_efficiency"] >= 0.9, data
    assert data["packed_rows"] < data["packed_examples"] == data["train_examples"]
    # samples count examples, not rows
    assert summary["samples_seen"] > 2 * 12
    evals = [
        json.loads(x)
        for x in (tmp_path / "chat-run" / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in x
    ]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5, evals
