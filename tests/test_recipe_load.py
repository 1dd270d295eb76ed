"""Recipe loading: extends, overrides, and one clear message per problem (all at once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import UserError
from launcher.recipe import load_recipe
from launcher.recipe.load import parse_override

BASE = """\
model:
  name_or_path: some/model
data:
  format: text_classification
  train: train.jsonl
task: sequence_classification
output:
  dir: runs/x
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def problems(path: Path, overrides: list[str] | None = None) -> list:
    with pytest.raises(UserError) as e:
        load_recipe(path, overrides)
    return e.value.problems


def test_valid_recipe_fills_defaults(tmp_path):
    r = load_recipe(write(tmp_path, "r.yaml", BASE))
    assert r.train.micro_batch_size == 8 and r.adapter.type == "full" and r.quant.bits is None


def test_extends_list_later_wins_and_paths_are_relative(tmp_path):
    write(tmp_path, "base/a.yaml", "train:\n  lr: 1.0e-3\n  epochs: 3\n")
    write(tmp_path, "base/b.yaml", "train:\n  lr: 2.0e-3\n")
    child = write(tmp_path, "sub/child.yaml", "extends: [../base/a.yaml, ../base/b.yaml]\n" + BASE)
    r = load_recipe(child)
    assert r.train.lr == 2e-3 and r.train.epochs == 3  # b wins over a, a's other keys kept


def test_file_wins_over_extends(tmp_path):
    write(tmp_path, "p.yaml", "train:\n  lr: 1.0e-3\n")
    r = load_recipe(
        write(tmp_path, "c.yaml", "extends: p.yaml\n" + BASE + "train:\n  lr: 5.0e-4\n")
    )
    assert r.train.lr == 5e-4


def test_overrides_are_typed_through_the_schema(tmp_path):
    r = load_recipe(
        write(tmp_path, "r.yaml", BASE),
        [
            "train.lr=1e-4",
            "train.max_steps=7",
            "adapter.type=lora",
            "adapter.target_modules=[q_proj,v_proj]",
            "quant.bits=4",
        ],
    )
    assert r.train.lr == 1e-4 and isinstance(r.train.lr, float)
    assert r.train.max_steps == 7 and r.adapter.target_modules == ["q_proj", "v_proj"]
    assert r.quant.bits == 4


def test_parse_override_rejects_missing_equals():
    with pytest.raises(UserError):
        parse_override("train.lr")


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    p = write(tmp_path, "r.yaml", BASE + "train:\n  epoch: 2\n")
    (pr,) = problems(p)
    assert pr.key == "train.epoch" and pr.file == str(p.resolve()) and pr.line == 10
    assert "did you mean 'epochs'" in pr.hint


def test_unknown_top_level_key(tmp_path):
    (pr,) = problems(write(tmp_path, "r.yaml", BASE + "trian:\n  lr: 1\n"))
    assert pr.key == "trian" and "train" in pr.hint


def test_wrong_type(tmp_path):
    (pr,) = problems(write(tmp_path, "r.yaml", BASE + "train:\n  micro_batch_size: lots\n"))
    assert pr.key == "train.micro_batch_size" and pr.line == 10 and "integer" in pr.message


def test_out_of_range(tmp_path):
    (pr,) = problems(write(tmp_path, "r.yaml", BASE + "train:\n  lr: -1.0\n"))
    assert pr.key == "train.lr" and "greater than 0" in pr.message


def test_unknown_choice_lists_allowed_values(tmp_path):
    (pr,) = problems(write(tmp_path, "r.yaml", BASE + "train:\n  scheduler: cosin\n"))
    assert pr.key == "train.scheduler" and "'cosine'" in pr.hint and "'linear'" in pr.hint


def test_every_problem_is_reported_at_once(tmp_path):
    p = write(tmp_path, "r.yaml", BASE + "train:\n  lr: -1.0\n  warmup: 3\n  optimizer: adam\n")
    keys = {pr.key for pr in problems(p)}
    assert keys == {"train.lr", "train.warmup", "train.optimizer"}


def test_missing_required_key(tmp_path):
    text = BASE.replace("output:\n  dir: runs/x\n", "")
    (pr,) = problems(write(tmp_path, "r.yaml", text))
    assert pr.key == "output" and "add" in pr.hint


def test_yaml_syntax_error_has_line(tmp_path):
    (pr,) = problems(write(tmp_path, "r.yaml", BASE + "train:\n  lr: [1, 2\n  epochs: 3\n"))
    assert "YAML syntax error" in pr.message and pr.line is not None and pr.line >= 10


def test_extends_cycle_is_detected(tmp_path):
    write(tmp_path, "a.yaml", "extends: b.yaml\n" + BASE)
    write(tmp_path, "b.yaml", "extends: a.yaml\n")
    (pr,) = problems(tmp_path / "a.yaml")
    assert "cycle" in pr.message and "a.yaml" in pr.message and "b.yaml" in pr.message


def test_unsafe_yaml_tag_is_refused(tmp_path):
    p = write(tmp_path, "r.yaml", BASE + "evil: !!python/object/apply:os.system ['echo pwned']\n")
    (pr,) = problems(p)
    assert "unsafe" in pr.message and pr.line == 9


def test_override_of_unknown_key(tmp_path):
    (pr,) = problems(write(tmp_path, "r.yaml", BASE), ["train.learning_rate=1e-4"])
    assert pr.key == "train.learning_rate" and pr.file.startswith("override -o")


def test_cross_key_rules(tmp_path):
    p = write(
        tmp_path, "r.yaml", BASE.replace("text_classification", "chat") + "quant:\n  bits: 4\n"
    )
    keys = {pr.key for pr in problems(p)}
    assert keys == {"data.format", "quant.bits"}


def test_missing_recipe_file(tmp_path):
    (pr,) = problems(tmp_path / "nope.yaml")
    assert "not found" in pr.message


def test_redaction_keeps_tokenizer_paths():
    from launcher.recipe.redact import redact

    out = redact({"model": {"tokenizer": "path/to/tok"}, "hf_token": "abc", "wandb_api_key": "k"})
    assert out == {"model": {"tokenizer": "path/to/tok"}, "hf_token": "***", "wandb_api_key": "***"}
    # settings whose names hold "tokens" are not secrets (model.add_tokens was hidden once)
    kept = {"model": {"add_tokens": ["<x>"]}, "max_new_tokens": 5}
    assert redact(kept) == kept
    assert redact({"access_token": "t", "secrets": ["s"], "api_keys": ["k"]}) == {
        "access_token": "***",
        "secrets": "***",
        "api_keys": "***",
    }
