"""`ftl shard`: balanced, deterministic, complete shards from every input type."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import make_tiny
import pytest

from launcher.cli.main import main
from launcher.tools.shard import MANIFEST, verify


def rows(n: int) -> list[dict]:
    return [
        {"id": i, "text": " ".join(["word"] * (1 + i % 17)), "label": f"c{i % 3}"} for i in range(n)
    ]


def read_shards(out: Path) -> list[list[dict]]:
    manifest = json.loads((out / MANIFEST).read_text())
    return [
        [json.loads(x) for x in (out / s["file"]).read_text().splitlines()]
        for s in manifest["shards"]
    ]


def test_rows_are_balanced_complete_shuffled_and_deterministic(tmp_path):
    data = make_tiny.write_jsonl(tmp_path / "d.jsonl", rows(1003))
    assert main(["shard", str(data), "--num-shards", "4", "--out", str(tmp_path / "a")]) == 0
    shards = read_shards(tmp_path / "a")
    assert sorted(len(s) for s in shards) == [250, 251, 251, 251]
    ids = [r["id"] for s in shards for r in s]
    assert sorted(ids) == list(range(1003))  # every row once
    assert any(s != sorted(s, key=lambda r: r["id"]) for s in shards)  # shuffled inside
    assert verify(tmp_path / "a")["rows"] == 1003

    main(["shard", str(data), "--num-shards", "4", "--out", str(tmp_path / "b")])
    main(["shard", str(data), "--num-shards", "4", "--out", str(tmp_path / "c"), "--seed", "1"])
    files = sorted(p.name for p in (tmp_path / "a").glob("shard-*"))
    for f in files:  # same seed: byte-identical; another seed: another split
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert any(
        (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files
    )


def test_by_tokens_balances_token_totals(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    data = make_tiny.write_jsonl(tmp_path / "d.jsonl", rows(400))
    out = tmp_path / "t"
    args = ["shard", str(data), "--num-shards", "3", "--out", str(out), "--by", "tokens"]
    assert main([*args, "--tokenizer", str(tiny_llama)]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    tok = AutoTokenizer.from_pretrained(tiny_llama)

    def size(r):
        return sum(
            len(tok(v, add_special_tokens=False)["input_ids"]) for v in (r["text"], r["label"])
        )

    real = [sum(size(r) for r in s) for s in read_shards(out)]
    assert real == [s["tokens"] for s in manifest["shards"]]  # the manifest counts truly
    assert max(real) - min(real) <= max(size(r) for r in rows(400))
    assert manifest["tokens"] == sum(real)


def test_csv_parquet_and_saved_dataset_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    src = rows(60)
    csv = tmp_path / "d.csv"
    csv.write_text(
        "id,text,label\n" + "".join(f"{r['id']},{r['text']},{r['label']}\n" for r in src)
    )
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(src), parquet, row_group_size=7)
    saved = tmp_path / "saved"
    Dataset.from_list(src).save_to_disk(str(saved))
    out = tmp_path / "mixed"
    assert (
        main(["shard", str(csv), str(parquet), str(saved), "--num-shards", "5", "--out", str(out)])
        == 0
    )
    got = [r for s in read_shards(out) for r in s]
    assert len(got) == 180
    # CSV cells are text, Parquet and datasets keep their types
    assert Counter(type(r["id"]).__name__ for r in got) == {"str": 60, "int": 120}
    manifest = json.loads((out / MANIFEST).read_text())
    assert [i["path"] for i in manifest["inputs"]] == [str(csv), str(parquet), str(saved)]
    assert all("xxh3" in i for i in manifest["inputs"][:2])


def test_shard_bad_input(tmp_path, capsys):
    def err(*args: str) -> str:
        rc = main(["shard", *args])
        e = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in e, e
        return e

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\n{"a": \n')
    out = tmp_path / "out"
    assert f"{bad}:2" in err(str(bad), "--num-shards", "2", "--out", str(out))
    assert not out.exists() and not list(tmp_path.glob(".out.tmp"))

    good = make_tiny.write_jsonl(tmp_path / "g.jsonl", rows(3))
    assert "3 rows cannot fill 4 shards" in err(str(good), "--num-shards", "4", "--out", str(out))
    assert "input not found" in err(str(tmp_path / "x.txt"), "--num-shards", "2", "--out", str(out))
    (tmp_path / "x.txt").write_text("hi")
    assert "unsupported input type '.txt'" in err(
        str(tmp_path / "x.txt"), "--num-shards", "2", "--out", str(out)
    )
    assert "--tokenizer" in err(str(good), "--num-shards", "2", "--out", str(out), "--by", "tokens")
    out.mkdir()
    assert "already exists" in err(str(good), "--num-shards", "2", "--out", str(out))

    # a changed shard is caught by the manifest's checksum
    ok = tmp_path / "ok"
    main(["shard", str(good), "--num-shards", "2", "--out", str(ok)])
    shard0 = next(ok.glob("shard-00000-*"))
    shard0.write_text(shard0.read_text().replace("word", "WORD"))
    from launcher.errors import UserError

    with pytest.raises(UserError, match="changed since"):
        verify(ok)


def test_ftl_train_reads_a_shard_folder(tmp_path, cls_recipe, cls_data):
    """A shard folder is a data.train value: every row, checksums checked first."""
    from launcher.recipe import load_recipe
    from launcher.train.loop import Trainer

    out = tmp_path / "shards"
    assert main(["shard", str(cls_data["train"]), "--num-shards", "3", "--out", str(out)]) == 0
    n = len(Path(cls_data["train"]).read_text().splitlines())
    trainer = Trainer(load_recipe(cls_recipe, [f"data.train={out}", "train.max_steps=1"]))
    assert trainer.data.stats["train_examples"] == n
    trainer.stop.uninstall()


def test_each_rank_reads_and_checks_only_its_own_shards(tmp_path):
    from launcher.data.read import BadRows, read_rows
    from launcher.errors import UserError

    data = make_tiny.write_jsonl(tmp_path / "d.jsonl", rows(101))
    out = tmp_path / "s"
    assert main(["shard", str(data), "--num-shards", "4", "--out", str(out)]) == 0
    shards = read_shards(out)

    def read(rank: int, world: int) -> list[int]:
        got = read_rows(
            out, key="data.train", on_bad_row="error", bad=BadRows(), part=(rank, world)
        )
        return [r.data["id"] for r in got]

    ranks = [read(0, 2), read(1, 2)]
    assert ranks[0] == [r["id"] for r in shards[0] + shards[2]]  # shard i to rank i mod 2
    assert ranks[1] == [r["id"] for r in shards[1] + shards[3]]
    assert sorted(ranks[0] + ranks[1]) == list(range(101))  # disjoint and complete
    # a changed shard stops only the rank that reads it, naming the shard
    f = out / json.loads((out / MANIFEST).read_text())["shards"][1]["file"]
    f.write_text(f.read_text().replace('"word', '"w0rd', 1))
    assert read(0, 2) == ranks[0]
    with pytest.raises(UserError, match=f.name):
        read(1, 2)
    with pytest.raises(UserError, match="4 shards for 8 processes"):
        read(0, 8)
