"""Tied weights through sharding (fusedpar/plan/ties.py): a plan that splits one member of a
tie (the input embedding, or the LM head that shares its table) splits the other the same way,
and the two stay one parameter, so training matches the single-process model."""
from __future__ import annotations

import pytest
import torch

from fusedpar.plan import parallelize
from fusedpar.plan.ties import tied_groups
from tests.models.families import build
from tests.models.sweep import run_cases

TIED = dict(tie_word_embeddings=True)
# transformers 5.17's own Llama plan has "embed_tokens": "embedding_rowwise" (5.23's does not)
EMBED_ROWS = ("auto", {"model.embed_tokens": "embedding_rowwise"})  # the head follows: vocab-split, gathered
HEAD_ROWS = ("auto", {"lm_head": "colwise_gather_output"})          # the embedding follows: vocab-parallel
EMBED_COLS = ("auto", {"model.embed_tokens": "embedding_colwise"})  # the head follows: hidden-split input


def test_a_split_tie_stays_one_parameter_and_trains_like_one_process(dist2, dist4):
    # run_family compares logits, loss and every gradient, checks the ties, runs AdamW steps in
    # lockstep and reloads the gathered state dict into a fresh single-process model
    cases = [dict(family="llama", config=TIED, plan=EMBED_ROWS, sp=False, steps=3, state_dict=True),
             dict(family="llama", config=TIED, plan=EMBED_ROWS, sp=True, steps=2),
             dict(family="llama", config=TIED, plan=HEAD_ROWS, sp=False, steps=2, state_dict=True),
             dict(family="llama", config=TIED, plan=EMBED_COLS, sp=True, steps=2, state_dict=True)]
    results = dist2.run(run_cases, cases)[0]
    assert results[0]["styles"] == ["colwise", "colwise_gather_output", "embedding_rowwise", "rowwise"]
    assert "rowwise_split_input" in results[3]["styles"] and "embedding_colwise" in results[3]["styles"]
    dist4.run(run_cases, [dict(family="llama", config=TIED, plan=EMBED_ROWS, sp=True, steps=2)])


def _run_refused(group, plan, match):
    model = build("llama", **TIED)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        parallelize(model, plan, group=group, kernel="torch")
    # refused while checking: nothing converted, the tie intact
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(tied_groups(model)) == 1
    return True


@pytest.mark.parametrize("plan, match", [
    ({"model.embed_tokens": "embedding_rowwise", "lm_head": "rowwise_split_input"},
     r"tied parameters \['model.embed_tokens.weight', 'lm_head.weight'\]: expected the plan to split every member "
     r"on the same dim .*got \{'model.embed_tokens': 'embedding_rowwise', 'lm_head': 'rowwise_split_input'\}"),
    ({"model.embed_tokens": "embedding_rowwise", "lm_head": "replicate"},
     r"tied parameters .*got \{'model.embed_tokens': 'embedding_rowwise', 'lm_head': 'replicate'\}"),
], ids=["different-dims", "replicated-head"])
def test_a_plan_that_would_cut_a_tie_is_refused_before_any_change(dist2, plan, match):
    assert dist2.run(_run_refused, plan, match) == [True, True]
