"""Bad input: one clear message, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.cli.main import main


def train(recipe: Path, *extra: str) -> int:
    return main(["train", str(recipe), *extra])


def assert_user_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_missing_data_file(cls_recipe, tmp_path, capsys):
    rc = train(cls_recipe, "-o", f"data.train={tmp_path / 'nope.jsonl'}")
    assert_user_error(capsys, rc, "data.train", "not found", "nope.jsonl")
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_empty_dataset(cls_recipe, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    rc = train(cls_recipe, "-o", f"data.train={empty}")
    assert_user_error(capsys, rc, "data.train", "empty")
    assert not (tmp_path / "run").exists()


def test_malformed_jsonl_line_names_the_line(cls_recipe, tmp_path, cls_data, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = cls_data["train"].read_text().splitlines()
    lines.insert(4, '{"text": "broken", "label": ')
    bad.write_text("\n".join(lines) + "\n")
    rc = train(cls_recipe, "-o", f"data.train={bad}")
    assert_user_error(capsys, rc, f"{bad}:5", "malformed JSON", "on_bad_row")
    assert not (tmp_path / "run").exists()


def test_on_bad_row_skip_counts_in_summary(cls_recipe, tmp_path, cls_data):
    bad = tmp_path / "bad.jsonl"
    lines = cls_data["train"].read_text().splitlines()
    lines[2:2] = ["{not json", '{"text": "no label here"}', '["a list"]']
    bad.write_text("\n".join(lines) + "\n")
    assert (
        train(
            cls_recipe,
            "-o",
            f"data.train={bad}",
            "-o",
            "data.on_bad_row=skip",
            "-o",
            "train.max_steps=2",
        )
        == 0
    )
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["bad_rows_skipped"] == 3
    assert summary["data"]["train_examples"] == 96


def test_label_outside_label_set(cls_recipe, tmp_path, capsys):
    rc = train(cls_recipe, "-o", "data.labels=[pos, neutral]")
    err = assert_user_error(capsys, rc, "label 'neg' is not in the label set", "data.train")
    assert ".jsonl:" in err  # names the row


def test_output_dir_holding_a_run_is_refused(cls_recipe, tmp_path, capsys):
    assert train(cls_recipe, "-o", "train.max_steps=1") == 0
    before = (tmp_path / "run" / "summary.json").read_text()
    rc = train(cls_recipe, "-o", "train.max_steps=1")
    assert_user_error(capsys, rc, "already holds a run", "--resume", "--overwrite")
    assert (tmp_path / "run" / "summary.json").read_text() == before
    assert train(cls_recipe, "-o", "train.max_steps=2", "--overwrite") == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2


def test_bad_recipe_value_through_train(cls_recipe, tmp_path, capsys):
    rc = train(cls_recipe, "-o", "train.precision=fp8")
    assert_user_error(capsys, rc, "train.precision", "'bf16'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["validate", "{r}", "-o", "train.lr=-1"], "train.lr"),
        (["validate", "{r}", "-o", "nosuch.key=1"], "nosuch"),
        (["train", "{r}", "--resume", "/does/not/exist"], "no complete checkpoint"),
    ],
)
def test_cli_subprocess_exit_2_without_traceback(cls_recipe, args, needle):
    cmd = [sys.executable, "-m", "launcher.cli.main", *[a.format(r=cls_recipe) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_bad_adapter_target_is_a_user_error_and_keeps_the_old_run(cls_recipe, tmp_path, capsys):
    assert train(cls_recipe, "-o", "train.max_steps=1") == 0
    before = (tmp_path / "run" / "summary.json").read_text()
    rc = train(
        cls_recipe,
        "--overwrite",
        "-o",
        "adapter.type=lora",
        "-o",
        "adapter.target_modules=[nope_proj]",
    )
    assert_user_error(capsys, rc, "adapter.target_modules", "nope_proj")
    assert (
        tmp_path / "run" / "summary.json"
    ).read_text() == before  # --overwrite waited for the checks


def test_csv_with_bom_and_short_rows(cls_recipe, tmp_path, capsys):
    good = tmp_path / "bom.csv"
    good.write_text(
        "\ufefftext,label\n" + "".join(f"good movie {i},pos\nbad movie {i},neg\n" for i in range(8))
    )
    assert train(cls_recipe, "-o", f"data.train={good}", "-o", "train.max_steps=1") == 0
    short = tmp_path / "short.csv"
    short.write_text("text,label\ngood movie,pos\nbad movie,neg\nno label here\n")
    rc = train(cls_recipe, "-o", f"data.train={short}", "--overwrite")
    assert_user_error(capsys, rc, f"{short}:4", "missing field 'label'")


def test_non_utf8_file(cls_recipe, tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"text": "caf\xe9", "label": "pos"}\n'.encode("latin-1"))
    rc = train(cls_recipe, "-o", f"data.train={bad}")
    assert_user_error(capsys, rc, "not UTF-8", "latin1.jsonl")


@pytest.mark.parametrize("label", [None, ["pos"], True, ""])
def test_label_of_the_wrong_kind(cls_recipe, tmp_path, capsys, label):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"text": "good", "label": "pos"})
        + "\n"
        + json.dumps({"text": "bad", "label": label})
        + "\n"
    )
    rc = train(cls_recipe, "-o", f"data.train={bad}", "-o", "data.labels=[pos, neg]")
    assert_user_error(capsys, rc, f"{bad}:2", "must be a non-empty string or an integer")


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.early_stopping={metric: accuracy}", "train.early_stopping"),
        ("data.prompt_template='{instruction} {oops}'", "data.prompt_template"),
    ],
)
def test_recipe_rules_through_validate(cls_recipe, capsys, override, key):
    rc = main(["validate", str(cls_recipe), "-o", "train.eval_every=null", "-o", override])
    assert_user_error(capsys, rc, key)


def test_l2sp_with_lora_is_refused(cls_recipe, capsys):
    rc = main(["validate", str(cls_recipe), "-o", "adapter.type=lora", "-o", "train.l2sp=0.1"])
    assert_user_error(capsys, rc, "train.l2sp", "frozen")
