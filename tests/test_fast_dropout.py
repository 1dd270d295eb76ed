"""Fast CPU dropout: right probability, reproducible, exact gradients, SDPA-equal attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from launcher.models import fast_dropout as fd


def test_keep_fraction_and_scale():
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = fd.fast_dropout(x, 0.1, True)
    kept = (y != 0).float().mean().item()
    assert abs(kept - 0.9) < 0.003
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert abs(y.mean().item() - 1.0) < 0.005  # unbiased, like nn.Dropout


def test_masks_follow_torch_seed():
    torch.manual_seed(5)
    a = fd.keep_mask((1000,), 0.3)
    b = fd.keep_mask((1000,), 0.3)
    torch.manual_seed(5)
    assert torch.equal(a, fd.keep_mask((1000,), 0.3)) and not torch.equal(a, b)


def test_gradient_is_the_same_mask():
    x = torch.randn(64, 32, requires_grad=True)
    y = fd.fast_dropout(x, 0.25, True)
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)


def test_eval_and_zero_p_are_identity():
    x = torch.randn(10)
    assert fd.fast_dropout(x, 0.5, False) is x and fd.fast_dropout(x, 0.0, True) is x


def test_swap_dropout_replaces_modules():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Sequential(nn.Dropout(0.1)))
    assert fd.swap_dropout(m) == 2
    assert [type(x).__name__ for x in m.modules()].count("FastDropout") == 2
    assert m[1].p == 0.2


class _Attn(nn.Module):
    def __init__(self, causal: bool, groups: int = 1):
        super().__init__()
        self.is_causal, self.num_key_value_groups = causal, groups


@pytest.mark.parametrize(
    "causal,masked,groups", [(False, True, 1), (True, False, 2), (True, True, 1)]
)
def test_explicit_attention_equals_sdpa_without_dropout(causal, masked, groups, monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8)
    k = torch.randn(2, 4 // groups, 6, 8)
    v = torch.randn(2, 4 // groups, 6, 8)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        mask[1, :, :, 4:] = False  # padding on the right of sample 1
        if causal:
            mask &= torch.ones(6, 6, dtype=torch.bool).tril()
    module = _Attn(causal, groups).train()
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, is_causal=causal)
    # the explicit path runs whenever dropout > 0; neutralise the mask to compare the math
    monkeypatch.setattr(fd, "fast_dropout", lambda x, p, training: x)
    out, _ = fd.attention(module, q, k, v, mask, dropout=0.1, is_causal=causal)
    assert torch.allclose(out, ref, atol=1e-5)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while `fn` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _lm_step(model, ids: torch.Tensor) -> tuple[float, dict, int]:
    """One training forward and backward under seed 1: (loss, trainable grads, bytes kept
    for backward)."""
    model.train()
    torch.manual_seed(1)
    out, saved = _saved_bytes(lambda: model(input_ids=ids, labels=ids).loss)
    out.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    return out.item(), grads, saved


@pytest.mark.parametrize("dora", [False, True])
def test_fused_lora_dropout_gives_the_same_steps_with_less_memory(dora, tiny_llama):
    """lora_A with its dropout folded in: the same loss and gradients as PEFT's dropout then
    lora_A under the same seed, the same state-dict keys, and far fewer bytes kept for
    backward. DoRA layers read the dropped input themselves and are left alone."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cfg = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", use_dora=dora
    )
    plain = get_peft_model(base, cfg)
    for p in plain.parameters():  # non-zero lora_B, so lora_A gets a gradient too
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    fd.swap_dropout(plain)
    fused = copy.deepcopy(plain)
    n = fd.fuse_lora_dropout(fused)
    assert n == (0 if dora else 7 * fused.config.num_hidden_layers)
    assert list(fused.state_dict()) == list(plain.state_dict())
    ids = torch.randint(5, 300, (2, 48))
    (loss_a, grads_a, saved_a), (loss_b, grads_b, saved_b) = (
        _lm_step(m, ids) for m in (plain, fused)
    )
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        assert torch.allclose(grads_a[k], grads_b[k], atol=1e-6), k
    if not dora:
        # 2 float copies of each adapted input (scale, dropped input) become a 1-byte mask;
        # in this tiny model the attention and MLP activations are the rest
        assert saved_b < 0.85 * saved_a, (saved_a, saved_b)
        fused.eval()
        with torch.no_grad():  # eval: no dropout, plain linear
            assert torch.equal(fused(input_ids=ids).logits, plain.eval()(input_ids=ids).logits)
