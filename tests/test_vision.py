"""Image classification on tiny image models built here and scikit-learn's digits."""

from __future__ import annotations

import json
from pathlib import Path

import make_tiny
import pytest
import torch

from launcher.cli.main import main
from launcher.recipe import load_recipe
from launcher.train.loop import Trainer

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return make_tiny.digits_folder(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vit") / "vit"
    make_tiny.make_vit(out)
    return out


def recipe(tmp_path: Path, model: Path, train: Path, extra: str = "", **data: str) -> Path:
    fields = "".join(f", {k}: {v}" for k, v in data.items())
    path = tmp_path / "img.yaml"
    path.write_text(
        f"""\
task: image_classification
model: {{name_or_path: {model}}}
data: {{format: image_classification, train: {train}{fields}}}
train: {{epochs: 10, micro_batch_size: 32, lr: 3.0e-3, warmup_ratio: 0.1, log_every: 20}}
output: {{dir: {tmp_path / "run"}}}
{extra}"""
    )
    return path


def test_vit_learns_the_digits(tmp_path, vit, digits):
    """A ViT trained from scratch on the 8x8 digits (upscaled by its processor): >= 0.9."""
    trainer = Trainer(load_recipe(recipe(tmp_path, vit, digits, eval_split="0.2")))
    summary = trainer.fit()
    assert summary["final_eval"]["accuracy"] >= 0.9, summary["final_eval"]
    assert summary["final_eval"]["macro_f1"] >= 0.9
    assert trainer.data.labels == [str(i) for i in range(10)]
    assert summary["samples_per_s"] > 0

    # the saved folder is a plain transformers image classifier with its processor
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "model").eval()
    proc = AutoImageProcessor.from_pretrained(tmp_path / "run" / "model")
    files = [e["image"] for e in trainer.data.eval[:16]]
    images = [Image.open(f).convert("RGB") for f in files]
    with torch.no_grad():
        pred = model(**proc(images=images, return_tensors="pt")).logits.argmax(-1)
    truth = [model.config.label2id[Path(f).parent.name] for f in files]
    assert sum(int(p) == t for p, t in zip(pred, truth, strict=True)) >= 13


def test_augmentation_is_reproducible_and_for_training_only(vit, digits):
    from transformers import AutoImageProcessor

    from launcher.data.images import collate_images

    proc = AutoImageProcessor.from_pretrained(vit)
    files = sorted(digits.glob("*/*.png"))[:8]
    ex = [{"image": str(f), "labels": 0} for f in files]
    aug = dict(crop_scale=(0.3, 0.6), hflip=True)
    plain = collate_images(ex, proc, train=False, **aug)["pixel_values"]
    a = collate_images(ex, proc, train=True, seed=1, epoch=0, **aug)["pixel_values"]
    b = collate_images(ex, proc, train=True, seed=1, epoch=0, **aug)["pixel_values"]
    c = collate_images(ex, proc, train=True, seed=1, epoch=1, **aug)["pixel_values"]
    assert torch.equal(a, b)  # resume sees the same pixels
    assert not torch.equal(a, c) and not torch.equal(a, plain)
    assert torch.equal(plain, collate_images(ex, proc, train=False)["pixel_values"])


@pytest.mark.parametrize("family", ["dinov2", "convnext"])
def test_lora_on_image_backbones_saves_the_head(family, tmp_path, digits):
    model_dir = tmp_path / family
    make_tiny.make_vit(model_dir, family)
    r = recipe(
        tmp_path,
        model_dir,
        digits,
        "adapter: {type: lora, r: 4, alpha: 8}\n",
        eval_split="0.05",
    )
    trainer = Trainer(load_recipe(r, ["train.max_steps=3", "train.eval_every=3"]))
    trainer.fit()
    saved = json.loads((tmp_path / "run" / "model" / "adapter_config.json").read_text())
    assert "classifier" in saved["modules_to_save"]

    from peft import PeftModel
    from transformers import AutoModelForImageClassification

    base = AutoModelForImageClassification.from_pretrained(
        model_dir, num_labels=10, ignore_mismatched_sizes=True
    )
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run" / "model").eval()
    batch = trainer.data.collate(trainer.data.eval[:4])
    trained = trainer.acc.unwrap_model(trainer.model).eval()
    with torch.no_grad():
        assert torch.allclose(
            reloaded(pixel_values=batch["pixel_values"]).logits,
            trained(pixel_values=batch["pixel_values"]).logits,
            atol=1e-5,
        )


def _err(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    return err


def test_image_bad_input(tmp_path, vit, digits, capsys):
    # JSONL: absolute paths, or relative to the file's folder; a missing image names its line
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"not an image at all")
    (data / "ok.png").write_bytes(next(digits.glob("3/*.png")).read_bytes())
    rows = [{"image": str(p), "label": p.parent.name} for p in sorted(digits.glob("*/*.png"))[:40]]
    rows[5] = {"image": "nope.png", "label": "3"}
    rows[9] = {"image": "broken.png", "label": "4"}
    rows[12] = {"image": "ok.png", "label": "3"}
    jsonl = make_tiny.write_jsonl(data / "train.jsonl", rows)
    r = recipe(tmp_path, vit, jsonl)
    err = _err(capsys, main(["train", str(r)]))
    assert f"{jsonl}:6" in err and "image not found" in err and str(data / "nope.png") in err
    assert not (tmp_path / "run").exists()

    # skipped and counted under on_bad_row: skip (the missing and the corrupt image)
    trainer = Trainer(
        load_recipe(
            r, ["data.on_bad_row=skip", "train.max_steps=1", f"output.dir={tmp_path / 'skip'}"]
        )
    )
    assert trainer.data.stats["bad_rows_skipped"] == 2
    assert str(data / "ok.png") in [e["image"] for e in trainer.data.train]
    assert any("not a readable image" in x for x in trainer.data.stats["bad_row_examples"])
    trainer.stop.uninstall()

    # a folder whose label folders hold no images
    texts = tmp_path / "texts"
    for label in ("a", "b"):
        (texts / label).mkdir(parents=True)
        (texts / label / "1.txt").write_text("hello")
    err = _err(capsys, main(["train", str(r), "-o", f"data.train={texts}"]))
    assert "no images in label folders" in err and "1.txt" in err

    # a text model given an image task: no image processor
    err = _err(
        capsys,
        main(["train", str(recipe(tmp_path, make_text_model(tmp_path), digits))]),
    )
    assert "model.name_or_path" in err and "image processor" in err


def make_text_model(tmp_path: Path) -> Path:
    out = tmp_path / "bert"
    make_tiny.make_bert(out)
    return out
