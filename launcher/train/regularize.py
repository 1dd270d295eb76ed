"""L2-SP: pull fine-tuned weights toward their pretrained values.

Loss = D(θ) + λ·Σ‖θ − θ₀‖² over trainable parameters that came from the checkpoint
(θ₀ = starting weights); new parameters such as a fresh classification head are free.
Li, Grandvalet & Davoine, "Explicit inductive bias for transfer learning with
convolutional networks" (ICML 2018).
"""

from __future__ import annotations

from typing import Any


def pretrained_parameters(model: Any, new: set[str]) -> list[Any]:
    """Parameters loaded from the checkpoint (by identity, so it survives adapter wrapping)."""
    return [p for name, p in model.named_parameters() if name not in new]


class L2SP:
    def __init__(self, params: list[Any], strength: float):
        """`params`: the pretrained parameters; only those still trainable are regularised."""
        self.strength = strength
        self.pairs = [(p, p.detach().clone()) for p in params if p.requires_grad]
        self._placed = False

    def penalty(self) -> Any:
        import torch

        if not self._placed:  # θ₀ follows its parameter to the device, once
            self.pairs = [(p, p0.to(p.device)) for p, p0 in self.pairs]
            self._placed = True
        if not self.pairs:
            return torch.zeros(())
        return self.strength * sum(((p - p0) ** 2).sum() for p, p0 in self.pairs)
