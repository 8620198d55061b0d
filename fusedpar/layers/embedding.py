"""Parallel embeddings and the vocabulary-parallel LM head with its loss.

Embeddings are sharded in place (the `nn.Embedding` and any subclass forward, e.g. Gemma's
scaled embedding, keep running; hooks adapt their input and output):

    embedding_rowwise (vocab-parallel)    weight rows [V/world, H]; ids outside this rank's
                                          rows look up row 0 and are zeroed; all-reduce sums
                                          the ranks' rows (each id is owned by one rank)
    embedding_colwise (hidden-parallel)   weight columns [V, H/world]; all-gather on the
                                          last dim (backward keeps this rank's columns)

    forward   vocab:  y_full = all_reduce(mask · E_shard[ids − start])    all-reduce
              hidden: y_full = all_gather(E_shard[ids], dim=-1)           all-gather
    wgrad     dE_shard from this rank's ids / columns                      no comm

The LM head with `loss_parallel=True` (`install_loss_parallel`) stays vocab-split: the head
is column-parallel without a gather, the model returns logits `[.., V/world]`, and the loss
is `vocab_parallel_cross_entropy`, which never builds full-vocab logits on any rank:

    forward   per token: global max and Σexp over ranks (one all-gather of 2 floats/token),
              the label's logit from the rank that owns it (one all-reduce)
    backward  dlogits_shard = softmax_shard − onehot_shard, local (no comm)

A tied input embedding (`tie_word_embeddings`) becomes vocab-parallel over the same local
rows, so the tie survives and its gradient is the sum of both uses, as in one process.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..comm import check_group, get_communicator
from .linear import gather_from_shard, reduce_scatter_to_shard
from .partial import reduce_partial
from .regions import check_sequence_output
from .sharding import ParamShard, local_tensor, shard_parameter

__all__ = ["shard_embedding", "vocab_parallel_cross_entropy", "install_loss_parallel", "loss_parallel_plan",
           "EMBEDDING_STYLES"]

EMBEDDING_STYLES = {"embedding_rowwise": 0, "embedding_colwise": 1}  # style → split dim of the [V, H] weight


def check_embedding(module: nn.Module, style: str, world: int, *, where: str) -> None:
    """Raise (no comm) unless `module` can be sharded with `style` over `world` ranks."""
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"{where}: expected an nn.Embedding, got {type(module).__name__}")
    if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
        raise ValueError(f"{where}: expected an embedding without max_norm / scale_grad_by_freq / sparse "
                         f"(they need the whole table), got max_norm={module.max_norm}, "
                         f"scale_grad_by_freq={module.scale_grad_by_freq}, sparse={module.sparse}")
    ParamShard(EMBEDDING_STYLES[style]).check(module.weight.shape, world, where=f"{where}: weight")


def shard_embedding(module: nn.Embedding, style: str, *, group: dist.ProcessGroup, comm: str = "torch",
                    name: str = "embedding", sequence_dim: int | None = None) -> None:
    """Shard `module` in place: "embedding_rowwise" (vocab rows) or "embedding_colwise" (hidden columns).

    Input: token ids, replicated. Output: the full `[.., H]` embedding, replicated; with
    `sequence_dim` (vocab rows only: where sequence parallelism starts at the embedding, as
    torch's `RowwiseParallel(output_layouts=Shard(1))` on it) this rank's piece of that dim,
    the ranks' partial lookups reduce-scattered onto it (half an all-reduce's traffic; the
    backward all-gathers the pieces' gradients).
    """
    group = check_group(group, arg=f"{name}: group")
    world = dist.get_world_size(group)
    check_embedding(module, style, world, where=name)
    dim = EMBEDDING_STYLES[style]
    if sequence_dim is not None and dim != 0:
        raise ValueError(f"{name}: sequence_dim: expected None for {style!r} (only the vocab split reduce-scatters "
                         f"onto sequence pieces), got {sequence_dim}")
    rows = module.weight.shape[0]
    shard_parameter(module, "weight", ParamShard(dim), group=group, where=name)
    if dim == 1:
        module.embedding_dim = local_tensor(module.weight).shape[1]
        module.register_forward_hook(lambda mod, args, y: gather_from_shard(y, group=group, dim=-1, comm=comm))
        return
    _vocab_parallel_hooks(module, start=dist.get_rank(group) * (rows // world), rows=rows // world, group=group,
                          comm=comm, sequence_dim=sequence_dim, name=name)


def _vocab_parallel_hooks(module: nn.Embedding, *, start: int, rows: int, group: dist.ProcessGroup, comm: str,
                          sequence_dim: int | None = None, name: str = "embedding") -> None:
    pad = module.padding_idx
    module.padding_idx = pad - start if pad is not None and start <= pad < start + rows else None
    masks: list[Tensor] = []

    def pre_hook(mod: nn.Module, args: tuple) -> tuple:
        ids = args[0]
        local = ids - start
        outside = (local < 0) | (local >= rows)
        masks.append(outside)
        return (local.masked_fill(outside, 0), *args[1:])

    def hook(mod: nn.Module, args: tuple, y: Tensor) -> Tensor:
        outside = masks.pop()
        partial = y.masked_fill(outside.unsqueeze(-1), 0.0)
        if sequence_dim is None:
            return reduce_partial(partial, group=group, comm=comm)
        check_sequence_output(y, sequence_dim, dist.get_world_size(group), where=name)
        return reduce_scatter_to_shard(partial, group=group, dim=sequence_dim, comm=comm)

    module.register_forward_pre_hook(pre_hook)
    module.register_forward_hook(hook)


# --------------------------------------------------------------------------------------------
# Vocab-parallel cross-entropy
# --------------------------------------------------------------------------------------------


class _VocabParallelCrossEntropyFn(torch.autograd.Function):
    """Per-token `logsumexp(logits_full) − logits_full[label]` from vocab shards.

    forward   logits_shard [T, V/world] → loss [T]; all-gather (max, Σexp) per token;
              all-reduce the label logit (one rank owns each label)
    dgrad     dlogits_shard = (softmax_shard − onehot_shard) · dloss     no comm
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, labels: Tensor, start: int, group: dist.ProcessGroup, comm: str,
                ignore_index: int) -> Tensor:
        communicator = get_communicator(group, comm)
        world = communicator.world_size
        x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32, as HF's loss
        local_max = x.max(-1).values
        local_sum = torch.exp(x - local_max.unsqueeze(-1)).sum(-1)
        stats = torch.stack([local_max, local_sum]).contiguous()  # [2, T]
        gathered = stats.new_empty(world * stats.numel())
        communicator.all_gather(gathered, stats.view(-1)).wait()
        maxes, sums = gathered.view(world, 2, -1).unbind(1)  # [world, T] each
        global_max = maxes.max(0).values
        lse = global_max + torch.log((sums * torch.exp(maxes - global_max)).sum(0))
        local = labels - start
        owned = (local >= 0) & (local < x.shape[-1]) & (labels != ignore_index)
        picked = x.gather(-1, local.clamp(0, x.shape[-1] - 1).unsqueeze(-1)).squeeze(-1)
        label_logit = torch.where(owned, picked, torch.zeros_like(picked)).contiguous()
        communicator.all_reduce(label_logit).wait()
        valid = labels != ignore_index
        loss = torch.where(valid, lse - label_logit, torch.zeros_like(lse))
        ctx.save_for_backward(x, lse, local, owned, valid)
        ctx.dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, dloss: Tensor) -> tuple[Tensor | None, ...]:
        x, lse, local, owned, valid = ctx.saved_tensors
        grad = torch.exp(x - lse.unsqueeze(-1))
        rows = torch.nonzero(owned).squeeze(-1)
        grad[rows, local[rows]] -= 1.0
        grad *= (dloss * valid).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(logits_shard: Tensor, labels: Tensor, *, group: dist.ProcessGroup,
                                 ignore_index: int = -100, reduction: str = "mean", comm: str = "torch") -> Tensor:
    """Cross-entropy of logits split on the vocabulary (last) dim across `group`.

    `logits_shard` `[.., V/world]` is this rank's vocabulary slice (rank r holds ids
    `[r·V/world, (r+1)·V/world)`), `labels` `[..]` the global ids, replicated. The result
    (replicated) equals `F.cross_entropy(full_logits, labels, ignore_index=..., reduction=...)`
    ("mean" over non-ignored labels, "sum", or "none").
    """
    group = check_group(group, arg="vocab_parallel_cross_entropy: group")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"vocab_parallel_cross_entropy: reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    if tuple(labels.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(f"vocab_parallel_cross_entropy: labels: expected shape {list(logits_shard.shape[:-1])} "
                         f"(logits_shard without its vocab dim), got {list(labels.shape)}")
    start = dist.get_rank(group) * logits_shard.shape[-1]
    flat = logits_shard.reshape(-1, logits_shard.shape[-1])
    loss = _VocabParallelCrossEntropyFn.apply(flat, labels.reshape(-1), start, group, comm, ignore_index)
    if reduction == "none":
        return loss.view(labels.shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (labels != ignore_index).sum()


def _module_path(model: nn.Module, module: nn.Module | None) -> str | None:
    for name, m in model.named_modules():
        if m is module and name:
            return name
    return None


def loss_parallel_plan(model: nn.Module, plan: dict[str, str]) -> dict[str, str]:
    """`plan` plus the vocab-split LM head ("colwise", no gather) and, when the input
    embedding shares its weight, the input embedding vocab-split the same way, whatever the
    plan said for it (checks, no comm; ties.py makes the two one parameter again)."""
    where = "parallelize(loss_parallel=True)"
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    head_path = _module_path(model, head)
    if not isinstance(head, nn.Linear) or head_path is None or not hasattr(model, "loss_function"):
        raise ValueError(f"{where}: expected a Hugging Face causal LM (get_output_embeddings() an nn.Linear, a "
                         f"loss_function), got {type(model).__name__} with head {type(head).__name__}")
    plan = dict(plan)
    plan[head_path] = "colwise"
    embed = model.get_input_embeddings()
    if isinstance(embed, nn.Embedding) and embed.weight is head.weight:
        plan[_module_path(model, embed)] = "embedding_rowwise"
    return plan


def install_loss_parallel(model: nn.Module, *, group: dist.ProcessGroup, comm: str = "torch") -> None:
    """Make a Hugging Face causal LM compute its loss from vocab-split logits.

    Its LM head must already be column-parallel without a gather (`loss_parallel_plan`):
    `model(...).logits` is then `[.., V/world]`, this rank's vocabulary slice. The
    replacement `loss_function` is Hugging Face's ForCausalLM loss (labels shifted left,
    `ignore_index`, mean over the labelled tokens or sum / `num_items_in_batch`) on
    `vocab_parallel_cross_entropy`.
    """

    def loss_function(logits: Tensor, labels: Tensor, vocab_size: int | None = None,
                      num_items_in_batch: Tensor | int | None = None, ignore_index: int = -100,
                      shift_labels: Tensor | None = None, **kwargs: Any) -> Tensor:
        if shift_labels is None:
            labels = F.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:].contiguous()
        shift_labels = shift_labels.to(logits.device)
        reduction = "sum" if num_items_in_batch is not None else "mean"
        loss = vocab_parallel_cross_entropy(logits, shift_labels, group=group, ignore_index=ignore_index,
                                            reduction=reduction, comm=comm)
        if num_items_in_batch is not None:
            loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                           else num_items_in_batch)
        return loss

    model.loss_function = loss_function
