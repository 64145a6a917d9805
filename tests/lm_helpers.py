"""Helpers shared by the end-to-end tests on Hugging Face causal language models."""

import torch

from longctx_compiler.testing import relative_error


def loss_of(out):
    """The loss of a causal-LM output (called with labels)."""
    return out.loss


def lm_call(model, ids):
    """Run a causal LM on ``ids`` predicting ``ids`` (what ``assert_gradients_match`` calls)."""
    return model(ids, labels=ids)


def ids_for(t, seed, batch=2, vocab=64):
    """``[batch, t]`` token ids from a seeded generator."""
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


def worst_gradient_error(model, reference_grads, ids):
    """The largest relative error of ``model``'s loss and parameter gradients on ``ids``
    against ``reference_grads`` (as returned by :func:`loss_and_grads`)."""
    return max(relative_error(a, b) for a, b in zip(loss_and_grads(model, ids), reference_grads))


def loss_and_grads(model, ids):
    """``[loss, *parameter gradients]`` of one causal-LM step (gradients freshly computed)."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]
