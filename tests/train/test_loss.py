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
