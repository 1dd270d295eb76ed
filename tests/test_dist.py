"""Real multi-process training on CPU (gloo): every strategy against the same reference.

The reference is one process with the same global batch (accumulation 2); DDP, ZeRO-2,
ZeRO-3, ZeRO-3 offload and FSDP2 on 2 processes must log the same losses, save the same
weights, and a ZeRO-3 checkpoint must resume into the same loss sequence. Saved weights
are compared with DeepSpeed's own consolidation (zero_to_fp32) and a LoRA adapter trained
under ZeRO-3 with the DDP one.

Each launch costs ~25 s (two fresh Python processes importing torch, transformers and
DeepSpeed on 2 cores), so runs are shared between tests through module fixtures.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.cli.main import main

pytestmark = pytest.mark.dist
HF_HOME = Path(__file__).resolve().parent.parent / ".cache" / "poisoned-hf-home"
(HF_HOME / "accelerate").mkdir(parents=True, exist_ok=True)

STEPS = 6
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run: Path) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


POISON = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_CPU
num_processes: 7
use_cpu: true
mixed_precision: fp16
"""
(HF_HOME / "accelerate" / "default_config.yaml").write_text(POISON)


def ftl(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    # every launch runs with a poisoned default accelerate config: ftl must never read it
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HOME": str(HF_HOME)}
    return subprocess.Popen(
        [sys.executable, "-m", "launcher.cli.main", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-6000:]
    return out


def launch(recipe: Path, out: Path, *overrides: str, procs: int = 2, extra=()) -> Path:
    args = ["launch", str(recipe), "--num-processes", str(procs)]
    args += ["--main-process-port", str(free_port()), *extra]
    for o in (f"output.dir={out}", *overrides):
        args += ["-o", o]
    finish(ftl(*args))
    return out


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    out = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def assert_same_weights(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].numel() > 0, k
        assert (a[k].float() - b[k].float()).abs().max().item() <= tol, k


@pytest.fixture(scope="module")
def dist_recipe(tmp_path_factory, tiny_llama, chat_data) -> Path:
    d = tmp_path_factory.mktemp("dist")
    path = d / "recipe.yaml"
    path.write_text(
        f"""\
task: causal_lm
model:
  name_or_path: {tiny_llama}
data:
  format: chat
  train: {chat_data["train"]}
  eval: {chat_data["eval"]}
  max_length: 64
train:
  max_steps: {STEPS}
  micro_batch_size: 4
  global_batch_size: 8
  lr: 1.0e-3
  warmup_steps: 2
  log_every: 1
  save_every: 3
  keep_last: 2
  fast_dropout: false
distributed:
  strategy: ddp
output:
  dir: {d / "unused"}
"""
    )
    return path


@pytest.fixture(scope="module")
def single(dist_recipe, tmp_path_factory) -> Path:
    """The reference: one process, accumulation 2, same global batch of 8."""
    out = tmp_path_factory.mktemp("single") / "run"
    rc = main(
        ["train", str(dist_recipe), "-o", "distributed.strategy=none", "-o", f"output.dir={out}"]
    )
    assert rc == 0
    rec = json.loads((out / "distributed.json").read_text())
    assert (rec["world_size"], rec["grad_accum"], rec["global_batch"]) == (1, 2, 8)
    return out


@pytest.fixture(scope="module")
def ddp(dist_recipe, tmp_path_factory) -> Path:
    return launch(dist_recipe, tmp_path_factory.mktemp("ddp") / "run")


@pytest.fixture(scope="module")
def zero3(dist_recipe, tmp_path_factory, deepspeed_ops) -> Path:
    return launch(
        dist_recipe, tmp_path_factory.mktemp("zero3") / "run", "distributed.strategy=zero3"
    )


def test_ddp_two_processes_equal_one_process_with_accumulation(single, ddp):
    rec = json.loads((ddp / "distributed.json").read_text())
    assert rec["distributed_type"] == "MULTI_CPU" and rec["world_size"] == 2
    assert (rec["grad_accum"], rec["global_batch"]) == (1, 8)
    assert rec["accounting"] == "global batch 8 = micro batch 4 x grad accumulation 1 x world 2"
    a, b = losses(single), losses(ddp)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL
    assert a[-1] < a[0]  # it learned something
    assert_same_weights(weights(single / "model"), weights(ddp / "model"))


@pytest.mark.parametrize("strategy", ["zero2", "zero3_offload", "fsdp"])
def test_sharded_strategies_match_ddp(strategy, dist_recipe, ddp, tmp_path, request):
    if strategy.startswith("zero"):
        request.getfixturevalue("deepspeed_ops")
    out = launch(dist_recipe, tmp_path / "run", f"distributed.strategy={strategy}")
    rec = json.loads((out / "distributed.json").read_text())
    assert rec["world_size"] == 2
    assert rec["distributed_type"] == ("FSDP" if strategy == "fsdp" else "DEEPSPEED")
    if strategy == "fsdp":  # one unit per decoder layer, from the model's own declaration
        assert "FSDPLlamaDecoderLayer" in rec["fsdp_units"]
    if strategy == "zero3_offload":
        zero = rec["deepspeed_config"]["zero_optimization"]
        assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
        assert rec["deepspeed_config"]["optimizer"]["params"]["lr"] == 1e-3
    a, b = losses(ddp), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL
    assert_same_weights(weights(ddp / "model"), weights(out / "model"))
    check_conversion(out, "fsdp" if strategy == "fsdp" else "zero", tmp_path)


def reference_state(ckpt: Path, kind: str) -> dict:
    """What the strategy's own tools say the checkpoint holds."""
    import contextlib

    import torch

    if kind == "zero":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))
    return torch.load(ckpt / "pytorch_model_fsdp.bin", weights_only=True)


def check_conversion(run: Path, kind: str, tmp_path: Path) -> None:
    """ftl convert: a mid-run checkpoint is bit-identical to the strategy's own
    consolidation (DeepSpeed's zero_to_fp32, the FSDP full state dict); the run folder
    (its newest checkpoint, the last step) equals the model the run saved."""
    import torch

    mid = run / "checkpoints" / "step-00000003"
    assert main(["convert", kind, str(mid), "--out", str(tmp_path / "mid")]) == 0
    got, want = weights(tmp_path / "mid"), reference_state(mid, kind)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    report = json.loads((tmp_path / "mid" / "conversion.json").read_text())
    assert report["parameters"] == sum(v.numel() for v in want.values())
    assert main(["convert", kind, str(run), "--out", str(tmp_path / "last")]) == 0
    final, last = weights(run / "model"), weights(tmp_path / "last")
    assert all(torch.equal(final[k], last[k]) for k in final)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "last")  # a complete HF folder


def test_zero3_matches_ddp_and_saves_a_complete_model(ddp, zero3):
    rec = json.loads((zero3 / "distributed.json").read_text())
    assert rec["distributed_type"] == "DEEPSPEED"
    assert rec["deepspeed_config"]["zero_optimization"]["stage"] == 3
    assert rec["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 4
    assert rec["deepspeed_config"]["gradient_accumulation_steps"] == 1
    zero = rec["deepspeed_config"]["zero_optimization"]
    assert zero["reduce_bucket_size"] == 32 * 32  # filled from the hidden size by accelerate
    assert zero["stage3_max_live_parameters"] == zero["sub_group_size"] == 1_000_000  # by ftl
    a, b = losses(ddp), losses(zero3)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL
    saved = weights(zero3 / "model")
    assert_same_weights(weights(ddp / "model"), saved)

    # a complete HF model: loads strictly, nothing empty, same logits as the DDP one
    import torch
    from transformers import AutoModelForCausalLM

    m1 = AutoModelForCausalLM.from_pretrained(zero3 / "model")
    m2 = AutoModelForCausalLM.from_pretrained(ddp / "model")
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(m1(ids).logits, m2(ids).logits, atol=1e-4)


def test_zero3_checkpoint_consolidates_like_deepspeeds_zero_to_fp32(zero3):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = zero3 / "checkpoints" / f"step-{STEPS:08d}"
    assert (ckpt / "COMPLETE").is_file()
    ref = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model")
    saved = weights(zero3 / "model")
    for k, v in saved.items():
        key = k if k in ref else next(r for r in ref if r.endswith(k))
        assert torch.equal(ref[key].float(), v.float()), k


def test_zero3_resume_continues_the_loss_sequence(dist_recipe, zero3, tmp_path, deepspeed_ops):
    ckpt = zero3 / "checkpoints" / f"step-{3:08d}"
    assert (ckpt / "COMPLETE").is_file()
    out = launch(
        dist_recipe,
        tmp_path / "resumed",
        "distributed.strategy=zero3",
        extra=["--resume", str(ckpt)],
    )
    a, b = losses(zero3), losses(out)
    assert len(b) == STEPS - 3
    assert max(abs(x - y) for x, y in zip(a[3:], b, strict=True)) <= TOL


@pytest.fixture(scope="module")
def qlora_args(quant_llama) -> list[str]:
    """QLoRA on the tiny Llama whose widths bitsandbytes quantizes on every backend."""
    return [
        f"model.name_or_path={quant_llama}",
        "adapter.type=lora",
        "adapter.r=4",
        "adapter.alpha=8",
        "adapter.dropout=0.0",
        "quant.bits=4",
        "quant.compute_dtype=float32",
    ]


@pytest.fixture(scope="module")
def qlora_single(dist_recipe, tmp_path_factory, qlora_args) -> Path:
    """QLoRA reference: one process, accumulation 2, packed weights in uint8."""
    out = tmp_path_factory.mktemp("qlora-single") / "run"
    args = ["train", str(dist_recipe), "-o", "distributed.strategy=none", "-o", f"output.dir={out}"]
    for o in qlora_args:
        args += ["-o", o]
    assert main(args) == 0
    return out


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp"])
def test_qlora_under_ddp_zero3_and_fsdp_equals_one_process(
    strategy, dist_recipe, qlora_single, tmp_path, request, qlora_args
):
    if strategy == "zero3":
        request.getfixturevalue("deepspeed_ops")
    out = launch(dist_recipe, tmp_path / "run", f"distributed.strategy={strategy}", *qlora_args)
    a, b = losses(qlora_single), losses(out)
    assert len(a) == len(b) == STEPS and a[-1] < a[0]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL
    ref, got = weights(qlora_single / "model"), weights(out / "model")
    assert got and all("lora_" in k for k in got)  # a complete adapter, never empty
    assert_same_weights(ref, got, tol=1e-6)
    quant = json.loads((out / "summary.json").read_text())["quantization"]
    assert quant["storage"] == ("uint8" if strategy == "ddp" else "float32"), quant
    held = json.loads((out / "distributed.json").read_text())["weight_bytes"]
    if strategy == "ddp":  # every rank holds the whole quantized base
        assert held["this_rank"] == held["whole"]
    else:  # the packed 4-bit weights are sharded too (stored as float32 here)
        assert held["this_rank"] <= 0.55 * held["whole"], held


def test_qlora_under_zero3_in_bf16_stores_weights_that_survive_the_cast(
    dist_recipe, tmp_path, deepspeed_ops, qlora_args
):
    """ZeRO-3 casts float parameters to bf16; auto storage packs the 4-bit weights in bf16
    (float32 storage breaks here, which `ftl validate` refuses)."""
    bf16 = [*qlora_args[:-1], "quant.compute_dtype=bfloat16", "train.precision=bf16"]
    ref = tmp_path / "single"
    args = ["train", str(dist_recipe), "-o", "distributed.strategy=none", "-o", f"output.dir={ref}"]
    for o in bf16:
        args += ["-o", o]
    assert main(args) == 0
    out = launch(dist_recipe, tmp_path / "zero3", "distributed.strategy=zero3", *bf16)
    assert json.loads((out / "summary.json").read_text())["quantization"]["storage"] == "bfloat16"
    a, b = losses(ref), losses(out)
    assert len(b) == STEPS and max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 5e-3


def test_lora_under_zero3_is_complete_and_equals_ddp(dist_recipe, tmp_path, deepspeed_ops):
    lora = ["adapter.type=lora", "adapter.r=4", "adapter.alpha=8", "adapter.dropout=0.0"]
    runs = {}
    for strategy in ("ddp", "zero3"):
        runs[strategy] = launch(
            dist_recipe, tmp_path / strategy, f"distributed.strategy={strategy}", *lora
        )
    a, b = weights(runs["ddp"] / "model"), weights(runs["zero3"] / "model")
    assert a and all("lora_" in k for k in a)  # adapter weights only
    assert_same_weights(a, b, tol=1e-6)
    cfg = json.loads((runs["zero3"] / "model" / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    # and they really trained: B matrices start at zero
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)
    # ftl convert --adapter-only: the last checkpoint is the adapter the run saved, and it
    # loads with PEFT; a full conversion of an adapter run is refused with the way out
    out = tmp_path / "adapter"
    assert main(["convert", "zero", str(runs["zero3"]), "--out", str(out), "--adapter-only"]) == 0
    import torch

    got = weights(out)
    assert got.keys() == b.keys() and all(torch.equal(got[k], b[k]) for k in b)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    assert main(["convert", "zero", str(runs["zero3"]), "--out", str(tmp_path / "full")]) == 2


# ZeRO-3 over two machines runs in tests/test_slurm.py, on the SLURM cluster
@pytest.mark.parametrize("strategy", ["ddp"])
def test_two_machines_on_loopback_train_as_one_world(strategy, dist_recipe, ddp, tmp_path, request):
    if strategy == "zero3":
        request.getfixturevalue("deepspeed_ops")
    port = str(free_port())
    out = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        procs.append(
            ftl(
                "launch",
                str(dist_recipe),
                "--num-processes=1",
                "--num-machines=2",
                f"--machine-rank={rank}",
                "--main-process-ip=127.0.0.1",
                f"--main-process-port={port}",
                "-o",
                f"output.dir={out}",
                "-o",
                f"distributed.strategy={strategy}",
            )
        )
        time.sleep(0.5)  # machine 0 checks that its port is free before binding it
    for p in procs:
        finish(p)
    rec = json.loads((out / "distributed.json").read_text())
    assert rec["world_size"] == 2
    a, b = losses(ddp), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL


def test_sigterm_to_ftl_launch_checkpoints_every_rank_and_exits_3(dist_recipe, tmp_path):
    out = tmp_path / "run"
    proc = ftl(
        "launch",
        str(dist_recipe),
        "--num-processes=2",
        f"--main-process-port={free_port()}",
        "-o",
        f"output.dir={out}",
        "-o",
        "train.max_steps=100000",
        "-o",
        "train.save_every=null",
    )
    deadline = time.time() + 180
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    assert (out / "metrics.jsonl").exists(), proc.communicate()[0][-4000:]
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=180)
    assert proc.returncode == 3, text[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and 0 < summary["steps"] < 100000
    ckpt = out / "checkpoints" / f"step-{summary['steps']:08d}"
    assert (ckpt / "COMPLETE").is_file()
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


def test_a_user_error_inside_the_ranks_is_one_message_and_exit_2(dist_recipe, tmp_path):
    out = tmp_path / "run"
    proc = ftl(
        "launch",
        str(dist_recipe),
        "--num-processes=2",
        f"--main-process-port={free_port()}",
        "-o",
        f"output.dir={out}",
        "-o",
        "adapter.type=lora",
        "-o",
        "adapter.target_modules=[nope_proj]",
    )
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, text[-4000:]
    assert "adapter.target_modules: nope_proj matches no module" in text
    # torchrun's ChildFailedError traceback about it is dropped: the ranks explained it
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-4000:]
    assert not out.exists()


def test_one_process_zero3_offload_still_runs_deepspeed(dist_recipe, ddp, tmp_path, deepspeed_ops):
    # one GPU + ZeRO-Offload is the reason offload exists: one process must not drop it
    out = launch(dist_recipe, tmp_path / "run", "distributed.strategy=zero3_offload", procs=1)
    rec = json.loads((out / "distributed.json").read_text())
    assert (rec["distributed_type"], rec["world_size"], rec["grad_accum"]) == ("DEEPSPEED", 1, 2)
    a, b = losses(ddp), losses(out)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= TOL


def test_seq2seq_eval_under_ddp_equals_one_process_scoring(tmp_path):
    """Generation-based eval on 2 processes (rows of different lengths padded across
    processes, 13 eval rows so the last batch is uneven): loss, BLEU and chrF equal the
    saved model scored in this process, row by row, with sacreBLEU."""
    import random

    import make_tiny
    import sacrebleu
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    words = ["a", "b", "c", "d", "e", "f", "g", "h"]
    rng = random.Random(0)
    rows = []
    for _ in range(40):
        src = [rng.choice(words[:4]) for _ in range(rng.randint(1, 6))]
        rows.append({"source": " ".join(src), "target": " ".join(chr(ord(w) + 4) for w in src)})
    make_tiny.make_seq2seq(tmp_path / "bart", "bart", words)
    make_tiny.write_jsonl(tmp_path / "train.jsonl", rows[:27])
    make_tiny.write_jsonl(tmp_path / "eval.jsonl", rows[27:])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
task: seq2seq
model: {{name_or_path: {tmp_path / "bart"}}}
data: {{format: translation, train: {tmp_path / "train.jsonl"},
        eval: {tmp_path / "eval.jsonl"}, max_length: 16, max_target_length: 8}}
train: {{max_steps: 6, micro_batch_size: 4, eval_batch_size: 3, lr: 5.0e-3,
         generation: {{max_new_tokens: 8}}}}
distributed: {{strategy: ddp}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    run = launch(recipe, tmp_path / "run")
    final = json.loads((run / "summary.json").read_text())["final_eval"]

    tok = AutoTokenizer.from_pretrained(run / "model")
    model = AutoModelForSeq2SeqLM.from_pretrained(run / "model").eval()
    hyps, refs, loss_sum, n = [], [], 0.0, 0
    with torch.no_grad():
        for r in rows[27:]:
            enc = tok([r["source"]], return_tensors="pt")
            labels = torch.tensor([tok(text_target=r["target"])["input_ids"]])
            loss_sum += model(**enc, labels=labels).loss.item() * labels.numel()
            n += labels.numel()
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, num_beams=1)
            hyps.append(tok.decode(out[0], skip_special_tokens=True).strip())
            refs.append(r["target"])
    assert final["eval_loss"] == pytest.approx(loss_sum / n, abs=1e-5)
    assert final["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert final["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    # targets of 1-6 words: each rank's label rows differ in width and were padded to gather
    assert len({len(r.split()) for r in refs}) > 3


@pytest.fixture(scope="module")
def vlm_recipe(tmp_path_factory) -> Path:
    import make_tiny

    d = tmp_path_factory.mktemp("vlm")
    make_tiny.make_vlm(d / "qwen2_vl", "qwen2_vl")
    make_tiny.write_jsonl(d / "train.jsonl", make_tiny.caption_rows(d / "img", 24))
    path = d / "recipe.yaml"
    path.write_text(
        f"""\
task: vision_language
model: {{name_or_path: {d / "qwen2_vl"}}}
data: {{format: vision_chat, train: {d / "train.jsonl"}, max_length: 128}}
train: {{max_steps: 4, micro_batch_size: 2, global_batch_size: 4, lr: 3.0e-3, log_every: 1,
         fast_dropout: false}}
distributed: {{strategy: ddp}}
output: {{dir: {d / "unused"}}}
"""
    )
    return path


@pytest.fixture(scope="module")
def vlm_single(vlm_recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vlm-single") / "run"
    args = ["train", str(vlm_recipe), "-o", "distributed.strategy=none", "-o", f"output.dir={out}"]
    assert main(args) == 0
    return out


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_vlm_on_two_processes_equals_one_process(
    strategy, vlm_recipe, vlm_single, tmp_path, request
):
    """Qwen2-VL (images of different sizes, so different image-token counts per rank)
    under DDP and ZeRO-3 logs the losses of one process with accumulation 2, and saves
    the same weights; the frozen vision tower is saved unchanged."""
    if strategy == "zero3":
        request.getfixturevalue("deepspeed_ops")
    single = vlm_single
    run = launch(vlm_recipe, tmp_path / "run", f"distributed.strategy={strategy}")
    assert losses(run) == pytest.approx(losses(single), abs=TOL)
    assert json.loads((run / "distributed.json").read_text())["world_size"] == 2
    a, b = weights(single / "model"), weights(run / "model")
    # full fine-tuning at lr 3e-3 under Adam: an element whose gradient is ~0 moves by
    # m/sqrt(v), which float reordering (ZeRO-3's partitioned reduction) shifts. Measured:
    # every tensor within 3e-7 except layer 0's gate_proj, at 1.1e-5 (with full logits:
    # 2.8e-6 there); a wrong gradient moves weights by ~lr = 3e-3
    assert_same_weights(a, b, tol=3e-5 if strategy == "zero3" else 1e-5)
    base = weights(vlm_recipe.parent / "qwen2_vl")
    vision = [k for k in base if "visual." in k and "merger." not in k]
    assert vision and all(torch_equal(base[k], b[k]) for k in vision)
    assert not all(torch_equal(base[k], b[k]) for k in base if "merger." in k)  # trained


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x, y)


def test_each_rank_trains_on_its_own_shards(tmp_path, dist_recipe, chat_data, capsys):
    """A shard folder under DDP: rank r reads shards r, r+2, ... (recorded per rank in the
    summary, with example counts that equal those shards' rows); both ranks run the same
    number of steps, and eval_split is refused in this mode."""
    shards = tmp_path / "shards"
    assert main(["shard", str(chat_data["train"]), "--num-shards", "4", "--out", str(shards)]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    run = launch(dist_recipe, tmp_path / "run", f"data.train={shards}", "train.max_steps=3")
    data = json.loads((run / "summary.json").read_text())["data"]
    files = [s["file"] for s in manifest["shards"]]
    assert data["shards_by_rank"] == [files[0::2], files[1::2]]
    rows = {s["file"]: s["rows"] for s in manifest["shards"]}
    assert data["examples_by_rank"] == [sum(rows[f] for f in files[r::2]) for r in range(2)]
    assert len(losses(run)) == 3

    # streamed from the same shards under DDP (each rank its own shards), mixed with the
    # JSONL file: both ranks run the same 3 steps and the summary reports the mixture
    streamed = launch(
        dist_recipe, tmp_path / "streamed", f"data.train={shards}", "train.max_steps=3",
        "data.streaming=true", f"data.mix=[{{path: {chat_data['train']}, weight: 0.5}}]",
    )  # fmt: skip
    data = json.loads((streamed / "summary.json").read_text())["data"]
    assert data["streaming"] and len(losses(streamed)) == 3
    # rank 0's share: shards 0 and 2, and lines 1, 3, 5, ... of the file
    assert data["mixture"][0]["rows"] == sum(rows[f] for f in files[0::2])

    # refused by ftl launch itself, before any process starts
    args = ["launch", str(dist_recipe), "--num-processes", "2", "-o", f"data.train={shards}"]
    args += ["-o", "data.eval=null", "-o", "data.eval_split=0.1"]
    assert main([*args, "-o", f"output.dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert "data.eval_split" in err and "data.shards_per_rank" in err and "Traceback" not in err
    assert "ftl launch: ddp" not in err and not (tmp_path / "bad").exists()
