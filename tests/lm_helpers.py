"""Helpers shared by the end-to-end tests on Hugging Face causal language models."""

import torch


def loss_of(out):
    """The loss of a causal-LM output (called with labels)."""
    return out.loss


def lm_call(model, ids):
    """Run a causal LM on ``ids`` predicting ``ids`` (what ``assert_gradients_match`` calls)."""
    return model(ids, labels=ids)


def ids_for(t, seed, batch=2, vocab=64):
    """``[batch, t]`` token ids from a seeded generator."""
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))
