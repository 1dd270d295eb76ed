"""Vision-language SFT on tiny LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3 and SmolVLM models
built here, each with its own processor and a chat template of its family's shape.

The data: solid-colour images of random sizes, and answers naming the colour ("a red cat"),
which a model can only learn by looking at the image."""

from __future__ import annotations

import json
from pathlib import Path

import make_tiny
import pytest
import torch

from launcher.cli.main import main
from launcher.recipe import load_recipe
from launcher.train.loop import Trainer

FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "paligemma"]
_built: dict[str, Path] = {}


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    def get(family: str) -> Path:
        if family not in _built:
            out = tmp_path_factory.mktemp(family) / family
            make_tiny.make_vlm(out, family)
            _built[family] = out
        return _built[family]

    return get


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("captions")
    make_tiny.write_jsonl(d / "train.jsonl", make_tiny.caption_rows(d / "img", 24, seed=0))
    make_tiny.write_jsonl(
        d / "eval.jsonl", make_tiny.caption_rows(d / "img_eval", 8, seed=1, shape="list")
    )
    return {"train": d / "train.jsonl", "eval": d / "eval.jsonl", "dir": d}


def recipe(tmp_path: Path, model: Path, train: Path, extra: str = "", **data) -> Path:
    fields = "".join(f", {k}: {v}" for k, v in data.items())
    path = tmp_path / "vlm.yaml"
    path.write_text(
        f"""\
task: vision_language
model: {{name_or_path: {model}}}
data: {{format: vision_chat, train: {train}, max_length: 128{fields}}}
train: {{max_steps: 30, micro_batch_size: 4, lr: 3.0e-3, log_every: 1, num_threads: 1,
         fast_dropout: false}}
output: {{dir: {tmp_path / "run"}}}
{extra}"""
    )
    return path


def _data(model: Path, train: Path, **data):
    from launcher.data.build import load_datasets
    from launcher.models.vlm import load_processor
    from launcher.recipe.schema import DataCfg, ModelCfg

    proc = load_processor(ModelCfg(name_or_path=str(model)))
    cfg = DataCfg(format="vision_chat", train=str(train), **data)
    return proc, load_datasets(cfg, proc, images=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_examples_equal_the_processor_and_learn_only_the_answer(family, vlm, captions):
    """Token ids equal the processor's own expansion of the rendered conversation; the
    loss falls on the answer and EOS only (never on image tokens); a collated batch runs
    through the model and gives its own loss."""
    from PIL import Image

    model_dir = vlm(family)
    proc, data = _data(model_dir, captions["train"])
    rows = [json.loads(x) for x in captions["train"].read_text().splitlines()]
    tok = proc.tokenizer
    for row, ex in zip(rows[:6], data.train[:6], strict=True):
        msgs = row["messages"]
        user = [{"type": "image"}, {"type": "text", "text": "what is it"}]
        answer = [{"type": "text", "text": msgs[1]["content"]}]
        conversation = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        text = (
            None
            if family == "paligemma"
            else proc.apply_chat_template(conversation, tokenize=False)
        )
        image = Image.open(captions["dir"] / msgs[0]["content"][0]["image"]).convert("RGB")
        if family == "paligemma":  # no chat template: prompt (prefix) and answer (suffix)
            ref = proc(text=["<image>what is it"], images=[image], suffix=[msgs[1]["content"]])[
                "input_ids"
            ][0]
        else:
            ref = proc(text=[text], images=[image], add_special_tokens=False)["input_ids"][0]
        assert ex["input_ids"] == list(ref)
        learned = [t for t in ex["labels"] if t != -100]
        assert tok.decode(learned).strip() == msgs[1]["content"] + tok.eos_token
        assert ex["input_ids"].count(proc.image_token_id) >= 4  # expanded: many per image

    from launcher.data.vlm import collate_vision_chat

    batch = collate_vision_chat(data.train[:4], proc)
    expected = {
        "llava": "pixel_values",
        "qwen2_vl": "image_grid_thw",
        "qwen2_5_vl": "image_grid_thw",
        "idefics3": "pixel_attention_mask",
        "smolvlm": "pixel_attention_mask",
        "paligemma": "token_type_ids",  # the prompt attends both ways, the answer causally
    }[family]
    assert expected in batch
    if family.startswith("qwen"):
        assert "mm_token_type_ids" in batch  # Qwen2-VL refuses images without it
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # the images reach the model: other pixels, other logits
    other = {**batch, "pixel_values": batch["pixel_values"] * 0 + 0.5}
    assert not torch.allclose(model(**other).logits, out.logits)


@pytest.mark.parametrize(
    ("family", "adapter"), [("llava", "lora"), ("qwen2_vl", "full"), ("idefics3", "full")]
)
def test_vlm_sft_lowers_the_eval_loss(family, adapter, vlm, captions, tmp_path):
    r = recipe(
        tmp_path,
        vlm(family),
        captions["train"],
        f"adapter: {{type: {adapter}, r: 8}}",
        eval=captions["eval"],
    )
    trainer = Trainer(load_recipe(r))
    before = trainer.evaluate(trainer.model, 0)["eval_loss"]
    vision_before = {
        n: p.detach().clone()
        for n, p in trainer.acc.unwrap_model(trainer.model).named_parameters()
        if any(v in n for v in ("vision_tower.", "visual.blocks", "vision_model."))
    }
    summary = trainer.fit()
    after = summary["final_eval"]["eval_loss"]
    # LoRA on a random tiny model learns slower than training every weight
    assert after < before * (0.5 if adapter == "full" else 0.9), (before, after)
    assert summary["frozen_params"]["vision"] > 0
    model = trainer.acc.unwrap_model(trainer.model)
    for n, p in model.named_parameters():  # the vision tower is frozen by default
        if n in vision_before:
            assert torch.equal(p, vision_before[n]), n
    run = tmp_path / "run" / "model"
    assert (run / "processor_config.json").is_file() and (run / "chat_template.jinja").is_file()
    if adapter == "lora":
        cfg = json.loads((run / "adapter_config.json").read_text())
        assert "language_model" in cfg["target_modules"]
        assert cfg["modules_to_save"] == ["model.multi_modal_projector"]
        # LoRA on the language model only, the projector trained in full and saved
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForImageTextToText

        saved = load_file(str(run / "adapter_model.safetensors"))
        assert any("multi_modal_projector" in k for k in saved)
        assert not any("vision_tower" in k for k in saved)
        base = AutoModelForImageTextToText.from_pretrained(vlm(family))
        reloaded = PeftModel.from_pretrained(base, run).eval()
        batch = trainer.data.collate(trainer.data.eval[:4])
        model.eval()
        with torch.no_grad():
            assert torch.allclose(reloaded(**batch).logits, model(**batch).logits, atol=1e-5)


def test_projector_can_be_frozen_too(vlm, captions, tmp_path):
    r = recipe(tmp_path, vlm("llava"), captions["train"])
    trainer = Trainer(load_recipe(r, ["model.freeze_projector=true", "train.max_steps=2"]))
    model = trainer.acc.unwrap_model(trainer.model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("language_model" in n or "lm_head" in n for n in trainable)
    assert trainer.built.frozen["projector"] > 0


def test_image_tokens_are_never_cut(vlm, tmp_path):
    """max_length below an example's image tokens: dropped and counted under truncate and
    drop, an error under error; text after the image may be cut."""
    from launcher.errors import UserError

    model_dir = vlm("llava")  # 16 image tokens per image
    rows = make_tiny.caption_rows(tmp_path / "img", 4)
    rows[0]["messages"][1]["content"] = "a red cat and a blue cat and a green cat"
    rows[1]["messages"][0]["content"] = [
        {"type": "image", "image": rows[1]["messages"][0]["content"][0]["image"]},
        {"type": "text", "text": "what is it and what is"},
        {"type": "image", "image": rows[2]["messages"][0]["content"][0]["image"]},
    ]
    path = make_tiny.write_jsonl(tmp_path / "t.jsonl", rows)
    proc, full = _data(model_dir, path)
    image_id = proc.image_token_id
    # room for one image and part of its answer, not for the second image's last token
    limit = min(i for i, x in enumerate(full.train[2]["labels"]) if x != -100) + 3
    assert max(i for i, t in enumerate(full.train[1]["input_ids"]) if t == image_id) >= limit
    assert all(len(e["input_ids"]) > limit for e in full.train)
    _, cut = _data(model_dir, path, max_length=limit)
    assert cut.stats["dropped_images_too_long"] == 1  # the two-image example
    assert cut.stats["dropped_too_long"] == 1
    assert cut.stats["truncated"] == 3
    for ex, orig in zip(cut.train, [full.train[0], *full.train[2:]], strict=True):
        assert len(ex["input_ids"]) == limit
        assert ex["input_ids"].count(image_id) == orig["input_ids"].count(image_id)
    with pytest.raises(UserError, match="4 too long"):
        _data(model_dir, path, max_length=limit, too_long="drop")
    with pytest.raises(UserError, match="image tokens included"):
        _data(model_dir, path, max_length=limit, too_long="error")


def _err(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_vlm_bad_input(vlm, tiny_llama, tmp_path, capsys):
    model_dir = vlm("llava")
    rows = make_tiny.caption_rows(tmp_path / "img", 4, shape="list")

    def run(rows, model=model_dir, task="vision_language", fmt="vision_chat"):
        path = make_tiny.write_jsonl(tmp_path / "bad.jsonl", rows)
        r = recipe(tmp_path, model, path)
        r.write_text(
            r.read_text()
            .replace("task: vision_language", f"task: {task}")
            .replace("format: vision_chat", f"format: {fmt}")
        )
        err = _err(capsys, main(["train", str(r), "-o", f"output.dir={tmp_path / 'bad'}"]))
        assert not (tmp_path / "bad").exists()  # nothing written
        return err

    two = json.loads(json.dumps(rows))
    two[2]["images"].append(two[1]["images"][0])
    err = run(two)
    assert "bad.jsonl:3" in err and "1 <image> placeholders" in err and "2 images" in err

    missing = json.loads(json.dumps(rows))
    missing[1]["images"] = ["img/nope.png"]
    err = run(missing)
    assert "bad.jsonl:2" in err and "image not found" in err and "nope.png" in err

    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    broken = json.loads(json.dumps(rows))
    broken[0]["images"] = ["img/broken.png"]
    path = make_tiny.write_jsonl(tmp_path / "skip.jsonl", broken)
    r = recipe(tmp_path, model_dir, path, on_bad_row="skip")
    assert main(["train", str(r), "-o", "train.max_steps=1"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["bad_rows_skipped"] == 1
    capsys.readouterr()

    in_answer = json.loads(json.dumps(rows))
    in_answer[0]["messages"][1]["content"] = "<image> a red cat"
    in_answer[0]["images"].append(in_answer[0]["images"][0])
    assert "images belong in user turns" in run(in_answer)

    err = run(rows, tiny_llama)  # a text-only model given images
    assert "does not read images" in err and "task: causal_lm" in err

    parts = make_tiny.caption_rows(tmp_path / "img2", 2)
    err = run(parts, tiny_llama, "causal_lm", "chat")  # images in a text task's chat rows
    assert "holds an image" in err and "vision_language" in err


def test_vlm_qlora_quantizes_the_language_model_only(vlm, captions, tmp_path):
    """QLoRA on SmolVLM: the language model is 4-bit with LoRA on it, the vision tower and
    the projector stay in float (the projector is trained in full), and the loss drops."""
    pytest.importorskip("bitsandbytes")
    r = recipe(tmp_path, vlm("smolvlm"), captions["train"], "adapter: {type: lora, r: 8}")
    trainer = Trainer(
        load_recipe(r, ["quant.bits=4", "quant.compute_dtype=float32", "train.max_steps=8"])
    )
    model = trainer.acc.unwrap_model(trainer.model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    quantized = [n for n, k in kinds.items() if k == "Linear4bit"]
    assert quantized and all(".text_model." in n for n in quantized)
    assert any(".connector." in n and k == "Linear" for n, k in kinds.items())
    assert not any(".vision_model." in n and k == "Linear4bit" for n, k in kinds.items())
    trainer.fit()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    loss = [x["loss"] for x in rows if x["kind"] == "train"]
    assert len(loss) == 8 and loss[-1] < loss[0], loss


def test_paligemma_wants_one_prompt_and_one_answer(vlm, tmp_path):
    from launcher.errors import UserError

    rows = make_tiny.caption_rows(tmp_path / "img", 2)
    rows[1]["messages"] += [
        {"role": "user", "content": "and now"},
        {"role": "assistant", "content": "a cat"},
    ]
    path = make_tiny.write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(UserError, match="t.jsonl:2.*one prompt and one answer"):
        _data(vlm("paligemma"), path)
