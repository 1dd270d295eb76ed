"""One fused LoRA linear for CPU training: y = x W^T + b + ((x * m) A^T) B^T * s.

PEFT's `lora.Linear` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides
the two big matmuls it writes lora_B's output, multiplies it by the scaling into a new
tensor, adds that to the base output into a third, and backward multiplies the gradient
by the scaling again and adds the adapter's input gradient to the base's. Each of those
is a pass over a (tokens x features) activation, and on a CPU such passes run at memory
speed: in a 2048-token step of SmolLM2-135M under LoRA r 16 on every linear layer, they
and the rank-16 matmuls that write full-width outputs took a quarter of the step.

Here the scaling (and the dropout's 1/(1-p)) is applied to the rank-r activation, lora_B
accumulates into the base output in place (`addmm_`), and backward gives the input
gradient of both paths in one tensor. Backward keeps x (which q/k/v and gate/up share),
the rank-r activation and a 1-byte dropout mask, as `fast_dropout.DroppedLoraA` does.
The mask is the draw `FastDropout` would make, so a run is the same run as unfused, to
float rounding (tests/test_fused_lora.py).

`FusedLoraLinear` subclasses PEFT's `lora.Linear` and only overrides `forward`; it is
swapped in by class on each plain LoRA linear (`fuse_lora`), so the state dict, merging,
adapter switching and saving are PEFT's own. Anything but one plain adapter training or
evaluating on a CPU in one dtype (merged, disabled, several adapters, DoRA, a LoRA bias,
fan-in-fan-out weights, autocast, a GPU) goes to PEFT's forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from launcher import compat
from launcher.models.fast_dropout import FastDropout, keep_mask

LoraLinear = compat.peft_lora_linear()


def _dropped(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x * mask, without a float copy of the boolean mask."""
    return x if mask is None else torch.where(mask, x, 0.0)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + (((x * mask) A^T) * c) B^T, W and b frozen."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        mask: torch.Tensor | None,
        c: float,
    ) -> torch.Tensor:
        y = nn.functional.linear(x, weight, bias)
        h = _dropped(x, mask).reshape(-1, x.shape[-1]) @ a.t()
        h.mul_(c)
        y.view(-1, y.shape[-1]).addmm_(h, b.t())
        ctx.save_for_backward(x, weight, a, b, h, mask)
        ctx.c = c
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, a, b, h, mask = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = g.t() @ h
        gh = (g @ b).mul_(ctx.c)  # the gradient at (x * mask) A^T
        if ctx.needs_input_grad[3]:
            grad_a = gh.t() @ _dropped(x, mask).reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
            flat = grad_x.view(-1, grad_x.shape[-1])
            if mask is None:
                flat.addmm_(gh, a)
            else:
                flat.add_((gh @ a).mul_(mask.reshape(flat.shape)))
        return grad_x, None, None, grad_a, grad_b, None, None  # W and b: frozen (`_fused`)


class FusedLoraLinear(LoraLinear):
    """PEFT's `lora.Linear` with `_LoraLinear` as its forward where that applies."""

    fuses_dropout = True  # `fast_dropout.fuse_lora_dropout` leaves it alone

    def _fused(self, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[str, float] | None:
        """(adapter, dropout p) when the fused path computes what PEFT's forward would."""
        if args or kwargs or self.disable_adapters or self.merged or self.fan_in_fan_out:
            return None
        active = [n for n in self.active_adapters if n in self.lora_A]
        if len(active) != 1 or active[0] in self.lora_variant:
            return None
        name = active[0]
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]
        drop = self.lora_dropout[name]
        if (
            type(base) is not nn.Linear
            or type(a) is not nn.Linear
            or type(b) is not nn.Linear
            or a.bias is not None
            or b.bias is not None
            or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu")
            or not x.dtype == base.weight.dtype == a.weight.dtype == b.weight.dtype
        ):
            return None
        if type(drop) is nn.Identity:
            return name, 0.0
        if type(drop) not in (nn.Dropout, FastDropout) or drop.p > 0.99:
            return None
        return name, drop.p if drop.training else 0.0

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self._fused(x, args, kwargs)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        name, p = plan
        mask = keep_mask(x.shape, p) if p > 0.0 else None  # FastDropout's draw
        c = self.scaling[name] / (1.0 - p)
        base = self.base_layer
        return _LoraLinear.apply(
            x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight, mask, c
        )


def fuse_lora(model: nn.Module) -> int:
    """Give every PEFT `lora.Linear` in `model` the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            count += 1
    return count
