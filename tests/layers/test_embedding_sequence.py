"""A vocab-parallel embedding whose output starts sequence parallelism (torch's
`RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))` on an embedding, as in
torchtitan): the ranks' partial lookups are reduce-scattered onto this rank's sequence piece.
Against one nn.Embedding in float64 on 2 gloo ranks: the output piece, and the gradient of the
local rows (the backward all-gathers the pieces' gradients), with a padding index and ids on
both ranks' rows; a sequence that does not divide, and the hidden split, are refused by name.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fusedpar.layers import shard_embedding
from tests.layers.common import check

DT = torch.float64


def _run_sequence_pieces(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    ref = nn.Embedding(26, 7, padding_idx=3, dtype=DT)  # 13 rows per rank, a hidden size no tile divides
    emb = copy.deepcopy(ref)
    shard_embedding(emb, "embedding_rowwise", group=group, name="tok_embeddings", sequence_dim=1)
    ids = torch.randint(0, 26, (3, 6), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 3  # the padding row: no gradient
    dy = torch.randn(3, 6, 7, generator=torch.Generator().manual_seed(2), dtype=DT)
    y_ref = ref(ids)
    (y_ref * dy).sum().backward()
    y = emb(ids)
    piece = lambda t: t.chunk(world, 1)[rank]  # noqa: E731
    check("output", y, piece(y_ref), DT, f"rank {rank}")
    (y * piece(dy)).sum().backward()
    check("weight grad", emb.weight.grad, ref.weight.grad.chunk(world, 0)[rank], DT, f"rank {rank}")
    with pytest.raises(ValueError, match=r"tok_embeddings: output: expected dim 1 .* multiple of the world size"):
        emb(ids[:, :5])
    with pytest.raises(ValueError, match=r"hidden: sequence_dim: expected None for 'embedding_colwise'"):
        shard_embedding(nn.Embedding(26, 8, dtype=DT), "embedding_colwise", group=group, name="hidden", sequence_dim=1)
    return True


def test_vocab_parallel_embedding_reduce_scatters_onto_sequence_pieces(dist2):
    assert dist2.run(_run_sequence_pieces) == [True, True]
