import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.data.packing import batch_indices, pack, split_documents
from pipeline.data.tokenizer import train_bpe

DOCS = [f"document {i} says hello to the number {i * 7}." for i in range(200)]


def test_split_is_by_document_and_disjoint():
    tr, va = split_documents(DOCS, 0.1, seed=3)
    assert len(va) == 20 and len(tr) == 180 and not set(tr) & set(va)
    assert split_documents(DOCS, 0.1, seed=3) == (tr, va)


def test_pack_separates_documents_with_the_end_token():
    tok = train_bpe(DOCS, 300, 1)
    blocks = pack(DOCS[:10], tok, 16)
    flat = blocks.flatten().tolist()
    assert blocks.shape[1] == 16 and tok.eos_token_id in flat
    first = tok(DOCS[0], add_special_tokens=False)["input_ids"]
    assert flat[: len(first) + 1] == first + [tok.eos_token_id]
    with pytest.raises(UserError, match="less than one block"):
        pack(DOCS[:1], tok, 4096)


def test_batches_are_disjoint_across_ranks_and_replayable():
    n, bs = 50, 4
    seen = [batch_indices(n, bs, step=3, micro=0, accum=1, world=2, rank=r, seed=1) for r in (0, 1)]
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert torch.equal(seen[0], batch_indices(n, bs, 3, 0, 1, 2, 0, 1))  # a resumed run sees the same batch
    # one epoch of a single process covers every block exactly once
    epoch = torch.cat([batch_indices(48, 4, s, 0, 1, 1, 0, 5) for s in range(12)])
    assert sorted(epoch.tolist()) == list(range(48))
