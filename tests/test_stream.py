"""Streaming (`data.streaming: true`): read, tokenize and pack as training goes."""

from __future__ import annotations

import json
from pathlib import Path

import make_tiny
import pytest

from launcher.cli.main import main
from launcher.data.build import format_context, load_datasets
from launcher.data.stream import packed_rows
from launcher.models.build import load_tokenizer
from launcher.recipe.schema import DataCfg, ModelCfg


def texts(n: int) -> list[dict]:
    return [
        {"text": " ".join(make_tiny.WORDS[(i * 7 + k) % 47] for k in range(3 + i % 20))}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_tokenizer(ModelCfg(name_or_path=str(tiny_llama)), needs_eos=True)


def split_row(row: dict) -> list[list[int]]:
    """A packed row back into its examples, by the restarting position ids."""
    out: list[list[int]] = []
    for t, p in zip(row["input_ids"], row["position_ids"], strict=True):
        if p == 0:
            out.append([])
        out[-1].append(t)
    return out


def test_a_pass_holds_every_example_once_packed_whole(tmp_path, tok):
    """One pass of the stream, unpacked, is exactly the formatted examples (each once, in a
    seeded shuffle); rows never exceed max_length; the next pass reshuffles."""
    path = make_tiny.write_jsonl(tmp_path / "t.jsonl", texts(150))
    cfg = DataCfg(format="completion", train=str(path), max_length=64, shuffle_buffer=16)
    ref = sorted(map(tuple, (e["input_ids"] for e in load_datasets(cfg, tok).train)))
    stats = {"dropped_too_long": 0, "bad_rows_skipped": 0, "passes": 0}
    rows = packed_rows(cfg, format_context(cfg, tok), 0, 1, seed=0, stats=stats)
    first, got = [], []
    while stats["passes"] == 0:
        row = next(rows)
        assert len(row["input_ids"]) <= 64 and row["labels"][0] == -100
        first.append(row)
    for row in first[:-1]:  # the last row may already hold the next pass's examples
        got += [tuple(x) for x in split_row(row)]
    from collections import Counter

    # every example of the pass, at most as often as the data holds it (the last row,
    # which may mix in the next pass, is left out)
    assert not Counter(got) - Counter(ref) and len(got) >= len(ref) - 12
    again = packed_rows(cfg, format_context(cfg, tok), 0, 1, seed=0, stats=dict(stats))
    assert [next(again) for _ in range(5)] == first[:5]  # deterministic
    other = packed_rows(cfg, format_context(cfg, tok), 0, 1, seed=1, stats=dict(stats))
    assert [next(other) for _ in range(5)] != first[:5]  # the seed decides the order


def test_ranks_stream_disjoint_lines(tmp_path, tok):
    path = make_tiny.write_jsonl(tmp_path / "t.jsonl", texts(60))
    cfg = DataCfg(format="completion", train=str(path), max_length=512, shuffle_buffer=1000)
    seen = []
    for rank in range(2):
        stats = {"dropped_too_long": 0, "bad_rows_skipped": 0, "passes": 0}
        rows = packed_rows(cfg, format_context(cfg, tok), rank, 2, seed=0, stats=stats)
        mine = []
        while stats["passes"] == 0:
            mine += [tuple(x) for x in split_row(next(rows))]
        seen.append(set(mine))
    assert not seen[0] & seen[1]


def test_padding_free_stream_rows_hold_a_micro_batch(tmp_path, tok):
    path = make_tiny.write_jsonl(tmp_path / "t.jsonl", texts(60))
    cfg = DataCfg(format="completion", train=str(path), max_length=64, shuffle_buffer=16)
    stats = {"dropped_too_long": 0, "bad_rows_skipped": 0, "passes": 0}
    rows = packed_rows(cfg, format_context(cfg, tok), 0, 1, seed=0, stats=stats, capacity=192)
    first = [next(rows) for _ in range(6)]
    assert all(len(r["input_ids"]) <= 192 for r in first)
    assert max(len(r["input_ids"]) for r in first) > 64
    assert all(len(x) <= 64 for r in first for x in split_row(r))  # examples stay whole


@pytest.mark.parametrize("fast_dropout", [False, True])
def test_ftl_train_streams_and_resumes_exactly(fast_dropout, tmp_path, tiny_llama):
    """A streamed run, stopped at a checkpoint and resumed, logs the losses of one
    uninterrupted run (the stream regenerates and skips what was trained). With
    fast_dropout on CPU, packing is padding-free: one row of 2 x 64 tokens a micro-batch."""
    path = make_tiny.write_jsonl(tmp_path / "t.jsonl", texts(80))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
task: causal_lm
model: {{name_or_path: {tiny_llama}}}
data: {{format: completion, train: {path}, max_length: 64, streaming: true, shuffle_buffer: 8}}
train: {{max_steps: 6, micro_batch_size: 2, grad_accum: 2, lr: 1.0e-3, log_every: 1,
         save_every: 3, fast_dropout: {str(fast_dropout).lower()}}}
output: {{dir: {tmp_path / "full"}}}
"""
    )

    def losses(run: Path) -> list[float]:
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert main(["train", str(recipe)]) == 0
    full = losses(tmp_path / "full")
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["data"]["streaming"] and summary["data"]["passes"] >= 1
    assert summary["data"]["packed_row_tokens"] == (128 if fast_dropout else 64)
    # resumed from its step-3 checkpoint, the run regrows steps 4-6 identically
    older = str(tmp_path / "full" / "checkpoints" / "step-00000003")
    assert main(["train", str(recipe), "-o", "train.save_every=null", "--resume", older]) == 0
    assert losses(tmp_path / "full") == full and len(full) == 6


def test_streaming_bad_settings(tmp_path, tiny_llama, capsys):
    path = make_tiny.write_jsonl(tmp_path / "t.jsonl", texts(10))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
task: causal_lm
model: {{name_or_path: {tiny_llama}}}
data: {{format: completion, train: {path}, streaming: true, eval_split: 0.1}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "data.eval_split" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_streamed_mixture_draws_each_source_by_its_epoch_share(tmp_path, tok, tiny_llama):
    """data.mix while streaming: source i comes next with probability weight_i x rows_i /
    sum; each source restarts on its own; the same seed gives the same stream; ranks
    stay disjoint; `ftl train` runs it and reports the mixture."""
    from launcher.data.formats import FORMATS
    from launcher.data.stream import examples
    from launcher.recipe.schema import MixSource

    a_rows = texts(40)
    b_rows = [{"text": f"zebra {r['text']}"} for r in texts(10)]
    a = make_tiny.write_jsonl(tmp_path / "a.jsonl", a_rows)
    b = make_tiny.write_jsonl(tmp_path / "b.jsonl", b_rows)
    cfg = DataCfg(
        format="completion",
        train=str(a),
        max_length=64,
        shuffle_buffer=8,
        mix=[MixSource(path=str(b), weight=2.0)],
    )
    ctx = format_context(cfg, tok)
    ids = {
        src: {tuple(FORMATS["completion"](r, ctx)["input_ids"]) for r in rows}
        for src, rows in (("a", a_rows), ("b", b_rows))
    }

    def draw(rank: int = 0, world: int = 1, seed: int = 0, n: int = 900):
        stats = {"dropped_too_long": 0, "bad_rows_skipped": 0, "passes": 0}
        it = examples(cfg, ctx, rank, world, seed, stats)
        return [tuple(next(it)["input_ids"]) for _ in range(n)], stats

    got, stats = draw()
    from_b = sum(x in ids["b"] for x in got)
    assert all(x in ids["a"] or x in ids["b"] for x in got)
    # shares: a 1 x 40 rows, b 2 x 10 rows -> b is 1/3 of the stream
    assert abs(from_b / len(got) - 1 / 3) < 0.06, from_b
    mixture = stats["mixture"]
    assert [m["rows"] for m in mixture] == [40, 10]
    assert [m["share"] for m in mixture] == [
        pytest.approx(2 / 3, abs=1e-3),
        pytest.approx(1 / 3, abs=1e-3),
    ]
    assert mixture[1]["passes"] > mixture[0]["passes"] >= 5  # b (10 rows) wraps more often
    assert draw()[0] == got and draw(seed=1)[0] != got
    mine = [set(draw(rank, 2, n=200)[0]) for rank in range(2)]
    assert not mine[0] & mine[1]

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
task: causal_lm
model: {{name_or_path: {tiny_llama}}}
data: {{format: completion, train: {a}, max_length: 64, streaming: true,
        mix: [{{path: {b}, weight: 2}}]}}
train: {{max_steps: 2, micro_batch_size: 2}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    assert main(["train", str(recipe)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [m["rows"] for m in summary["data"]["mixture"]] == [40, 10]
