"""Training set-ups beyond plain fp32: frozen weights, autocast, padding masks.

Each case runs on 2 gloo ranks against the single-process module built from the same
weights. These are the silent failure modes of a tensor-parallel layer: a frozen layer
that stops gradients reaching the layers before it, parameters that `parallelize`
unfreezes, a dtype error under `torch.autocast`, attention that forgets causality when
given a padding mask.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fusedpar.layers import ColumnParallelLinear, ParallelAttention, ParallelMLP, ReplicatedColumnLinear, RowParallelLinear
from fusedpar.layers.attention import _with_causal
from tests.layers.common import check

# bf16 autocast: the parallel and single-process runs round at different points (chunked
# reductions), each output a few bf16 ulps (eps 7.8e-3) apart.
BF16_TOL = 3e-2


def _run_frozen(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    gate, up, down = nn.Linear(16, 32, bias=False), nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)
    ref = lambda x: down(F.silu(gate(x)) * up(x))  # noqa: E731
    for kernel in ("torch", "triton"):
        mlp = ParallelMLP.from_linears(gate=copy.deepcopy(gate), up=copy.deepcopy(up), down=copy.deepcopy(down),
                                       group=group, kernel=kernel)
        mlp.requires_grad_(False)                      # frozen block, trainable input (e.g. LoRA upstream)
        x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y = mlp(x)
        assert y.requires_grad, f"kernel={kernel}: a frozen MLP cut the graph: its output needs no grad"
        y.sum().backward()
        ref(x_ref).sum().backward()
        check("frozen MLP dx", x.grad, x_ref.grad, torch.float32, f"rank {rank} kernel={kernel}")
    # from_linear keeps every parameter's requires_grad
    lin = nn.Linear(8, 4 * world)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    for layer in (ColumnParallelLinear.from_linear(lin, group=group), RowParallelLinear.from_linear(
            nn.Linear(4 * world, 8).requires_grad_(False), group=group),
            ReplicatedColumnLinear.from_linear(lin, group=group, parts=world)):
        trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
        assert not trainable, f"{type(layer).__name__}.from_linear unfroze {trainable}"
    lin.bias.requires_grad_(True)
    col = ColumnParallelLinear.from_linear(lin, group=group)
    assert not col.weight.requires_grad and col.bias.requires_grad
    return True


def test_frozen_weights_keep_gradients_flowing_and_stay_frozen(dist2):
    dist2.run(_run_frozen)


def _run_autocast(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    up, down = nn.Linear(16, 8 * world), nn.Linear(8 * world, 16)
    for sp in (False, True):
        col = ColumnParallelLinear.from_linear(copy.deepcopy(up), group=group, sequence_parallel=sp, kernel="torch")
        row = RowParallelLinear.from_linear(copy.deepcopy(down), group=group, sequence_parallel=sp, kernel="torch")
        ref_up, ref_down = copy.deepcopy(up), copy.deepcopy(down)
        x_full = torch.randn(2, 4 * world, 16, generator=torch.Generator().manual_seed(2))
        x = (x_full.chunk(world, 1)[rank] if sp else x_full).clone().requires_grad_()
        x_ref = x_full.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = row(F.gelu(col(x)))
            y_ref = ref_down(F.gelu(ref_up(x_ref)))
        case = f"rank {rank} sequence_parallel={sp}"
        assert y.dtype == torch.bfloat16, f"{case}: autocast output dtype {y.dtype}"
        check("autocast y", y, y_ref.chunk(world, 1)[rank] if sp else y_ref, torch.float32, case, tol=BF16_TOL)
        y.float().pow(2).sum().backward()
        y_ref.float().pow(2).sum().backward()
        assert col.weight.grad.dtype == torch.float32 and row.weight.grad.dtype == torch.float32, case
        check("autocast dx", x.grad, x_ref.grad.chunk(world, 1)[rank] if sp else x_ref.grad, torch.float32, case,
              tol=BF16_TOL)
        check("autocast dW up", col.weight.grad, ref_up.weight.grad.chunk(world, 0)[rank], torch.float32, case,
              tol=BF16_TOL)
        check("autocast dW down", row.weight.grad, ref_down.weight.grad.chunk(world, 1)[rank], torch.float32, case,
              tol=BF16_TOL)
    return True


def test_autocast_bf16_training_with_fp32_weights(dist2):
    dist2.run(_run_autocast)


def test_causal_attention_keeps_causality_with_a_padding_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    everyone = torch.ones(6, 6, dtype=torch.bool)
    causal = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=_with_causal(everyone, 6, 6)), causal)
    additive = torch.zeros(6, 6)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=_with_causal(additive, 6, 6)), causal)
    padded = everyone.clone()
    padded[:, 0] = False  # nobody may attend to token 0 (padding), except through causality rules
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=padded & torch.ones(6, 6, dtype=torch.bool).tril())
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=_with_causal(padded, 6, 6)), expected)


def _run_attention_mask(group):
    rank = dist.get_rank(group)
    torch.manual_seed(0)
    q, k, v, o = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 32)
    attn = ParallelAttention.from_linears(q=q, k=k, v=v, o=o, num_heads=4, num_kv_heads=2, group=group,
                                          kernel="torch")
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, :, :2] = False  # sample 0 is left-padded by 2 tokens
    mask[0, :, :2, :2] = True
    y = attn(x, attn_mask=mask)
    y_causal = attn(x)
    # sample 1 has no padding: with the mask it must equal plain causal attention
    check("masked causal attention", y[1], y_causal[1], torch.float32, f"rank {rank}")
    return True


def test_parallel_attention_with_padding_mask_stays_causal(dist2):
    dist2.run(_run_attention_mask)
