"""CPU training kernels: same maths as stock dropout and SDPA, only a different random stream."""

import pytest
import torch

from distilray.cpu_kernels import CpuDropout, cpu_attention, drop_mask, use_cpu_training_kernels
from distilray.model import load_classifier, resolve_model


def test_drop_mask_rate_is_p_and_follows_torch_manual_seed():
    torch.manual_seed(3)
    a = drop_mask((400, 1000), 0.1)
    torch.manual_seed(3)
    b = drop_mask((400, 1000), 0.1)
    c = drop_mask((400, 1000), 0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert abs(a.float().mean().item() - 0.1) < 0.003  # 400k draws: 5 sigma ≈ 0.0024
    assert not drop_mask((1000,), 0.0).any()


def test_cpu_dropout_scales_kept_values_and_masks_the_gradient():
    x = torch.randn(200, 500, requires_grad=True)
    layer = CpuDropout(0.25).train()
    y = layer(x)
    dropped = y == 0
    assert abs(dropped.float().mean().item() - 0.25) < 0.01
    assert torch.allclose(y[~dropped], x[~dropped] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, (~dropped).float() / 0.75)
    assert torch.equal(layer.eval()(x), x)


class _Training(torch.nn.Module):
    training = True


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_matches_sdpa_when_nothing_is_dropped(mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[1, ..., 6:] = False  # second sequence padded after 6 tokens
    mask = {"none": None, "bool": keep,
            "float": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)}[mask_kind]
    weights = torch.randn(2, 10, 3, 8)
    # p = 1e-9 rounds to a zero-probability mask, so the outputs must equal SDPA without dropout
    ours, _ = cpu_attention(_Training(), q, k, v, mask, dropout=1e-9, scaling=0.3)
    (ours * weights).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    (ref * weights).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    for mine, t in zip(grads, (q, k, v), strict=True):
        assert torch.allclose(mine, t.grad, atol=1e-4)


def test_attention_dropout_drops_attention_weights_at_rate_p():
    q = torch.zeros(4, 2, 64, 8)  # uniform attention: every weight is 1/64
    k = torch.zeros(4, 2, 64, 8)
    v = torch.eye(64)[None, None].expand(4, 2, 64, 64).contiguous()  # output = the dropped weights
    out, _ = cpu_attention(_Training(), q, k, v[..., :64], None, dropout=0.2)
    w = out.transpose(1, 2)
    zero = w == 0
    assert abs(zero.float().mean().item() - 0.2) < 0.02
    assert torch.allclose(w[~zero], torch.full_like(w[~zero], 1 / 64 / 0.8))


def test_model_with_kernels_trains_like_stock_without_dropout_and_saves_loadable(tmp_path):
    source = resolve_model("tiny")
    stock = load_classifier(source, ["neg", "pos"], seed=0)
    fast = load_classifier(source, ["neg", "pos"], seed=0)
    for m in (stock, fast):
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 1e-9
    dropouts = sum(type(m) is torch.nn.Dropout for m in fast.modules())
    assert use_cpu_training_kernels(fast) == [f"{dropouts} dropout layers", "attention"]
    assert not any(type(m) is torch.nn.Dropout for m in fast.modules())
    ids = torch.randint(1000, 2000, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[2, 7:] = 0  # padding must stay masked under the new attention
    stock.train()
    fast.train()
    a = stock(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    b = fast(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 1]))
    assert torch.allclose(a.logits, b.logits, atol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, pa_), pb in zip(stock.named_parameters(), fast.parameters(), strict=True):
        if pa_.grad is not None:
            assert torch.allclose(pa_.grad, pb.grad, atol=1e-5), name
    fast.save_pretrained(tmp_path)
    assert "distilray_cpu" not in (tmp_path / "config.json").read_text()
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path)(input_ids=ids)


def test_kernels_run_under_bf16_autocast():
    model = load_classifier(resolve_model("tiny"), ["neg", "pos"], seed=0)
    use_cpu_training_kernels(model)
    model.train()
    ids = torch.randint(1000, 2000, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, 9:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
