"""L2-SP: pull fine-tuned weights toward their pretrained values.

Loss = D(θ) + λ·Σ‖θ − θ₀‖² over trainable parameters that came from the checkpoint
(θ₀ = starting weights); new parameters such as a fresh classification head are free.
Li, Grandvalet & Davoine, "Explicit inductive bias for transfer learning with
convolutional networks" (ICML 2018).
"""

from __future__ import annotations

from typing import Any


class L2SP:
    def __init__(self, model: Any, strength: float, exclude: set[str]):
        self.strength = strength
        # keep (param, θ₀) pairs; params are the live tensors the optimizer updates
        self.pairs = [
            (p, p.detach().clone())
            for name, p in model.named_parameters()
            if p.requires_grad and not any(name.endswith(x) for x in exclude)
        ]

    def penalty(self) -> Any:
        import torch

        if not self.pairs:
            return torch.zeros(())
        return self.strength * sum(((p - p0.to(p.device)) ** 2).sum() for p, p0 in self.pairs)

    @staticmethod
    def distance(model: Any, reference: dict[str, Any]) -> float:
        """Σ‖θ − θ₀‖² over the named tensors of `reference` (for reports and tests)."""
        params = dict(model.named_parameters())
        return float(sum(((params[n].detach() - t) ** 2).sum() for n, t in reference.items()))
