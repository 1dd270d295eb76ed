"""Images: the `image_classification` format, train-time augmentation, the image collator.

An example holds the image's path, not its pixels. Each image is checked when the data is
read: a missing or corrupt file is a bad row (reported with its place, or counted under
`on_bad_row: skip`). The pixels are decoded per micro-batch, augmented (training only) and
turned into `pixel_values` by the model's own image processor, so memory stays flat
however large the dataset is.

Augmentation is reproducible: each example's random crop and flip come from a generator
seeded by (seed, epoch, image path), so a resumed run sees the same pixels.
"""

from __future__ import annotations

import math
import random
from typing import Any

from launcher.data.example import FormatContext, RowError, label_of


def check_image(path: str) -> None:
    """Open the file and verify it decodes; RowError says why not."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise RowError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise RowError(f"not a readable image: {path} ({e})") from None


def image_classification(row: dict[str, Any], ctx: FormatContext) -> dict[str, Any]:
    """image path + label -> the checked path and one class id."""
    field = ctx.cfg.image_field
    if field not in row:
        raise RowError(f"missing field '{field}' (row has: {', '.join(map(str, row))})")
    path = row[field]
    if not isinstance(path, str) or not path.strip():
        raise RowError(f"field '{field}' must be an image path, got {path!r}")
    label = label_of(row, ctx.cfg.label_field)
    if label not in ctx.label2id:
        raise RowError(f"label '{label}' is not in the label set {sorted(ctx.label2id)}")
    check_image(path)
    return {"image": path, "labels": ctx.label2id[label]}


def augment(image: Any, rng: random.Random, crop_scale: Any, hflip: bool) -> Any:
    """Random resized crop (area fraction in `crop_scale`, aspect 3/4..4/3) and flip."""
    from PIL import Image

    if crop_scale is not None:
        w, h = image.size
        for _ in range(10):  # as torchvision: try a few boxes, else keep the whole image
            area = w * h * rng.uniform(*crop_scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
                image = image.resize((w, h), Image.BILINEAR, box=(x, y, x + cw, y + ch))
                break
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def collate_images(
    examples: list[dict[str, Any]],
    processor: Any,
    *,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
    crop_scale: Any = None,
    hflip: bool = False,
) -> dict[str, Any]:
    """Decode, augment (train only) and process a micro-batch into pixel_values + labels."""
    import torch
    from PIL import Image

    images = []
    for e in examples:
        with Image.open(e["image"]) as im:
            image = im.convert("RGB")
        if train and (crop_scale is not None or hflip):
            rng = random.Random(f"{seed}/{epoch}/{e['image']}")
            image = augment(image, rng, crop_scale, hflip)
        images.append(image)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return {"pixel_values": pixels, "labels": labels}
