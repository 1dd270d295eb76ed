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


@pytest.mark.parametrize(
    "attn,rows_per_bin",
    [("sdpa", 1), ("eager", 1), ("ftl_segments", 1), ("ftl_segments", 3), ("sdpa", 3)],
)
def test_packed_loss_equals_the_examples_one_by_one(attn, rows_per_bin, tiny_llama):
    """One packed batch against each example on its own: the logits of every segment and
    the token-weighted loss agree within 1e-5 (no attention across examples). ftl_segments:
    ftl's CPU backend, attention computed per segment from the batch's cu_seq_lens.
    rows_per_bin 3: padding-free bins of 3 x 64 tokens, each row a micro-batch of its own."""
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
    rows, stats = pack(examples, 64, rows_per_bin)
    assert stats["packed_rows"] < len(examples) and stats["packed_examples"] == 7
    assert stats["packed_row_tokens"] == 64 * rows_per_bin
    if rows_per_bin > 1:
        assert all("input_ids" in r and len(r["input_ids"]) <= 192 for r in rows)
        assert max(len(r["input_ids"]) for r in rows) > 64  # rows longer than max_length
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
    for row_i, members in enumerate(best_fit_decreasing(lengths, 64 * rows_per_bin)):
        at = 0
        for i in sorted(members):
            got = packed.logits[row_i, at : at + lengths[i]]
            assert torch.allclose(got, singles[i], atol=1e-5), (attn, i)
            at += lengths[i]


@pytest.mark.parametrize("padding_free", [True, False])
def test_training_with_packing(padding_free, chat_recipe, tmp_path):
    trainer = Trainer(
        load_recipe(
            chat_recipe,
            [
                "data.packing=true",
                f"data.padding_free={str(padding_free).lower()}",
                "data.max_length=128",
                "train.micro_batch_size=2",
                "train.eval_at_start=true",
                "train.max_steps=12",
                "train.eval_every=12",
            ],
        )
    )
    assert trainer.objective.kept_logits  # the head runs on the targets' positions only
    summary = trainer.fit()
    data = summary["data"]
    assert data["packing_efficiency"] >= 0.9, data
    assert data["padding_free"] is padding_free
    assert data["packed_row_tokens"] == (256 if padding_free else 128)
    assert data["packed_rows"] < data["packed_examples"] == data["train_examples"]
    # samples count examples, not rows
    assert summary["samples_seen"] > 2 * 12
    evals = [
        json.loads(x)
        for x in (tmp_path / "chat-run" / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in x
    ]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.4, evals


@pytest.mark.parametrize("packed", [False, True])
def test_kept_logits_give_transformers_loss_and_gradients(packed, tiny_llama):
    """The head on the targets' positions only (logits_to_keep = next_token_mask) against
    transformers' own loss on full logits: the same loss, eval sums and gradients (1e-5),
    with a padded batch (prompt and padding at -100) and with a packed one; and with label
    smoothing against the full-logit smoothed loss."""
    from transformers import AutoModelForCausalLM

    from launcher.compat import supports_kept_logits
    from launcher.data.build import collate
    from launcher.train.tasks import TASKS, next_token_mask

    task = TASKS["causal_lm"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert supports_kept_logits(model)
    rng = random.Random(2)
    examples = []
    for _ in range(5):
        ids = [rng.randrange(5, 300) for _ in range(rng.randint(6, 40))]
        prompt = rng.randint(2, len(ids) - 2)
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    if packed:
        batch = collate_packed(pack(examples, 64)[0], pad_id=0)
        batch.pop("_tokens"), batch.pop("_samples")
    else:
        batch = collate(examples, 0, label_kind="tokens")
    keep = next_token_mask(batch["labels"])
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert int(keep.sum()) == n_targets < keep.numel() // 2

    def grads():
        return [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    full = model(**batch)
    full.loss.backward()
    want = grads()
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs, logits_to_keep=keep)
    assert out.logits.shape == (n_targets, model.config.vocab_size)
    loss = task.smoothed_loss(out, batch, 0.0, keep=keep)
    loss.backward()
    assert loss.item() == pytest.approx(full.loss.item(), abs=1e-6)
    for g, w in zip(grads(), want, strict=True):
        assert torch.allclose(g, w, atol=1e-5)

    with torch.no_grad():
        full_out = model(**inputs)
        s_full, n_full, _ = task.eval_batch(full_out, batch)
        s_kept, n_kept, _ = task.eval_batch(out, batch, keep=keep)
        assert torch.equal(n_full, n_kept)
        assert torch.allclose(s_full, s_kept, atol=1e-4)
        smooth_full = task.smoothed_loss(full_out, batch, 0.1)
        smooth_kept = task.smoothed_loss(out, batch, 0.1, keep=keep)
        assert smooth_kept.item() == pytest.approx(smooth_full.item(), abs=1e-6)
        assert smooth_kept.item() != pytest.approx(loss.item(), abs=1e-5)
