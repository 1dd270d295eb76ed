"""Dataset mixtures: data.train plus data.mix sources, each with a weight."""

from __future__ import annotations

import json
from collections import Counter

import make_tiny
import pytest

from launcher.cli.main import main
from launcher.data.build import load_datasets, mix_rows
from launcher.models.build import load_tokenizer
from launcher.recipe.schema import DataCfg, ModelCfg


def test_mix_rows_weights_are_exact_and_seeded():
    a, b = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(8)]
    rows, report = mix_rows([a, b], [2.0, 0.5], seed=3)
    counts = Counter(rows)
    assert all(counts[x] == 2 for x in a)  # whole copies
    sampled = [x for x in b if counts[x]]
    assert len(sampled) == 4 and all(counts[x] == 1 for x in sampled)  # without replacement
    assert report == [
        {"rows": 10, "weight": 2.0, "used": 20},
        {"rows": 8, "weight": 0.5, "used": 4},
    ]
    assert mix_rows([a, b], [2.0, 0.5], seed=3)[0] == rows  # deterministic
    assert mix_rows([a, b], [2.0, 0.5], seed=4)[0] != rows  # the seed decides
    assert rows != sorted(rows)  # interleaved, not source after source


def unique_chats(n: int, seed: int, tag: str) -> list[dict]:
    rows = make_tiny.chat_rows(n, seed=seed)
    for i, r in enumerate(rows):  # no two rows alike, across sources too
        r["messages"][0]["content"] += f" {tag}{i}"
    return rows


@pytest.fixture
def sources(tmp_path):
    return {
        "a": make_tiny.write_jsonl(tmp_path / "a.jsonl", unique_chats(20, 0, "a")),
        "b": make_tiny.write_jsonl(tmp_path / "b.jsonl", unique_chats(10, 1, "b")),
    }


def test_mixture_holds_out_eval_rows_per_source_before_weighting(tiny_llama, sources):
    tok = load_tokenizer(ModelCfg(name_or_path=str(tiny_llama)), needs_eos=True)
    cfg = DataCfg(
        format="chat",
        train=str(sources["a"]),
        mix=[{"path": str(sources["b"]), "weight": 3.0}],
        eval_split=0.2,
        max_length=256,
    )
    data = load_datasets(cfg, tok)
    mix = data.stats["mixture"]
    assert [m["rows"] for m in mix] == [16, 8] and [m["used"] for m in mix] == [16, 24]
    assert len(data.train) == 40 and len(data.eval) == 6
    seen = {tuple(e["input_ids"]) for e in data.train}
    assert not any(tuple(e["input_ids"]) in seen for e in data.eval)  # no eval row trained on


def test_ftl_train_with_a_mixture_and_its_bad_input(tmp_path, chat_recipe, sources, capsys):
    out = tmp_path / "mixrun"
    args = ["train", str(chat_recipe), "-o", f"output.dir={out}", "-o", "train.max_steps=2"]
    mix = f"data.mix=[{{path: {sources['b']}, weight: 0.5}}]"
    assert main([*args, "-o", mix]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["mixture"][1] == {
        "rows": 10,
        "weight": 0.5,
        "used": 5,
        "path": str(sources["b"]),
    }
    capsys.readouterr()
    bad = f"data.mix=[{{path: {tmp_path / 'nope.jsonl'}, weight: 1}}]"
    assert main([*args, "-o", bad, "-o", f"output.dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert "data.mix[0].path" in err and "nope.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
    zero = f"data.mix=[{{path: {sources['b']}, weight: 0}}]"
    assert main([*args, "-o", zero]) == 2
    assert "data.mix" in capsys.readouterr().err


def test_workers_give_the_same_examples_and_stats(tiny_llama, tmp_path):
    """data.num_workers forks formatting processes: the same examples, in the same order,
    the same counts (truncated, dropped, bad rows) and the same first error."""
    from launcher.data import build
    from launcher.errors import UserError

    tok = load_tokenizer(ModelCfg(name_or_path=str(tiny_llama)), needs_eos=True)
    rows = make_tiny.chat_rows(700, seed=2)
    for i in (5, 333, 650):
        rows[i]["messages"] = []  # bad rows, in different chunks
    path = make_tiny.write_jsonl(tmp_path / "t.jsonl", rows)
    common = dict(format="chat", train=str(path), max_length=40, on_bad_row="skip")
    one = load_datasets(DataCfg(**common, too_long="drop"), tok)
    many = load_datasets(DataCfg(**common, too_long="drop", num_workers=2), tok)
    assert one.train == many.train and one.stats == many.stats
    assert one.stats["bad_rows_skipped"] == 3 and one.stats["dropped_too_long"] > 0
    cut = load_datasets(DataCfg(**common, num_workers=2), tok)
    assert cut.stats == load_datasets(DataCfg(**common), tok).stats
    assert cut.stats["truncated"] > 0
    assert build.CHUNK_ROWS < 700  # several chunks really ran
    strict = dict(common, on_bad_row="error", num_workers=2)
    with pytest.raises(UserError, match="t.jsonl:6"):  # the first bad row, as in one process
        load_datasets(DataCfg(**strict), tok)
