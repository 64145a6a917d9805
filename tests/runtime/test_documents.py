"""Where ``packed_documents`` takes the documents from: ``seq_idx``, ``cu_seqlens`` and
restarting ``position_ids``, normalised to ``0, 1, ...`` per row and joined."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx_compiler.runtime.documents import PackedDocumentsError, document_ids_of, joint_documents


def ids_of(**kwargs):
    tokens = torch.zeros(kwargs.pop("shape", (2, 6)), dtype=torch.long)
    documents, rest = document_ids_of((tokens,), kwargs)
    return documents.tolist(), rest


def test_each_source_and_their_join():
    # seq_idx: a new document wherever it changes (any values), numbered 0, 1, ... per row
    assert ids_of(seq_idx=torch.tensor([[5, 5, 2, 2, 5, 5], [1, 1, 1, 1, 1, 1]]))[0] == [[0, 0, 1, 1, 2, 2], [0] * 6]
    # cu_seqlens over the B·T tokens in row order: a row boundary always starts a document
    assert ids_of(cu_seqlens=torch.tensor([0, 3, 8, 12]))[0] == [[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    # restarting positions ([1, T] broadcast over the batch): a new document where the step is not 1
    assert ids_of(position_ids=torch.tensor([[0, 1, 2, 0, 1, 5]]))[0] == [[0, 0, 0, 1, 1, 2]] * 2
    # joined: a boundary from either
    joined, rest = ids_of(seq_idx=torch.tensor([[0, 0, 0, 0, 1, 1]] * 2), position_ids=torch.tensor([[0, 1, 0, 1, 2, 3]] * 2))
    assert joined == [[0, 0, 1, 1, 2, 2]] * 2
    # ours are taken out of the call, the model's position_ids stay
    assert set(rest) == {"position_ids"}
    # none given: each row is one document
    assert ids_of()[0] == [[0] * 6] * 2


@pytest.mark.parametrize("kwargs, message", [
    ({"cu_seqlens": torch.tensor([0, 5, 11])}, "rise from 0 to the 12 tokens"),
    ({"cu_seqlens": torch.tensor([0, 7, 5, 12])}, "rise from 0"),
    ({"cu_seqlens": torch.tensor([[0, 12]])}, "1-D"),
    ({"seq_idx": torch.zeros(2, 6)}, "int32/int64"),
    ({"seq_idx": torch.zeros(3, 6, dtype=torch.long)}, r"expected \[2, 6\]"),
    ({"position_ids": torch.zeros(2, 5, dtype=torch.long)}, r"expected \[2, 6\]"),
])
def test_bad_document_inputs_raise(kwargs, message):
    with pytest.raises(PackedDocumentsError, match=message):
        ids_of(**kwargs)


@settings(max_examples=50, deadline=None)
@given(a=st.lists(st.integers(0, 3), min_size=1, max_size=12), b=st.lists(st.integers(0, 3), min_size=1, max_size=12))
def test_joint_ids_separate_exactly_what_either_separates_and_keep_order(a, b):
    n = min(len(a), len(b))
    a, b = torch.tensor(sorted(a[:n])), torch.tensor(sorted(b[:n]))
    j = joint_documents(a, b)
    same = j[:, None] == j[None, :]
    assert torch.equal(same, (a[:, None] == a[None, :]) & (b[:, None] == b[None, :]))
    assert bool((j[1:] >= j[:-1]).all())  # non-decreasing: the attention op's pair skipping holds
