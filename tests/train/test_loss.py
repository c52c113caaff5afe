"""The fused linear + cross-entropy against plain full-logits cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunelab.train.loss import IGNORE_INDEX, chunked_cross_entropy


def reference(hidden, weight, labels):
    logits = F.linear(hidden[:, :-1], weight).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        reduction="sum",
        ignore_index=IGNORE_INDEX,
    )


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("train_head", [False, True])
def test_loss_and_grads_match_full_logits(chunk, train_head):
    torch.manual_seed(0)
    hidden = torch.randn(2, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=train_head)
    labels = torch.randint(0, 50, (2, 11))
    labels[0, :4] = IGNORE_INDEX
    loss, n = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    (loss * 0.5).backward()
    grads = (hidden.grad.clone(), weight.grad.clone() if train_head else None)
    hidden.grad = None
    if train_head:
        weight.grad = None
    expected = reference(hidden, weight, labels)
    (expected * 0.5).backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grads[0], hidden.grad)
    if train_head:
        torch.testing.assert_close(grads[1], weight.grad)


@pytest.mark.parametrize("spread", [1.0, 40.0])
def test_extreme_logits_match_full_logits(spread):
    """Logits spread over thousands: most softmax terms underflow (the CPU path clamps them
    out of the denormal range); loss and gradients still match, and stay finite."""
    torch.manual_seed(1)
    hidden = (torch.randn(3, 9, 16) * spread).requires_grad_()
    weight = torch.randn(64, 16) * spread
    labels = torch.randint(0, 64, (3, 9))
    loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=5)
    loss.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    expected = reference(hidden, weight, labels)
    expected.backward()
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(grad, hidden.grad, rtol=1e-4, atol=1e-4)


def test_all_masked_batch_gives_zero_with_a_graph():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    loss, n = chunked_cross_entropy(hidden, torch.randn(10, 8), torch.full((1, 4), IGNORE_INDEX))
    assert n == 0 and float(loss) == 0.0
    loss.backward()
    assert hidden.grad is not None


def test_no_grad_evaluation():
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 6, 8), torch.randn(20, 8)
    labels = torch.randint(0, 20, (2, 6))
    with torch.no_grad():
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=3)
    torch.testing.assert_close(loss, reference(hidden, weight, labels))


@pytest.mark.parametrize(
    ("bias", "scale", "softcap"), [(True, 1.0, None), (False, 0.25, None), (True, 2.0, 3.0)]
)
def test_head_with_bias_scale_and_softcap_matches_full_logits(bias, scale, softcap):
    """The heads of models trained through transformers (phi, cohere / granite, gemma2)."""
    from tunelab.train.loss import OutputHead

    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = (torch.randn(50, 16) * 2).requires_grad_()
    b = torch.randn(50, requires_grad=True) if bias else None
    labels = torch.randint(0, 50, (2, 9))
    head = OutputHead(weight, b, scale, softcap)
    loss, _ = chunked_cross_entropy(hidden, head, labels, chunk_tokens=5)
    loss.backward()
    ours = [t.grad.clone() for t in (hidden, weight, b) if t is not None]
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    logits = F.linear(hidden[:, :-1], weight, b) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    expected = F.cross_entropy(logits.reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(head.logits(hidden)[:, :-1], logits.detach())
    for got, want in zip(ours, [t.grad for t in (hidden, weight, b) if t is not None], strict=True):
        torch.testing.assert_close(got, want)
