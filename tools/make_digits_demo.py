#!/usr/bin/env python3
"""Write the image-classification CPU demo: scikit-learn's digits as PNG folders, and a
small ViT to train on them.

    python tools/make_digits_demo.py [OUT_DIR]      (default: data/digits)

- OUT_DIR/images/<digit>/<n>.png: the 1,797 real 8x8 handwritten digits bundled with
  scikit-learn (a copy of the UCI optdigits test set), grey levels 0-16 scaled to 0-255,
  saved as RGB.
- OUT_DIR/vit: a ViT (4 layers, hidden 128, 4x4 patches on 16x16 inputs, 0.54 M
  parameters) with random weights. No ViT in transformers format installs offline, so the
  demo trains one from scratch, and its image processor upscales the digits to 16x16.

Needs scikit-learn (`pip install scikit-learn`). Used by recipes/vision/demo-digits-vit.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from sklearn.datasets import load_digits
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = Path(argv[0] if argv else "data/digits")
    digits = load_digits()
    for i, (img, y) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = out / "images" / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (img * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(folder / f"{i:04d}.png")
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(out / "vit")
    ViTImageProcessor(
        size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out / "vit")
    print(f"{len(digits.images)} images in {out / 'images'}, a random ViT in {out / 'vit'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
