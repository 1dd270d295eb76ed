"""Tiny models and tokenizers built on the spot (no hub, a few seconds on a CPU)."""

from __future__ import annotations

import json
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "terrible",
    "plot",
    "actor",
    "story",
    "i",
    "loved",
    "hated",
    "it",
    "what",
    "is",
    "capital",
    "of",
    "france",
    "paris",
    "say",
    "hello",
    "world",
    "answer",
    "question",
    "one",
    "two",
    "three",
    "four",
    "five",
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "yes",
    "no",
    "please",
    "thanks",
    "sure",
]


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(n)]


def make_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "<|im_end|>", "<pad>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)


def make_llama(out: Path, *, tie: bool = False, **sizes: int) -> int:
    """The tiny tokenizer and a Llama (tiny unless `sizes` overrides LlamaConfig fields;
    `tie`: one matrix for the embeddings and the head); returns the parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    make_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    cfg = LlamaConfig(
        **{**shape, **sizes},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def make_bert(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    make_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    BertModel(cfg).save_pretrained(out)  # a "pretrained encoder": the task head is new


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable 2-class task: the label follows the sentiment words in the text."""
    rng = random.Random(seed)
    pos, neg, filler = ["good", "great", "loved"], ["bad", "awful", "hated"], WORDS[:8]
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(filler) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(pos if label == "pos" else neg))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    colors = ["red", "blue", "green"]
    rows = []
    for _ in range(n):
        c = rng.choice(colors)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "answer with one word"},
                    {"role": "user", "content": f"say {c} please"},
                    {"role": "assistant", "content": c},
                ]
            }
        )
    return rows


def make_wordpiece_tokenizer(out: Path, words: list[str]) -> None:
    """A BERT-style WordPiece tokenizer: [CLS] ... [SEP], words split into pieces."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # a small vocabulary: longer words break into several pieces, as in real NER data
    tok.train_from_iterator(
        [" ".join(words)] * 3, trainers.WordPieceTrainer(vocab_size=120, special_tokens=specials)
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    ).save_pretrained(out)


def make_bert_wordpiece(out: Path, words: list[str], **sizes: int) -> None:
    """A tiny BERT encoder with a WordPiece tokenizer over `words`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    make_wordpiece_tokenizer(out, words)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(0)
    shape = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    BertModel(
        BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **{**shape, **sizes})
    ).save_pretrained(out)


def make_word_tokenizer(out: Path, words: list[str]) -> None:
    """A word-level tokenizer for seq2seq tests: pad 0, eos 1, unk 2; EOS appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *sorted(set(words))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(out)


def make_seq2seq(out: Path, family: str, words: list[str], d_model: int = 64) -> None:
    """A tiny random T5, BART or Marian and its word-level tokenizer."""
    import torch
    import transformers as tf

    make_word_tokenizer(out, words)
    n = len(tf.AutoTokenizer.from_pretrained(out))
    torch.manual_seed(0)
    ids = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if family == "t5":
        cfg = tf.T5Config(
            vocab_size=n,
            d_model=d_model,
            d_kv=d_model // 4,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            **ids,
        )
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        shape = dict(
            vocab_size=n,
            d_model=d_model,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=2 * d_model,
            decoder_ffn_dim=2 * d_model,
            max_position_embeddings=64,
            bos_token_id=0,
            forced_eos_token_id=1,
            **ids,
        )
        if family == "bart":
            model = tf.BartForConditionalGeneration(tf.BartConfig(**shape))
        else:
            model = tf.MarianMTModel(tf.MarianConfig(**shape))
    model.save_pretrained(out)


def make_vit(out: Path, family: str = "vit", image_size: int = 16, **sizes: int) -> None:
    """A tiny random ViT (or DINOv2 / ConvNeXt) encoder and its image processor."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if family == "convnext":
        cfg = tf.ConvNextConfig(
            num_channels=3,
            num_stages=2,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            patch_size=2,
            image_size=image_size,
        )
        model = tf.ConvNextModel(cfg)
    else:
        shape = dict(
            image_size=image_size,
            patch_size=4,
            num_channels=3,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
        )
        shape.update(sizes)
        config = tf.Dinov2Config if family == "dinov2" else tf.ViTConfig
        model = (tf.Dinov2Model if family == "dinov2" else tf.ViTModel)(config(**shape))
    model.save_pretrained(out)
    tf.ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(out)


def digits_folder(out: Path, n: int | None = None) -> Path:
    """scikit-learn's 8x8 digits as PNG files in one folder per digit."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images[:n], d.target[:n], strict=True)):
        folder = out / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).convert("RGB").save(folder / f"{i}.png")
    return out


# Chat templates in the shape of each family's own (content parts; images as placeholders)
VLM_TEMPLATES = {
    "llava": (
        "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
    ),
    "qwen2_vl": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "idefics3": (
        "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
        "{% if m['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>' }}"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
        "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
    ),
}
VLM_SPECIALS = {
    "llava": ["</s>", "<image>"],
    "qwen2_vl": [
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ],
    "idefics3": [
        "<|im_start|>",
        "<end_of_utterance>",
        "<image>",
        "<fake_token_around_image>",
        "<global-img>",
    ],
}
VLM_EOS = {
    "llava": "</s>",
    "qwen2_vl": "<|im_end|>",
    "idefics3": "<end_of_utterance>",
    "paligemma": "<eos>",
}
VLM_SPECIALS["paligemma"] = ["<eos>", "<image>"]
VLM_TEMPLATES["paligemma"] = None  # prompt + answer (prefix + suffix), no chat template


def make_vlm(out: Path, family: str = "llava", image_size: int = 32) -> None:
    """A tiny random vision-language model (llava | qwen2_vl | qwen2_5_vl | idefics3 |
    smolvlm) with its processor: tokenizer, image processor and chat template."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # without torchvision (here) transformers cannot build a video processor: ftl's
    # image-only variant of the processor class, as ftl loads it
    from launcher.compat import image_only_processor

    base = {"qwen2_5_vl": "qwen2_vl", "smolvlm": "idefics3"}.get(family, family)
    specials = VLM_SPECIALS[base]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "<pad>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    eos = VLM_EOS[base]
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=eos,
        pad_token="<pad>",
        extra_special_tokens=[s for s in specials if s != eos],
    )
    template = VLM_TEMPLATES[base]
    patch = 8
    if base == "llava":
        ip = tf.CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        proc = tf.LlavaProcessor(
            image_processor=ip,
            tokenizer=fast,
            patch_size=patch,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
    elif base == "paligemma":
        ip = tf.SiglipImageProcessor(
            size={"height": image_size, "width": image_size},
            image_seq_length=(image_size // patch) ** 2,
        )
        proc = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=fast)
    elif base == "qwen2_vl":
        patch = 4
        ip = tf.Qwen2VLImageProcessor(
            min_pixels=16 * 16,
            max_pixels=image_size * image_size,
            patch_size=patch,
            merge_size=2,
            temporal_patch_size=2,
        )
        cls = tf.Qwen2_5_VLProcessor if family == "qwen2_5_vl" else tf.Qwen2VLProcessor
        proc = image_only_processor(cls)(image_processor=ip, tokenizer=fast, chat_template=template)
    else:
        ip_cls = tf.SmolVLMImageProcessor if family == "smolvlm" else tf.Idefics3ImageProcessor
        ip = ip_cls(
            size={"longest_edge": image_size},
            max_image_size={"longest_edge": image_size},
            do_image_splitting=False,
        )
        cls = tf.SmolVLMProcessor if family == "smolvlm" else tf.Idefics3Processor
        n = (image_size // patch) ** 2 // 4
        proc = image_only_processor(cls)(
            image_processor=ip, tokenizer=fast, image_seq_len=n, chat_template=template
        )
    fast = proc.tokenizer
    vocab = len(fast)
    text = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(0)
    if base == "llava":
        cfg = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(
                image_size=image_size,
                patch_size=patch,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=32,
            ),
            text_config=tf.LlamaConfig(**text),
            image_token_index=fast.convert_tokens_to_ids("<image>"),
            vision_feature_select_strategy="default",
            vision_feature_layer=-1,
            image_seq_length=(image_size // patch) ** 2,
        )
        model = tf.LlavaForConditionalGeneration(cfg)
    elif base == "paligemma":
        cfg = tf.PaliGemmaConfig(
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=image_size,
                patch_size=patch,
                projection_dim=64,
            ),
            text_config=dict(
                model_type="gemma",
                vocab_size=vocab,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                head_dim=16,
                bos_token_id=fast.bos_token_id,
                eos_token_id=fast.eos_token_id,
                pad_token_id=fast.pad_token_id,
            ),
            image_token_index=fast.convert_tokens_to_ids("<image>"),
            projection_dim=64,
            hidden_size=64,
            vocab_size=vocab,
        )
        model = tf.PaliGemmaForConditionalGeneration(cfg)
    elif base == "qwen2_vl":
        ids = {t: fast.convert_tokens_to_ids(t) for t in specials}
        vis = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=4,
            patch_size=patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        )
        if family == "qwen2_5_vl":
            vis = dict(
                depth=2,
                hidden_size=32,
                out_hidden_size=64,
                intermediate_size=64,
                num_heads=4,
                patch_size=patch,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
                window_size=16,
                fullatt_block_indexes=[1],
            )
        txt = dict(
            text,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
        )
        config = tf.Qwen2_5_VLConfig if family == "qwen2_5_vl" else tf.Qwen2VLConfig
        cfg = config(
            text_config=txt,
            vision_config=vis,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        model_cls = (
            tf.Qwen2_5_VLForConditionalGeneration
            if family == "qwen2_5_vl"
            else tf.Qwen2VLForConditionalGeneration
        )
        model = model_cls(cfg)
    else:
        config = tf.SmolVLMConfig if family == "smolvlm" else tf.Idefics3Config
        cfg = config(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=image_size,
                patch_size=patch,
            ),
            text_config=dict(text, model_type="llama"),
            image_token_id=fast.convert_tokens_to_ids("<image>"),
            scale_factor=2,
        )
        model_cls = (
            tf.SmolVLMForConditionalGeneration
            if family == "smolvlm"
            else tf.Idefics3ForConditionalGeneration
        )
        model = model_cls(cfg)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    if "video_processor" in type(proc).__mro__[1].get_attributes():
        # as a real checkpoint has it (transformers cannot build it without torchvision)
        video = {
            "video_processor_type": type(proc)
            .__mro__[1]
            .__name__.replace("Processor", "VideoProcessor"),
            "processor_class": type(proc).__name__,
        }
        (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))


def caption_rows(folder: Path, n: int = 24, seed: int = 0, shape: str = "parts") -> list[dict]:
    """Solid-colour images and one-line answers naming the colour: a VLM learns them only
    by looking at the image. `shape`: content parts, or an images list + <image>."""
    from PIL import Image

    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        name = rng.choice(sorted(colours))
        size = (rng.randint(20, 40), rng.randint(20, 40))
        Image.new("RGB", size, colours[name]).save(folder / f"{i}.png")
        path = f"{folder.name}/{i}.png"
        answer = f"a {name} cat"
        if shape == "parts":
            user = [{"type": "image", "image": path}, {"type": "text", "text": "what is it"}]
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": user},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
        else:
            rows.append(
                {
                    "images": [path],
                    "messages": [
                        {"role": "user", "content": "<image>\nwhat is it"},
                        {"role": "assistant", "content": answer},
                    ],
                }
            )
    return rows
