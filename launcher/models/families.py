"""Facts about model and processor families that the data and model rooms both read:
where a vision-language model keeps its parts, and which processors build a prefix-LM
prompt instead of a chat. A leaf: imports nothing of ftl's."""

from __future__ import annotations

from typing import Any

# module names, by family, of a vision-language model's parts
VISION = ("vision_tower", "visual", "vision_model")
PROJECTOR = ("multi_modal_projector", "connector", "merger", "mm_projector")
LANGUAGE = ("language_model", "text_model")


def prefix_lm(proc: Any) -> bool:
    """PaliGemma: no chat template; a prompt (prefix, attended both ways) and an answer
    (suffix, causal), told apart by token_type_ids."""
    return type(proc).__name__ == "PaliGemmaProcessor"
