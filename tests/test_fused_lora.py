"""The fused CPU LoRA linear computes what PEFT's `lora.Linear` computes, steps and all."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from launcher.models import fast_dropout as fd
from launcher.models.fused_lora import FusedLoraLinear, fuse_lora


def _nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind `t`."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def _lora(model: nn.Module, dropout: float, **kw) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, **kw))
    for p in peft.parameters():  # non-zero lora_B, so every path carries a gradient
        if p.requires_grad:
            p.data.normal_(0, 0.05)
    fd.swap_dropout(peft)  # the masks FastDropout draws, which the fused path draws too
    return peft


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_lora_equals_peft_on_a_biased_mlp(dropout):
    """Loss, input gradient and every adapter gradient equal PEFT's own forward under the
    same seed, with a bias on the base layer and 2-D and 3-D inputs; evaluation and the
    merged weights are PEFT's too."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8, bias=False))
    plain = _lora(mlp, dropout, target_modules=["0", "2"])
    fused = copy.deepcopy(plain)
    assert fuse_lora(fused) == 2
    assert list(fused.state_dict()) == list(plain.state_dict())
    for shape in ((30, 24), (3, 10, 24)):
        x = torch.randn(*shape)
        results = []
        for model in (plain, fused):
            model.train()
            xi = x.clone().requires_grad_(True)
            torch.manual_seed(1)
            out = model(xi)
            loss = (out * torch.linspace(-1, 1, out.shape[-1])).square().mean()
            loss.backward()
            grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
            results.append((loss.item(), xi.grad, grads, _nodes(out)))
            model.zero_grad(set_to_none=True)
        (loss_a, gx_a, grads_a, nodes_a), (loss_b, gx_b, grads_b, nodes_b) = results
        assert "_LoraLinearBackward" in nodes_b and "_LoraLinearBackward" not in nodes_a
        assert loss_b == pytest.approx(loss_a, rel=1e-6)
        torch.testing.assert_close(gx_b, gx_a, rtol=1e-5, atol=1e-7)
        assert grads_a.keys() == grads_b.keys() and len(grads_a) == 4
        for k in grads_a:
            torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-7, msg=k)
    x = torch.randn(5, 24)
    plain.eval(), fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-6, atol=1e-7)
        with fused.disable_adapter(), plain.disable_adapter():  # PEFT's path: base only
            assert torch.equal(fused(x), plain(x))
    merged_a = plain.merge_and_unload()
    merged_b = fused.merge_and_unload()
    for (ka, a), (kb, b) in zip(
        merged_a.state_dict().items(), merged_b.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(a, b), ka


def test_fused_lora_trains_a_causal_lm_like_peft(tiny_llama):
    """A tiny Llama under LoRA on every linear layer with dropout: the same loss and
    gradients as PEFT's forward with FastDropout, and fewer bytes kept for backward than
    PEFT's; DoRA layers stay PEFT's."""
    from transformers import AutoModelForCausalLM

    from tests.test_fast_dropout import _lm_step

    torch.manual_seed(0)
    plain = _lora(
        AutoModelForCausalLM.from_pretrained(tiny_llama), 0.1, target_modules="all-linear"
    )
    fused = copy.deepcopy(plain)
    assert fuse_lora(fused) == 7 * fused.config.num_hidden_layers
    assert fd.fuse_lora_dropout(fused) == 0  # the fused layers draw their own masks
    ids = torch.randint(5, 300, (2, 48))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = (
        _lm_step(m, ids) for m in (plain, fused)
    )
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6, msg=k)
    assert saved_b < 0.85 * saved_a, (saved_a, saved_b)

    dora = _lora(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        0.1,
        target_modules="all-linear",
        use_dora=True,
    )
    fuse_lora(dora)  # swapped, but DoRA is a variant: PEFT's forward runs
    layers = [m for m in dora.modules() if isinstance(m, FusedLoraLinear)]
    assert layers and all(m._fused(torch.zeros(1, 64), (), {}) is None for m in layers)
