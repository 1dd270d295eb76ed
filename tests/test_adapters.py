"""Adapters and quantized bases on CPU: QLoRA nf4 and 8-bit, DoRA, rsLoRA, added tokens.

Every run trains through `Trainer` in this process, so the test holds the model exactly
as training left it. The saved adapter is then loaded the way a user would (plain
transformers + PEFT, the same BitsAndBytesConfig) and must give the same logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import make_tiny
import pytest
import torch

from launcher import compat
from launcher.cli.main import main
from launcher.recipe import load_recipe
from launcher.train.loop import Trainer
from launcher.train.report import read_metrics

pytest.importorskip("bitsandbytes")

PROBE = "user: say blue please\nassistant:"


def train_in_process(recipe: Path, *overrides: str) -> tuple[Trainer, dict]:
    trainer = Trainer(load_recipe(recipe, list(overrides)))
    summary = trainer.fit()
    return trainer, summary


def probe_logits(model, tok) -> torch.Tensor:
    batch = tok([PROBE, "blue blue"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def load_with_peft(base_dir: Path, adapter: Path, quant: dict | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    kw = {}
    if quant:
        kw = {"quantization_config": BitsAndBytesConfig(**quant), "device_map": {"": "cpu"}}
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kw)
    # bitsandbytes' own CPU inference on AVX512-BF16 repacks 4-bit weights and computes in
    # bfloat16; the reference keeps the float32 path training used (launcher/compat.py)
    compat.keep_4bit_weights_as_trained(base)
    tok = AutoTokenizer.from_pretrained(adapter)
    if len(tok) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tok))  # what a user does for a grown vocabulary
    return PeftModel.from_pretrained(base, adapter).eval(), tok


def evals(run: Path) -> list[float]:
    return [r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]


QUANT = {
    "nf4": (
        ["quant.bits=4", "quant.type=nf4", "quant.compute_dtype=float32"],
        {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": torch.float32,
        },
    ),
    "8bit": (["quant.bits=8"], {"load_in_8bit": True}),
}


@pytest.mark.parametrize("kind", list(QUANT))
def test_quantized_lora_learns_and_reloads_with_peft(kind, chat_recipe, tmp_path, quant_llama):
    overrides, bnb = QUANT[kind]
    trainer, summary = train_in_process(
        chat_recipe,
        *overrides,
        f"model.name_or_path={quant_llama}",
        "train.eval_at_start=true",
        "model.gradient_checkpointing=true",
    )
    run = tmp_path / "chat-run"
    losses = evals(run)
    assert summary["status"] == "completed"
    assert summary["quantization"]["bits"] == (4 if kind == "nf4" else 8)
    if kind == "nf4":  # one process: bitsandbytes' own uint8 storage
        assert summary["quantization"]["storage"] == "uint8"
    assert losses[-1] < losses[0] - 0.5, losses  # it learns, through frozen quantized weights
    model = trainer.acc.unwrap_model(trainer.model)
    quantized = {type(m).__name__ for m in model.modules()} & {"Linear4bit", "Linear8bitLt"}
    assert quantized == {"Linear4bit" if kind == "nf4" else "Linear8bitLt"}
    trained = probe_logits(model, trainer.tokenizer)

    reloaded, tok = load_with_peft(quant_llama, run / "model", bnb)
    assert torch.allclose(probe_logits(reloaded, tok), trained, atol=1e-5)


@pytest.mark.parametrize(
    "variant",
    [
        ["adapter.type=dora"],
        ["adapter.rslora=true"],
        ["adapter.type=dora", "quant.bits=4", "quant.compute_dtype=float32"],
    ],
    ids=["dora", "rslora", "qdora"],
)
def test_dora_and_rslora_train_and_reload(variant, chat_recipe, tmp_path, tiny_llama, quant_llama):
    base = quant_llama if "quant.bits=4" in variant else tiny_llama
    trainer, _ = train_in_process(
        chat_recipe, *variant, f"model.name_or_path={base}", "train.eval_at_start=true"
    )
    run = tmp_path / "chat-run"
    losses = evals(run)
    assert losses[-1] < losses[0] - 0.5, losses
    config = json.loads((run / "model" / "adapter_config.json").read_text())
    assert config["use_dora"] is ("adapter.type=dora" in variant)
    assert config["use_rslora"] is ("adapter.rslora=true" in variant)
    from safetensors.torch import load_file

    saved = load_file(run / "model" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in saved) is config["use_dora"]

    trained = probe_logits(trainer.acc.unwrap_model(trainer.model), trainer.tokenizer)
    quant = QUANT["nf4"][1] if "quant.bits=4" in variant else None
    reloaded, tok = load_with_peft(base, run / "model", quant)
    assert torch.allclose(probe_logits(reloaded, tok), trained, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_added_tokens_are_trained_and_saved_with_the_adapter(tie, tmp_path, chat_data):
    base = tmp_path / "llama"
    make_tiny.make_llama(base, tie=tie)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""\
model:
  name_or_path: {base}
  add_tokens: ["<tool_call>", "</tool_call>"]
data: {{format: chat, train: {chat_data["train"]}, max_length: 64}}
adapter: {{type: lora, r: 4, alpha: 8, dropout: 0.0}}
train: {{max_steps: 6, micro_batch_size: 8, lr: 1.0e-2, log_every: 1}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    trainer, _ = train_in_process(recipe)
    tok = trainer.tokenizer
    new_ids = tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    from transformers import AutoTokenizer

    old_vocab = len(AutoTokenizer.from_pretrained(base))
    assert new_ids == [old_vocab, old_vocab + 1]

    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "model" / "adapter_model.safetensors")
    emb = [k for k in saved if "embed_tokens" in k]
    assert emb and all(saved[k].shape[0] == old_vocab + 2 for k in emb), emb
    if not tie:
        head = [k for k in saved if "lm_head" in k]
        assert head and all(saved[k].shape[0] == old_vocab + 2 for k in head)

    model = trainer.acc.unwrap_model(trainer.model)
    if tie:  # still one matrix after training
        assert model.get_input_embeddings().weight.data_ptr() == (
            model.get_output_embeddings().weight.data_ptr()
        )
    trained = probe_logits(model, tok)
    reloaded, tok2 = load_with_peft(base, tmp_path / "run" / "model")
    assert len(tok2) == old_vocab + 2
    assert torch.allclose(probe_logits(reloaded, tok2), trained, atol=1e-5)


def test_regex_target_modules_wrap_only_what_matches(chat_recipe, tmp_path):
    rc = main(
        [
            "train",
            str(chat_recipe),
            "-o",
            r"adapter.target_modules=.*\.(q_proj|v_proj)",
            "-o",
            "train.max_steps=2",
        ]
    )
    assert rc == 0
    config = json.loads((tmp_path / "chat-run" / "model" / "adapter_config.json").read_text())
    assert config["target_modules"] == r".*\.(q_proj|v_proj)"
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "chat-run" / "model" / "adapter_model.safetensors")
    wrapped = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in saved}
    assert wrapped == {"q_proj", "v_proj"}


def test_lora_dropout_gets_the_fast_cpu_dropout(chat_recipe):
    """On CPU each LoRA linear is the fused one, which draws its dropout mask itself (a
    1-byte mask kept for backward); with train.fast_dropout off PEFT's own modules stay."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from launcher.models.fast_dropout import FastDropout
    from launcher.models.fused_lora import FusedLoraLinear

    trainer = Trainer(load_recipe(chat_recipe, ["adapter.dropout=0.1", "train.max_steps=1"]))
    model = trainer.acc.unwrap_model(trainer.model)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    drops = [m.lora_dropout["default"] for m in layers]
    assert all(type(m) is FastDropout and m.p == 0.1 for m in drops)
    model.train()  # the fused path runs, with the adapter's dropout
    assert layers[0]._fused(torch.zeros(2, 3, layers[0].in_features), (), {}) == ("default", 0.1)

    trainer = Trainer(
        load_recipe(
            chat_recipe,
            ["adapter.dropout=0.1", "train.max_steps=1", "train.fast_dropout=false"],
        ),
        overwrite=True,
    )
    model = trainer.acc.unwrap_model(trainer.model)
    drops = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(type(m) is torch.nn.Dropout for m in drops)


def test_paged_and_8bit_optimizers_train(chat_recipe, tmp_path):
    for name in ("adamw_8bit", "paged_adamw_8bit"):
        out = tmp_path / name
        _, summary = train_in_process(
            chat_recipe, f"train.optimizer={name}", f"output.dir={out}", "train.eval_at_start=true"
        )
        losses = evals(out)
        assert summary["status"] == "completed" and losses[-1] < losses[0] - 0.5, (name, losses)


# -- bad input: one clear message, exit 2, nothing written ---------------------------------


def user_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    "overrides,needles",
    [
        (["adapter.type=full", "quant.bits=4"], ["quant.bits", "adapter.type: lora"]),
        (["adapter.type=none", "quant.bits=8"], ["quant.bits", "cannot be fully fine-tuned"]),
        (["quant.bits=4", "quant.type=int4"], ["quant.type", "nf4", "fp4"]),
        (["quant.bits=3"], ["quant.bits"]),
        (["quant.bits=4", "quant.compute_dtype=float64"], ["quant.compute_dtype"]),
        (
            ["quant.bits=8", "distributed.strategy=fsdp"],
            ["quant.bits", "FSDP2", "quant.bits: 4 with fsdp"],
        ),
        (
            ["quant.bits=4", "adapter.type=dora", "distributed.strategy=zero3"],
            ["adapter.type", "DoRA", "outside ZeRO-3's gather", "fsdp, ddp or zero1"],
        ),
        (
            ["quant.bits=4", "adapter.type=dora", "distributed.strategy=zero2"],
            ["adapter.type", "DoRA", "first checkpoint fails", "fsdp, ddp or zero1"],
        ),
        (
            [
                "quant.bits=4",
                "quant.quant_storage=float32",
                "train.precision=bf16",
                "distributed.strategy=zero3",
            ],
            ["quant.quant_storage", "scrambles", "bfloat16 or uint8"],
        ),
        (["quant.bits=8", "quant.quant_storage=bfloat16"], ["quant.quant_storage", "int8"]),
        (["train.optimizer=adamw_4bit"], ["train.optimizer", "adamw_8bit"]),
    ],
)
def test_impossible_adapter_and_quant_settings_are_refused(chat_recipe, capsys, overrides, needles):
    args = ["validate", str(chat_recipe)]
    for o in overrides:
        args += ["-o", o]
    user_error(capsys, main(args), *needles)


@pytest.mark.parametrize(
    "target,needle",
    [
        ("[nope_proj, q_proj]", "nope_proj matches no module"),
        (r".*\.qq_proj", r".*\.qq_proj"),
        ("(unclosed", "not a valid regex"),
    ],
)
def test_target_modules_matching_nothing_list_the_layers_that_exist(
    chat_recipe, tmp_path, capsys, target, needle
):
    rc = main(
        ["train", str(chat_recipe), "-o", "quant.bits=4", "-o", f"adapter.target_modules={target}"]
    )
    err = user_error(capsys, rc, "adapter.target_modules", needle)
    if "regex" not in needle:  # the names that do exist, quantized layers included
        assert "q_proj" in err and "down_proj" in err and "model.layers.0" in err
    assert not (tmp_path / "chat-run").exists()


def test_bf16_compute_on_a_gpu_without_bf16_is_refused():
    from launcher.errors import UserError
    from launcher.models.quant import check_compute_dtype

    with pytest.raises(UserError, match="compute capability 8.0") as e:
        check_compute_dtype("bfloat16", device="cuda", bf16_ok=False)
    assert e.value.problems[0].key == "quant.compute_dtype"
    check_compute_dtype("float16", device="cuda", bf16_ok=False)
    for dtype in ("float32", "bfloat16", "float16"):  # bitsandbytes runs all three on CPU
        check_compute_dtype(dtype, device="cpu")


def test_gpu_check_script_runs_its_path_on_cpu(tmp_path):
    """bench/gpu_check.py is what a lent GPU runs; keep it working where CI can see it."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "gpu_check.py"), "--tiny", "--cpu"]
        + ["--modes", "qlora_nf4", "--steps", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["mode"] == "qlora_nf4" and row["learned"] and row["tokens_per_s"] > 0


# The quantized variants whose training an eval must leave untouched. 4-bit layers are
# built as on a CPU with AVX512-BF16 (where bitsandbytes' eval forward repacks weights in
# place), whatever this machine's CPU is, so AMD machines exercise that path too.
EVAL_INVARIANCE = {
    "nf4": ["quant.bits=4", "quant.type=nf4", "quant.compute_dtype=float32"],
    "8bit": ["quant.bits=8"],
    "qdora": ["adapter.type=dora", "quant.bits=4", "quant.compute_dtype=float32"],
}


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.parametrize("kind", list(EVAL_INVARIANCE))
def test_evals_never_change_quantized_training(
    kind, chat_recipe, quant_llama, tmp_path, monkeypatch
):
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)  # Linear4bit.__init__ reads it
    common = [
        *EVAL_INVARIANCE[kind],
        f"model.name_or_path={quant_llama}",
        "adapter.dropout=0.0",
        "train.max_steps=6",
        "train.log_every=1",
    ]
    with_evals, without = tmp_path / "with-evals", tmp_path / "without"
    trainer, _ = train_in_process(
        chat_recipe, *common, "train.eval_every=2", f"output.dir={with_evals}"
    )
    layers = [m for m in trainer.model.modules() if isinstance(m, bnb_modules.Linear4bit)]
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)  # switched off by ftl
    assert bool(layers) is (kind != "8bit")
    train_in_process(chat_recipe, *common, "train.eval_every=null", f"output.dir={without}")
    evals_run = [r for r in read_metrics(with_evals / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals_run] == [2, 4, 6]
    a, b = train_losses(with_evals), train_losses(without)
    assert len(a) == 6 and a == b, (a, b)  # exactly: an eval never touches training
