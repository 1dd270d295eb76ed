"""Exact resume: a run stopped at step k and resumed logs the same losses as one that never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.train.checkpoint import COMPLETE, complete_checkpoints
from launcher.train.report import read_metrics

STEPS = ["-o", "train.max_steps=9", "-o", "train.log_every=1", "-o", "train.eval_every=3"]


def losses(run: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"
    }


def evals(run: Path) -> dict[int, float]:
    return {
        r["step"]: r["eval_loss"]
        for r in read_metrics(run / "metrics.jsonl")
        if r["kind"] == "eval"
    }


@pytest.mark.parametrize("accumulation", ["train.grad_accum=2", "train.global_batch_size=8"])
def test_resume_from_checkpoint_reproduces_losses(cls_recipe, tmp_path, accumulation):
    # dropout on, grad accumulation on (set directly, or derived from the global batch), so
    # RNG and data position both matter
    common = [*STEPS, "-o", accumulation, "-o", "train.micro_batch_size=4"]
    a = tmp_path / "a"
    assert (
        main(
            [
                "train",
                str(cls_recipe),
                *common,
                "-o",
                f"output.dir={a}",
                "-o",
                "train.save_every=4",
                "-o",
                "train.keep_last=5",
            ]
        )
        == 0
    )
    assert [p.name for p in complete_checkpoints(a)] == [
        "step-00000004",
        "step-00000008",
        "step-00000009",
    ]
    ckpt = a / "checkpoints" / "step-00000004"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4

    b = tmp_path / "b"
    assert (
        main(["train", str(cls_recipe), *common, "-o", f"output.dir={b}", "--resume", str(ckpt)])
        == 0
    )
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(5, 10))  # only the steps it ran itself
    assert [lb[s] for s in range(5, 10)] == [la[s] for s in range(5, 10)]  # bit for bit
    assert evals(b) == {s: v for s, v in evals(a).items() if s > 4}


def test_resume_auto_continues_the_same_folder(cls_recipe, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(cls_recipe),
                *STEPS,
                "-o",
                "train.save_every=3",
                "-o",
                "train.max_steps=6",
            ]
        )
        == 0
    )
    # more steps requested on resume is a different schedule; resume with the same one instead:
    # remove the final checkpoint and resume from step 3
    for p in complete_checkpoints(run)[1:]:
        import shutil

        shutil.rmtree(p)
    before = losses(run)
    assert (
        main(
            [
                "train",
                str(cls_recipe),
                *STEPS,
                "-o",
                "train.save_every=3",
                "-o",
                "train.max_steps=6",
                "--resume",
                "auto",
            ]
        )
        == 0
    )
    after = losses(run)
    assert after == before  # metrics.jsonl was cut back to step 3 and re-grown identically
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-00000003") and summary["steps"] == 6


def test_incomplete_checkpoint_is_never_resumed(cls_recipe, tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(cls_recipe),
                *STEPS,
                "-o",
                "train.save_every=3",
                "-o",
                "train.max_steps=3",
            ]
        )
        == 0
    )
    (run / "checkpoints" / "step-00000003" / COMPLETE).unlink()  # as if killed mid-save
    assert complete_checkpoints(run) == []


def test_sigterm_saves_checkpoint_and_resume_finishes(cls_recipe, tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "launcher.cli.main",
        "train",
        str(cls_recipe),
        "-o",
        "train.max_steps=3000",
        "-o",
        "train.log_every=1",
        "-o",
        "train.eval_every=null",
        "-o",
        "train.micro_batch_size=2",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, TQDM_DISABLE="1"),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert (run / "metrics.jsonl").exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    (ckpt,) = complete_checkpoints(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and 0 < summary["steps"] < 3000
    assert ckpt.name == f"step-{summary['steps']:08d}"


def test_resume_auto_never_wipes_a_finished_run_without_checkpoints(cls_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(cls_recipe), "-o", "train.max_steps=2"]) == 0
    rc = main(["train", str(cls_recipe), "-o", "train.max_steps=2", "--resume", "auto"])
    assert rc == 2 and "no complete checkpoint" in capsys.readouterr().err
    assert (run / "model").is_dir() and (run / "summary.json").is_file()


def test_resume_refuses_a_checkpoint_of_another_run(cls_recipe, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(cls_recipe), *STEPS, "-o", "train.save_every=3"]) == 0
    rc = main(
        [
            "train",
            str(cls_recipe),
            *STEPS,
            "-o",
            "train.save_every=3",
            "-o",
            "train.micro_batch_size=4",
            "--resume",
            "auto",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "micro_batch_size: checkpoint 8, now 4" in err
    assert len(complete_checkpoints(run)) == 2  # untouched


def test_resuming_an_older_checkpoint_drops_the_abandoned_newer_ones(cls_recipe, tmp_path):
    run = tmp_path / "run"
    saving = ["-o", "train.save_every=3", "-o", "train.keep_last=3"]
    assert main(["train", str(cls_recipe), *STEPS, *saving]) == 0
    names = [c.name for c in complete_checkpoints(run)]
    assert names == ["step-00000003", "step-00000006", "step-00000009"]
    first = losses(run)
    # resume from step 3 and save nothing more: steps 6 and 9 were another timeline
    older = str(run / "checkpoints" / "step-00000003")
    assert (
        main(["train", str(cls_recipe), *STEPS, "-o", "train.save_every=null", "--resume", older])
        == 0
    )
    assert [c.name for c in complete_checkpoints(run)] == ["step-00000003"]
    assert losses(run) == first  # re-grown identically


def test_a_line_cut_short_by_a_kill_is_ignored(tmp_path):
    from launcher.train.report import read_metrics

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "tra')
    assert read_metrics(p) == [{"kind": "train", "step": 1, "loss": 1.0}]


def test_resuming_another_runs_checkpoint_into_a_used_folder_is_refused(
    cls_recipe, tmp_path, capsys
):
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        main(
            ["train", str(cls_recipe), *STEPS, "-o", f"output.dir={a}", "-o", "train.save_every=3"]
        )
        == 0
    )
    assert main(["train", str(cls_recipe), *STEPS, "-o", f"output.dir={b}"]) == 0
    rc = main(["train", str(cls_recipe), *STEPS, "-o", f"output.dir={b}", "--resume", str(a)])
    assert rc == 2 and "belongs to another one" in capsys.readouterr().err
