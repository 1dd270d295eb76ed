"""`ftl preprocess` and the content-hashed data cache (launcher/data/cache.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import make_tiny
import pytest

from launcher.cli.main import main
from launcher.data.build import load_datasets
from launcher.data.cache import MANIFEST, prepare
from launcher.errors import UserError
from launcher.models.build import load_tokenizer
from launcher.recipe.schema import DataCfg, ModelCfg

ROOT = Path(__file__).resolve().parent.parent


def chat_rows(n: int, seed: int) -> list[dict]:
    """Conversations of 41-71 tokens (the longer than max_length 64 are dropped)."""
    import random

    rng = random.Random(seed)
    rows = make_tiny.chat_rows(n, seed=seed)
    for r in rows:
        r["messages"][1]["content"] += " " + " ".join(
            rng.choice(make_tiny.WORDS) for _ in range(rng.randint(0, 30))
        )
    return rows


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    make_tiny.make_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(ModelCfg(name_or_path=str(tok_dir)), needs_eos=True)


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    return {
        "train": make_tiny.write_jsonl(tmp_path / "train.jsonl", chat_rows(300, 0)),
        "eval": make_tiny.write_jsonl(tmp_path / "eval.jsonl", chat_rows(40, 1)),
    }


def cfg_for(data: dict[str, Path], root: Path, **kw) -> DataCfg:
    return DataCfg(
        format="chat",
        train=str(data["train"]),
        eval=str(data["eval"]),
        max_length=64,
        too_long="drop",
        cache_dir=str(root),
        **kw,
    )


def entries(root: Path) -> list[Path]:
    """Every folder in the cache root, temporary ones included."""
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_hit_on_unchanged_rerun_and_equal_to_load_datasets(tmp_path, data, tok):
    cfg = cfg_for(data, tmp_path / "cache")
    first = prepare(cfg, tok)
    assert not first.hit and first.entry is not None
    manifest = first.entry / MANIFEST
    mtime = manifest.stat().st_mtime_ns
    again = prepare(cfg, tok)
    assert again.hit and again.entry == first.entry
    assert manifest.stat().st_mtime_ns == mtime  # nothing rebuilt
    expected = load_datasets(cfg, tok, label_kind="tokens")
    assert again.datasets == expected  # examples, labels and stats
    assert first.datasets == expected
    s = again.manifest["stats"]
    assert s["rows_in"] == 340 and s["dropped"] == {"bad_row": 0, "too_long": 340 - s["rows_out"]}
    assert 0 < expected.stats["dropped_too_long"] < 100
    assert sum(s["lengths"]["train"]["histogram"]["counts"]) == len(expected.train)
    assert 0 < s["packing"]["packing_efficiency"] <= 1
    assert entries(tmp_path / "cache") == [first.entry]


def _edit_data(d, cfg, tok):
    with d["train"].open("a") as f:
        f.write(json.dumps(chat_rows(1, 9)[0]) + "\n")
    return cfg, tok, "data file"


def _edit_template(d, cfg, tok):
    other = copy.deepcopy(tok)
    other.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    return cfg, other, "chat template"


def _edit_max_length(d, cfg, tok):
    return (
        cfg.model_copy(update={"max_length": 60}),
        tok,
        "data.max_length: 64 in the cache, 60 in the recipe",
    )


def _edit_tokenizer(d, cfg, tok):
    other = copy.deepcopy(tok)
    other.add_tokens(["<tool>"], special_tokens=True)
    return cfg, other, "tokenizer differs"


@pytest.mark.parametrize("edit", [_edit_data, _edit_template, _edit_max_length, _edit_tokenizer])
def test_each_key_component_rebuilds(tmp_path, data, tok, edit):
    cfg = cfg_for(data, tmp_path / "cache")
    first = prepare(cfg, tok)
    cfg2, tok2, reason = edit(data, cfg, tok)
    second = prepare(cfg2, tok2)
    assert not second.hit and second.entry != first.entry
    assert any(reason in why for why in second.rebuilt_because), second.rebuilt_because
    assert second.datasets == load_datasets(cfg2, tok2, label_kind="tokens")
    assert prepare(cfg2, tok2).hit


def test_packing_is_not_in_the_key(tmp_path, data, tok):
    """The cache holds unpacked examples (the loop packs them), so toggling packing reuses it."""
    cfg = cfg_for(data, tmp_path / "cache")
    first = prepare(cfg, tok)
    packed = prepare(cfg.model_copy(update={"packing": True}), tok)
    assert packed.hit and packed.entry == first.entry


def test_cache_off_and_image_tasks_bypass(tmp_path, data, tok):
    cfg = cfg_for(data, tmp_path / "cache", cache=False)
    done = prepare(cfg, tok)
    assert done.entry is None and not (tmp_path / "cache").exists()
    done = prepare(cfg_for(data, tmp_path / "cache"), tok, images=True, label_kind="tokens")
    assert done.entry is None and not (tmp_path / "cache").exists()


def test_corrupt_shard_is_a_user_error(tmp_path, data, tok):
    cfg = cfg_for(data, tmp_path / "cache")
    entry = prepare(cfg, tok).entry
    shard = entry / "train-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError) as e:
        prepare(cfg, tok)
    text = e.value.render()
    assert str(shard) in text and "checksum" in text and "ftl preprocess" in text


def test_unreadable_parquet_is_a_user_error(tmp_path, data, tok):
    """A shard whose manifest checksum was updated but whose bytes are not Parquet."""
    cfg = cfg_for(data, tmp_path / "cache")
    entry = prepare(cfg, tok).entry
    shard = entry / "train-00000.parquet"
    shard.write_bytes(b"not parquet at all")
    m = json.loads((entry / MANIFEST).read_text())
    from launcher.data.shards import hash_file

    m["shards"][0].update(bytes=shard.stat().st_size, xxh3=hash_file(shard))
    (entry / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(UserError, match="not readable Parquet"):
        prepare(cfg, tok)


def test_waiting_process_gets_the_main_process_build(tmp_path, data, tok):
    cfg = cfg_for(data, tmp_path / "cache")
    built = {}

    def rank0():
        time.sleep(0.5)  # the waiter starts first
        built["main"] = prepare(cfg, tok, is_main=True)

    t = threading.Thread(target=rank0)
    t.start()
    waited = prepare(cfg, tok, is_main=False, timeout_s=60)
    t.join()
    assert not waited.hit and waited.entry == built["main"].entry
    assert waited.datasets == built["main"].datasets


def test_waiting_process_raises_the_main_process_error(tmp_path, data, tok):
    data["train"].write_text(data["train"].read_text() + '{"messages": []}\n')
    cfg = cfg_for(data, tmp_path / "cache")
    errors = {}

    def rank0():
        time.sleep(0.3)
        try:
            prepare(cfg, tok, is_main=True)
        except UserError as e:
            errors["main"] = e.render()

    t = threading.Thread(target=rank0)
    t.start()
    with pytest.raises(UserError) as e:
        prepare(cfg, tok, is_main=False, timeout_s=60)
    t.join()
    assert e.value.render() == errors["main"]
    assert "train.jsonl:301" in errors["main"]
    assert entries(tmp_path / "cache") == []


def test_waiting_process_times_out(tmp_path, data, tok):
    cfg = cfg_for(data, tmp_path / "cache")
    with pytest.raises(UserError, match="ftl preprocess"):
        prepare(cfg, tok, is_main=False, timeout_s=0.3)


def recipe(tmp_path: Path, tok_dir: Path, data: dict[str, Path], max_length: int = 64) -> Path:
    path = tmp_path / f"chat-{max_length}.yaml"
    path.write_text(
        f"""\
task: causal_lm
model:
  name_or_path: {tok_dir}
data:
  format: chat
  train: {data["train"]}
  eval: {data["eval"]}
  max_length: {max_length}
  too_long: drop
output:
  dir: {tmp_path / "run"}
"""
    )
    return path


def test_cli_builds_then_hits(tmp_path, tok_dir, data, capsys):
    r, cache = recipe(tmp_path, tok_dir, data), tmp_path / "cache"
    assert main(["preprocess", str(r), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "built:" in out and "| rows out" in out and "| dropped: too long" in out
    (entry,) = entries(cache)
    # the tool script, in a fresh process: the key is stable across processes
    tool = [sys.executable, "tools/preprocess_dataset.py", str(r), "--cache-dir", str(cache)]
    second = subprocess.run(tool, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 0, second.stderr
    assert f"cache hit: {entry}" in second.stdout


def test_cli_manifest_from_another_recipe(tmp_path, tok_dir, data, capsys):
    cache = tmp_path / "cache"
    assert (
        main(["preprocess", str(recipe(tmp_path, tok_dir, data)), "--cache-dir", str(cache)]) == 0
    )
    (entry,) = entries(cache)
    other = recipe(tmp_path, tok_dir, data, max_length=60)
    capsys.readouterr()
    assert main(["preprocess", str(other), "-o", f"data.cache_dir={entry}"]) == 2
    err = capsys.readouterr().err
    assert (
        "built for other inputs" in err
        and "data.max_length: 64 in the cache, 60 in the recipe" in err
    )
    assert "Traceback" not in err and "--force" in err
    assert main(["preprocess", str(other), "--cache-dir", str(entry), "--force"]) == 0
    assert "built:" in capsys.readouterr().out
    assert main(["preprocess", str(other), "--cache-dir", str(entry)]) == 0
    assert "cache hit" in capsys.readouterr().out


BAD = {
    "non_utf8": (b'{"messages": "caf\xe9"}\n', "not UTF-8"),
    "empty_conversation": (b'{"messages": []}\n', "no assistant message"),
    "wrong_role": (
        b'{"messages": [{"role": "assistant", "content": "hi"}]}\n',
        "starts with an assistant message",
    ),
    "missing_field": (b'{"text": "hello"}\n', "missing field 'messages'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_cli_bad_rows_exit_2_and_leave_nothing(tmp_path, tok_dir, data, capsys, case):
    line, needle = BAD[case]
    data["train"].write_bytes(data["train"].read_bytes() + line)
    cache = tmp_path / "cache"
    assert (
        main(["preprocess", str(recipe(tmp_path, tok_dir, data)), "--cache-dir", str(cache)]) == 2
    )
    err = capsys.readouterr().err
    assert needle in err and "train.jsonl" in err and "Traceback" not in err
    assert err.count("error:") == 1
    assert entries(cache) == []  # no entry, no temporary folder


def test_ftl_train_uses_the_cache(tmp_path, chat_recipe, capsys):
    """A second `ftl train` of the same recipe loads the entry instead of tokenizing, and
    trains to the same losses; `ftl preprocess` built the entry training then uses."""
    cache = tmp_path / "cache"
    common = ["-o", f"data.cache_dir={cache}", "-o", "train.max_steps=3"]
    assert main(["preprocess", str(chat_recipe), "--cache-dir", str(cache)]) == 0
    assert len(entries(cache)) == 1
    capsys.readouterr()
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert main(["train", str(chat_recipe), *common, "-o", f"output.dir={out}"]) == 0
        assert "data cache: hit" in capsys.readouterr().out
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        runs.append([r["loss"] for r in rows if r["kind"] == "train"])
    assert runs[0] == runs[1] and len(runs[0]) == 3
    assert len(entries(cache)) == 1
    # the run without the cache gives the same losses
    out = tmp_path / "plain"
    assert (
        main(
            [
                "train",
                str(chat_recipe),
                *common,
                "-o",
                "data.cache=false",
                "-o",
                f"output.dir={out}",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if r["kind"] == "train"] == runs[0]
