"""`ftl export`: bundles checked by the loaders that will serve them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launcher.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama, chat_data) -> Path:
    d = tmp_path_factory.mktemp("export")
    recipe = d / "r.yaml"
    recipe.write_text(
        f"""\
model: {{name_or_path: {tiny_llama}}}
data: {{format: chat, train: {chat_data["train"]}, max_length: 64}}
adapter: {{type: lora, r: 4, alpha: 8, dropout: 0.0}}
train: {{max_steps: 4, micro_batch_size: 8, lr: 1.0e-2, log_every: 1}}
output: {{dir: {d / "run"}}}
"""
    )
    assert main(["train", str(recipe)]) == 0
    return d / "run"


def test_hf_bundle_of_an_adapter_run_loads_generates_and_stops_like_training(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = tmp_path / "bundle"
    assert main(["export", str(lora_run), "--format", "hf", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no PEFT
    tok = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert tok.eos_token_id in eos and gen.pad_token_id == tok.pad_token_id
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # the bundle is the trained model: equal to the adapter on its base
    base = json.loads((lora_run / "model" / "adapter_config.json").read_text())
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base["base_model_name_or_path"]), lora_run / "model"
    )
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() <= 1e-5
    out_ids = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out_ids.shape[1] > ids.shape[1]


def test_vllm_lora_bundle_and_what_vllm_cannot_serve(lora_run, tmp_path, capsys):
    out = tmp_path / "vllm"
    script = ROOT / "tools" / "export_model.py"
    done = subprocess.run(
        [sys.executable, str(script), str(lora_run), "--format", "vllm-lora", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "vllm serve" in done.stdout and "--enable-lora" in done.stdout
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and not cfg.get("use_dora")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), out
    )
    # a DoRA adapter with modules_to_save: refused, each reason named, nothing written
    dora = tmp_path / "dora"
    dora.mkdir()
    for f in (lora_run / "model").iterdir():
        (dora / f.name).write_bytes(f.read_bytes())
    bad = {**cfg, "use_dora": True, "modules_to_save": ["lm_head"]}
    (dora / "adapter_config.json").write_text(json.dumps(bad))
    rc = main(["export", str(dora), "--format", "vllm-lora", "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "vLLM cannot serve" in err and "use_dora" in err and "modules_to_save" in err
    assert "--format hf" in err and not (tmp_path / "no").exists()


def test_export_bad_input(lora_run, tmp_path, capsys):
    rc = main(["export", str(tmp_path), "--format", "hf", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "neither a model" in err and "ftl convert" in err
    base = json.loads((lora_run / "model" / "adapter_config.json").read_text())
    full = Path(base["base_model_name_or_path"])
    rc = main(["export", str(full), "--format", "vllm-lora", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 2 and "full model, not an adapter" in err


@pytest.mark.parametrize("quant,tol", [("f16", 2e-3), ("q8_0", 2e-2)])
def test_gguf_loads_with_transformers_and_matches_the_source(quant, tol, tiny_llama, tmp_path):
    """transformers' own GGUF loader reads the file back (undoing the Q/K permutation);
    logits stay within the weight type's tolerance and the tokenizer encodes the same."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf"
    args = ["export", str(tiny_llama), "--format", "gguf", "--quant", quant, "--out", str(out)]
    assert main(args) == 0
    name = f"model-{quant}.gguf"
    got = AutoModelForCausalLM.from_pretrained(out, gguf_file=name)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (got(ids).logits - ref(ids).logits).abs().max()
    assert diff <= tol
    text = "Hello world, the quick brown fox <|im_end|>"
    t_gguf = AutoTokenizer.from_pretrained(out, gguf_file=name)
    assert t_gguf(text)["input_ids"] == AutoTokenizer.from_pretrained(tiny_llama)(text)["input_ids"]


def test_gguf_of_an_adapter_run_is_the_merged_model(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "gguf"
    args = ["export", str(lora_run), "--format", "gguf", "--out", str(out)]
    assert main([*args, "--dry-run"]) == 0
    assert not out.exists() and not list(tmp_path.glob(".gguf.tmp-*"))
    assert main(args) == 0
    got = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf")
    base = json.loads((lora_run / "model" / "adapter_config.json").read_text())
    ref = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base["base_model_name_or_path"]), lora_run / "model"
    )
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (got(ids).logits - ref(ids).logits).abs().max() <= 2e-3
    assert not list(tmp_path.glob(".gguf.tmp-*"))


def test_gguf_refuses_an_unsupported_architecture(tiny_bert, tmp_path, capsys):
    rc = main(["export", str(tiny_bert), "--format", "gguf", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "llama family" in err and "bert" in err and "convert_hf_to_gguf" in err
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.tmp-*"))


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp(tiny_llama, tmp_path):
    """Opt-in (-m slow), when llama-cpp-python is installed: llama.cpp itself loads the
    file and its logits follow transformers'."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "gguf"
    assert main(["export", str(tiny_llama), "--format", "gguf", "--out", str(out)]) == 0
    llm = llama_cpp.Llama(model_path=str(out / "model-f16.gguf"), logits_all=True, verbose=False)
    tokens = [5, 6, 7, 8]
    llm.eval(tokens)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        want = ref(torch.tensor([tokens])).logits[0, -1]
    got = torch.tensor(llm.scores[len(tokens) - 1])
    assert (got - want).abs().max() <= 5e-3
