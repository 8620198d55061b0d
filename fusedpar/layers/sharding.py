"""Parameters sharded in place: bare `nn.Parameter`s a plan names (MoE experts' 3-D weights,
attention sinks, per-head gate biases), and the layout of every sharded parameter.

A `ParamShard(dim, parts)` says how the unsharded tensor maps to this rank's piece: `dim` is
cut into `parts` packed blocks (`[gate; up]` is 2 parts, `[q; k; v]` 3), and each block is
split evenly across the ranks, so rank r holds `[block_0[r]; block_1[r]; ...]` along `dim`:

    parts=1   full.chunk(world, dim)[rank]                              (colwise / rowwise)
    parts=2   cat([b.chunk(world, dim)[rank] for b in full.chunk(2, dim)], dim)   (packed)

`shard_parameter` replaces a module's parameter by its local piece and records the layout on
the module, so `full_state_dict` can gather it back and tests can slice a reference to
compare with (`local_shard`).

How torch sees a sharded parameter: as a DTensor (`tp_parameter`). Every parameter of a
parallelized model is an `nn.Parameter` wrapping a DTensor on the TP mesh, so DCP,
`get_state_dict`, `clip_grad_norm_`, the optimizers and FSDP2 know each rank holds a piece:

    replicated            Replicate()                  global shape = local shape
    ParamShard(dim)       Shard(dim)                   global = local with dim x world
    ParamShard(dim, P)    Shard(dim + 1) of the global tensor with `dim` unflattened to
                          (P, size / P): rank r's [block_0[r]; block_1[r]] is then one
                          contiguous box [:, r*m:(r+1)*m] of a [P, size/P] view

The packed case is why the unflattened shape: the two (or three) pieces a rank holds are
not one contiguous box of the packed `[gate; up]`, and torch's `_StridedShard` that
describes them is refused by DCP ("overlapping chunks", torch 2.13). In the unflattened
view they are one box, so optimizer state saved at one world size loads exactly at another.
The model's state dict still shows the packed tensor in its own shape (state-dict hooks
gather it, `packed_state_dict_hooks`), so a checkpoint loads into a plain model.

The compute path never dispatches through DTensor: kernels read `local_tensor(p)`, and modules read
`local_param(p)` in forward: the local tensor itself under no_grad (decode: nothing added),
else a plain leaf aliasing it whose accumulated gradient a hook hands on to the DTensor
`.grad` (`_grad_leaf`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..comm import Communicator, check_group, device_mesh, get_communicator
from . import traced

__all__ = ["ParamShard", "shard_parameter", "param_shards", "local_shard", "gather_shard", "tp_parameter",
           "local_tensor", "local_param", "install_local_views", "replicate_parameters", "is_dtensor",
           "register_state_dict_hooks", "param_of", "tracked_version"]


@dataclass(frozen=True)
class ParamShard:
    """`dim` split across ranks, per packed block (`parts` blocks along `dim`)."""

    dim: int
    parts: int = 1

    def check(self, shape: tuple[int, ...] | torch.Size, world: int, *, where: str) -> None:
        """Raise (no comm) unless `dim` divides into `parts` blocks of `world` pieces."""
        if not -len(shape) <= self.dim < len(shape):
            raise ValueError(f"{where}: expected a tensor with a dim {self.dim}, got shape {list(shape)}")
        size = shape[self.dim]
        if size % (self.parts * world):
            what = f"{self.parts} packed parts x " if self.parts > 1 else ""
            raise ValueError(f"{where}: dim {self.dim} of shape {list(shape)}: expected a multiple of "
                             f"{what}the world size {world} = {self.parts * world}, got {size}")

    def local(self, full: Tensor, rank: int, world: int) -> Tensor:
        """This rank's piece of the unsharded `full` (a copy)."""
        blocks = full.chunk(self.parts, self.dim)
        return torch.cat([b.chunk(world, self.dim)[rank] for b in blocks], self.dim).contiguous()

    def gather(self, local: Tensor, comm: Communicator) -> Tensor:
        """The unsharded tensor from every rank's piece (a collective)."""
        world = comm.world_size
        local = local_tensor(local)  # a DTensor parameter's piece
        dim = self.dim % local.ndim
        moved = local.detach().movedim(dim, 0).contiguous()
        flat = moved.new_empty(world * moved.numel())
        comm.all_gather(flat, moved.view(-1)).wait()
        pieces = flat.view(world, self.parts, moved.shape[0] // self.parts, *moved.shape[1:])
        full = pieces.transpose(0, 1).reshape(world * moved.shape[0], *moved.shape[1:])  # block-major
        return full.movedim(0, dim).contiguous()


def shard_parameter(module: nn.Module, name: str, shard: ParamShard, *, group: dist.ProcessGroup,
                    where: str = "shard_parameter") -> None:
    """Replace `module.<name>` by this rank's piece of it (`requires_grad` kept); record the layout."""
    group = check_group(group, arg=f"{where}: group")
    param = module._parameters.get(name)
    if param is None:
        raise ValueError(f"{where}: expected {type(module).__name__}.{name} to be a parameter, got none")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard.check(param.shape, world, where=where)
    with torch.no_grad():
        local = shard.local(local_tensor(param).detach(), rank, world)
    module._parameters[name] = tp_parameter(local, shard, group=group, requires_grad=param.requires_grad)
    register_state_dict_hooks(module)
    install_local_views(module)
    shards = module.__dict__.setdefault("_fusedpar_shards", {})
    shards[name] = (shard, group)
    # declared like the parallel linears' class attributes, which grad_norm and the checkpoint
    # loader and saver read: {name: split dim} (and {name: packed parts} where there are several)
    module.tp_shard_dims = {**getattr(module, "tp_shard_dims", {}), name: shard.dim % local.ndim}
    if shard.parts > 1:
        module.tp_shard_parts = {**getattr(module, "tp_shard_parts", {}), name: shard.parts}


def param_shards(module: nn.Module) -> dict[str, tuple[ParamShard, dist.ProcessGroup]]:
    """`{parameter name: (layout, group)}` recorded on `module` by `shard_parameter`."""
    return dict(module.__dict__.get("_fusedpar_shards", {}))


def gather_shard(module: nn.Module, name: str, comm: str = "torch") -> Tensor:
    """The unsharded value of a parameter sharded by `shard_parameter` (a collective)."""
    shard, group = module.__dict__["_fusedpar_shards"][name]
    return shard.gather(getattr(module, name), get_communicator(group, comm))


def _layout(module: nn.Module, leaf: str) -> tuple[ParamShard, dist.ProcessGroup] | None:
    """How `module.<leaf>` is sharded: recorded by `shard_parameter`, or declared by the
    module's class (`tp_shard_dims`, `tp_shard_parts`: the parallel linears); None: replicated."""
    recorded = param_shards(module).get(leaf)
    if recorded is not None:
        return recorded
    dim = getattr(module, "tp_shard_dims", {}).get(leaf)
    if dim is None:
        return None
    return ParamShard(dim, getattr(module, "tp_shard_parts", {}).get(leaf, 1)), module.spec.group


def local_shard(model: nn.Module, name: str, full: Tensor | None) -> Tensor | None:
    """The part of `full` (an unsharded value of parameter `name`, e.g. its gradient in a
    single-process twin) that this rank stores for it in the parallelized `model`."""
    if full is None:
        return None
    path, _, leaf = name.rpartition(".")
    found = _layout(model.get_submodule(path), leaf)
    if found is None:
        return full
    shard, group = found
    return shard.local(full, dist.get_rank(group), dist.get_world_size(group))



# --------------------------------------------------------------------------------------------
# Parameters as DTensors
# --------------------------------------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def tp_parameter(local_value: Tensor, shard: ParamShard | None, *, group: dist.ProcessGroup,
                 requires_grad: bool = True) -> nn.Parameter:
    """An `nn.Parameter` wrapping a DTensor on `group`'s mesh whose local tensor is
    `local_value` (this rank's piece, in the layout the kernels use; no copy) and whose
    placement says which piece: `shard` None is Replicate(); see the module docstring for
    packed parts. `local_tensor(p)` gives `local_value` back."""
    world = dist.get_world_size(group)
    mesh = device_mesh(group, "cuda" if local_value.is_cuda else "cpu")
    shape = list(local_value.shape)
    packed = None
    if shard is None:
        placement: Any = Replicate()
        dt_local, global_shape = local_value, shape
    else:
        dim = shard.dim % local_value.ndim
        if shard.parts > 1:
            packed = dim
            dt_local = local_value.unflatten(dim, (shard.parts, shape[dim] // shard.parts))
            global_shape = list(dt_local.shape)
            global_shape[dim + 1] *= world
            placement = Shard(dim + 1)
        else:
            dt_local, global_shape = local_value, shape
            global_shape[dim] *= world
            placement = Shard(dim)
    dt = DTensor.from_local(dt_local.detach(), mesh, [placement], run_check=False, shape=torch.Size(global_shape),
                            stride=_contiguous_stride(tuple(global_shape)))
    param = nn.Parameter(dt, requires_grad=requires_grad)
    _OWNERS[id(param._local_tensor)] = weakref.ref(param)
    # local_tensor(p) flattens dims (packed, packed + 1) back; set also when None: a missing
    # attribute on a tensor costs a raised AttributeError on every lookup (hot path)
    param._fusedpar_packed = packed
    return param


# id(local tensor) -> the DTensor parameter holding it: in-place writes through the DTensor
# (`p.mul_(2)` under no_grad, an optimizer step) bump the DTensor's version, not the local's
_OWNERS: dict[int, weakref.ref] = {}


def version_of(t: Tensor) -> int:
    """A counter that moves whenever `t`'s values are written in place, also through the
    DTensor parameter whose local tensor it is (caches keyed on a weight's version use it)."""
    owner = _OWNERS.get(id(t))
    p = owner() if owner is not None else None
    return t._version + (p._version if p is not None and p._local_tensor is t else 0)


def tracked_version(t: Tensor) -> int | None:
    """`version_of(t)` where that counter sees every write to `t`: `t` is the local tensor of a
    DTensor parameter made by `tp_parameter`. None for any other tensor, whose writes may
    bypass its counter: FSDP2 refills its unsharded parameters after each all-gather under
    `torch.autograd._unsafe_preserve_version_counter`, often at the same address, so a cache
    keyed on their version and address would silently serve the weights of an earlier step."""
    owner = _OWNERS.get(id(t))
    p = owner() if owner is not None else None
    if p is None or p._local_tensor is not t:
        return None
    return t._version + p._version


def _kernel_layout(lt: Tensor, packed: int | None) -> Tensor:
    """A DTensor's local tensor in the kernels' layout: packed parts flattened back."""
    return lt.flatten(packed, packed + 1) if packed is not None else lt


def local_tensor(t: Tensor) -> Tensor:
    """This rank's piece of `t` as a plain tensor in the kernels' layout (no autograd link):
    the local tensor of a DTensor (packed parts flattened back), `t` itself otherwise."""
    if not isinstance(t, DTensor):
        return t
    return _kernel_layout(t._local_tensor, getattr(t, "_fusedpar_packed", None))


class _LocalView(torch.autograd.Function):
    """`p` (a DTensor that is not a leaf: computed in forward) → its local tensor in the
    kernels' layout, as a view, keeping `p`'s autograd history.

    forward   the local tensor (a view; packed parts flattened)     no comm
    backward  the local gradient wrapped as a DTensor with `p`'s placement; no comm:
              reductions of partial gradients are the layers' business
    """

    @staticmethod
    def forward(ctx: Any, p: Tensor) -> Tensor:  # type: ignore[override]
        ctx.spec = p._spec
        ctx.packed = getattr(p, "_fusedpar_packed", None)
        ctx.local_shape = p._local_tensor.shape
        lt = p._local_tensor
        return _kernel_layout(lt, ctx.packed) if ctx.packed is not None else lt.view_as(lt)  # a new tensor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        if ctx.packed is not None:
            grad = grad.reshape(ctx.local_shape)
        return DTensor(grad, ctx.spec, requires_grad=False)


def _dtensor(local: Tensor, spec: Any) -> DTensor:
    """`DTensor(local, spec, requires_grad=False)` without `DTensor.__init__`, which does
    nothing but carry export-tracing wrappers costing ~15 µs a call on the backward path (the
    object is built by `DTensor.__new__`, torch's C++ constructor, with spec and local set)."""
    return _DTENSOR_NEW(DTensor, local, spec, requires_grad=False)


_DTENSOR_NEW = DTensor.__new__


class _GradToParam:
    """The post-accumulate hook of a parameter's gradient leaf (`_grad_leaf`): moves the
    local gradient the leaf just accumulated into the parameter's DTensor `.grad`, doing for
    the parameter what autograd's AccumulateGrad would: its tensor hooks (`register_hook`)
    see the DTensor gradient first, the gradient is stored (or added in place to the one
    there), then its post-accumulate hooks run. No comm."""

    __slots__ = ("param",)

    def __init__(self, param: nn.Parameter) -> None:
        self.param = weakref.ref(param)

    def __call__(self, leaf: Tensor) -> None:
        local, leaf.grad = leaf.grad, None
        p = self.param()
        if p is None or local is None:
            return
        if p.__dict__.get("_fusedpar_packed") is not None:
            local = local.view(p._local_tensor.shape)
        grad = _dtensor(local, p._spec)
        hooks = p._backward_hooks
        if hooks:
            for hook in tuple(hooks.values()):
                out = hook(grad)
                if out is not None:
                    grad = out
        held = p.grad
        if held is None:
            p.grad = grad
        elif type(held) is DTensor and held._spec is p._spec and type(grad) is DTensor and grad._spec is p._spec:
            held._local_tensor.add_(grad._local_tensor)  # AccumulateGrad adds in place too
        else:
            with torch.no_grad():
                held += grad
        post = p._post_accumulate_grad_hooks
        if post:
            for hook in tuple(post.values()):
                hook(p)


def _grad_leaf(p: Tensor) -> Tensor:
    """The plain tensor a leaf DTensor parameter's forward computes with when a gradient is
    wanted: its local tensor in the kernels' layout, detached (same storage and version
    counter) and made an autograd leaf of its own, kept on `p` while `p`'s local tensor is
    the same one. Autograd accumulates into it in C++ at the cost of a plain parameter; its
    hook (`_GradToParam`) hands the gradient on to `p.grad` as a DTensor. One Python call per
    parameter per backward replaces a Python autograd node per use and DTensor dispatch in
    AccumulateGrad (`detach`, and `add_` when gradients accumulate), which cost 30 % of a
    decode-sized linear's forward+backward (bench/dtensor_params.py)."""
    lt = p._local_tensor
    kept = _LEAVES.get(id(p))
    if kept is not None and kept[1] is lt and kept[0]() is p:
        return kept[2]
    leaf = _kernel_layout(lt, p.__dict__.get("_fusedpar_packed")).detach().requires_grad_(True)
    leaf.register_post_accumulate_grad_hook(_GradToParam(p))
    leaf._fusedpar_param = weakref.ref(p)  # graph walkers see the parameter behind it (`param_of`)
    if kept is None or kept[0]() is not p:
        weakref.finalize(p, _LEAVES.pop, id(p), None)
    _LEAVES[id(p)] = (weakref.ref(p), lt, leaf)
    return leaf


# id(parameter) -> (the parameter, weakly; its local tensor; its gradient leaf): kept here, not
# on the parameter, so that pickling or deep-copying a parameter never meets the leaf's hook
_LEAVES: dict[int, tuple[weakref.ref, Tensor, Tensor]] = {}


def param_of(t: Tensor) -> Tensor:
    """The DTensor parameter whose gradient leaf `t` is (`_grad_leaf`), else `t`: for code that
    finds parameters by walking the autograd graph (AccumulateGrad's `variable`)."""
    ref = t.__dict__.get("_fusedpar_param")
    p = ref() if ref is not None else None
    return t if p is None else p


def _refuse_localized(p: Tensor) -> None:
    # torch's DistributedDataParallel(module, device_mesh=mesh["dp"]) over a tensor-parallel
    # model (its _pre_dp_module_transform) turns every DTensor parameter into a plain
    # parameter marked `_st_info` and rebuilds a DTensor from it before each forward, as a
    # module attribute: from then on named_parameters(), state_dict() and DCP see none of
    # them, and a checkpoint silently holds no weights (the same under torch's own
    # parallelize_module). Refused at the first forward, before any step.
    base = p._local_tensor._base
    if base is not None and hasattr(base, "_st_info"):
        raise RuntimeError(
            "fusedpar: a parameter was replaced by torch's DistributedDataParallel(..., device_mesh=...) "
            "(_pre_dp_module_transform): after this forward the model's named_parameters(), state_dict() and "
            "torch.distributed.checkpoint would hold none of its tensor-parallel parameters (torch's own "
            "parallelize_module alike). Expected data parallelism by FSDP2 over the dp dim (torchtitan's "
            "recipe: fully_shard(model, mesh=mesh['dp'])), got DDP")


def local_param(p: Tensor | None) -> Tensor | None:
    """What a module computes with in forward: `p` itself when it is a plain tensor; for a
    DTensor parameter, its local tensor (kernels' layout), linked to `p` when a gradient is
    wanted: through a gradient leaf for a leaf parameter (`_grad_leaf`: no Python autograd
    node, `p.grad` a DTensor as torch's tools expect), through `_LocalView` for a DTensor
    computed in forward (its history kept), through `to_local()` under torch.compile (which
    the compiler traces).

    Since a leaf parameter itself is not in the graph, `torch.autograd.grad(loss, [p])` finds
    it unused (use `.backward()` and read `p.grad`), and hooks put on its AccumulateGrad node
    (`p.view_as(p).grad_fn.next_functions[0][0]`) do not run; `p.register_hook` and
    `p.register_post_accumulate_grad_hook` hooks do."""
    if p is None or not isinstance(p, DTensor):
        return p
    if not (p.requires_grad and torch.is_grad_enabled()):
        return local_tensor(p)
    if torch.compiler.is_compiling():
        return _kernel_layout(p.to_local(), getattr(p, "_fusedpar_packed", None))
    if p.grad_fn is None:
        return _grad_leaf(p)
    _refuse_localized(p)
    return _LocalView.apply(p)


def _push_views(mod: nn.Module, *, copy: bool = False) -> None:
    # refreshed on every push: FSDP2 swaps a module's parameters for unsharded ones before
    # its forward, and the views must be of what the module holds now. What the push hides
    # is kept, and the pop puts it back, so an inner module's hook never takes away what an
    # outer one showed, and a compiled forward ends with the instance dict it started with.
    if not mod._parameters:  # taken away: by torch's DDP transform? (refused, `_refuse_localized`)
        for value in tuple(mod.__dict__.values()):
            if isinstance(value, DTensor):
                _refuse_localized(value)
    hidden: dict[str, Tensor | None] = {}
    reduce = mod.__dict__.get("_fusedpar_grad_reduce")  # (group, region): set by norm.all_reduce_grads
    for name, p in mod._parameters.items():
        if isinstance(p, DTensor):
            hidden[name] = mod.__dict__.get(name)
            view = local_param(p)
            if (reduce is not None and torch.compiler.is_compiling() and view.requires_grad
                    and not getattr(p, "_fusedpar_grad_hooked", False)
                    and (reduce[1] is None or reduce[1].split)):
                # a parameter swapped in after its gradient hook was installed (FSDP2's
                # unsharded one), in a compiled forward where no hook can be added: the view
                # carries the all-reduce of its gradient instead (the hooked ones keep theirs)
                view = traced.copy_to_region(view, reduce[0])
            mod.__dict__[name] = view.clone() if copy else view
    mod.__dict__.setdefault("_fusedpar_views", []).append(hidden)


def _pop_views(mod: nn.Module, depth: int | None = None) -> None:
    """Undo the last push, or (`depth`) every push past the first `depth`."""
    stack: list[dict[str, Tensor | None]] = mod.__dict__.get("_fusedpar_views", [])
    target = len(stack) - 1 if depth is None else depth
    while len(stack) > max(target, 0):
        for name, before in stack.pop().items():
            if before is None:
                mod.__dict__.pop(name, None)
            else:
                mod.__dict__[name] = before


def install_local_views(module: nn.Module, *, subtree: list[nn.Module] | None = None,
                        always_call: bool = True) -> None:
    """Make `module`'s forward see DTensor parameters as local tensors (`local_param`): a
    pre-hook puts them in the instance dict, where attribute lookup finds them before
    `_parameters`, and a hook that always runs takes them out again, so outside forward
    `module.weight` is the DTensor parameter. For modules whose forward fusedpar does not own
    (a Hugging Face norm, an embedding, an MoE experts block). With `subtree`, the views of
    those modules' parameters too, for code that reads a child's parameter itself or calls a
    child's method other than forward (a Mamba mixer's `self.conv1d.weight`, Gemma 3n's
    `self.altup.correct(...)`): installed on blocks (decoder layers). Pushes nest (each pop
    restores what its push hid); a block's hook pops its subtree back to the depths it found,
    so a forward that raised inside the block (skipping inner hooks) leaves no views behind.

    Under torch.compile of each block (torchtitan's `apply_compile`) a block's hooks run as
    graphs of their own, outside the block's forward graph, and the inner modules' hooks
    inside it. So: `always_call=False` for modules inside a block (torch.compile guards a
    traced call of a module with an always-called hook on that hook's id, which differs per
    decoder layer: a compiled block would be recompiled for every layer); and a block's
    compiled pre-hook hands on copies of its views (inductor returns a `to_local()` that is
    its graph's output as the DTensor's own local tensor, with the graph's autograd history
    attached to it, which then guards, and recompiles, on that tensor's requires_grad).
    Idempotent."""
    if module.__dict__.get("_fusedpar_local_views"):
        return
    mods = [module] if subtree is None else subtree
    for m in mods:
        m.__dict__["_fusedpar_has_views"] = True  # its parameters' views can carry a gradient all-reduce
    found: list[list[int]] = []  # per forward of `module` running: its subtree's depths before the push

    def pre_hook(mod: nn.Module, args: Any) -> None:
        if subtree is not None:
            found.append([len(m.__dict__.get("_fusedpar_views", ())) for m in mods])
        copy = subtree is not None and torch.compiler.is_compiling()
        for m in mods:
            _push_views(m, copy=copy)

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        if subtree is None:
            for m in mods:
                _pop_views(m)
        elif found:  # empty: a pre-hook that runs before this one raised, nothing was pushed
            for m, depth in zip(mods, found.pop()):
                _pop_views(m, depth)

    module.register_forward_pre_hook(pre_hook, prepend=True)
    module.register_forward_hook(hook, always_call=always_call)
    module.__dict__["_fusedpar_local_views"] = True


def replicate_parameters(model: nn.Module, *, group: dist.ProcessGroup,
                         owned: tuple[type, ...] = ()) -> None:
    """Every plain parameter of `model` becomes a Replicate() DTensor on `group`'s mesh (a
    model is all DTensors or none to torch: `clip_grad_norm_` refuses a mix), and every
    module holding DTensor parameters whose forward is not one of `owned` (fusedpar's layers,
    which read `local_param` themselves) gets `install_local_views`. Ties survive: a
    parameter shared by several modules is converted once."""
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or isinstance(p, DTensor):
                continue
            if id(p) not in converted:
                converted[id(p)] = tp_parameter(p.detach(), None, group=group, requires_grad=p.requires_grad)
            module._parameters[name] = converted[id(p)]
    def holds(m: nn.Module) -> bool:
        return any(isinstance(p, DTensor) for p in m._parameters.values())

    for module in model.modules():
        if holds(module):
            register_state_dict_hooks(module)
    # blocks (the entries of a ModuleList / ModuleDict: decoder layers, expert lists) show
    # their whole subtree; every other module holding parameters shows its own
    in_blocks: set[int] = set()  # modules whose block's hooks clean up after them (see install_local_views)
    for container in model.modules():
        if isinstance(container, (nn.ModuleList, nn.ModuleDict)):
            for block in container.children():
                inner = [m for m in block.modules() if holds(m) and not isinstance(m, owned)]
                if inner and not isinstance(block, owned):
                    install_local_views(block, subtree=inner)
                    in_blocks.update(id(m) for m in inner if m is not block)
    for module in model.modules():
        if holds(module) and not isinstance(module, owned):
            install_local_views(module, always_call=id(module) not in in_blocks)


def _placement_shard(p: DTensor) -> ParamShard | None:
    """The ParamShard a DTensor parameter made by `tp_parameter` stands for (None: replicated)."""
    placement = p.placements[0]
    if not isinstance(placement, Shard):
        return None
    packed = getattr(p, "_fusedpar_packed", None)
    if packed is not None:
        return ParamShard(packed, p.shape[packed])
    return ParamShard(placement.dim)


def _full_shape(p: DTensor) -> list[int]:
    """The unsharded tensor's shape in the model's own layout (packed parts flattened)."""
    shape = list(p.shape)
    packed = getattr(p, "_fusedpar_packed", None)
    if packed is not None:
        shape[packed:packed + 2] = [shape[packed] * shape[packed + 1]]
    return shape


def _state_dict_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # packed parameters are shown whole, in the model's own [gate; up] layout: one rank's
    # pieces are two boxes of it, which no DTensor placement DCP accepts can say (module docstring)
    for name, p in module._parameters.items():
        if isinstance(p, DTensor) and getattr(p, "_fusedpar_packed", None) is not None and prefix + name in state:
            group = p.device_mesh.get_group()
            state[prefix + name] = _placement_shard(p).gather(p, get_communicator(group))


def _load_pre_hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    # a plain (unsharded) tensor for a DTensor parameter: keep this rank's piece, as a DTensor
    # of the parameter's placement, so the default copy_ runs locally
    for name, p in module._parameters.items():
        key = prefix + name
        value = state.get(key)
        if not isinstance(p, DTensor) or value is None or isinstance(value, DTensor):
            continue
        full = _full_shape(p)
        if list(value.shape) != full:
            raise ValueError(f"load_state_dict: {key}: expected the unsharded tensor of shape {full} (this rank "
                             f"holds {list(local_tensor(p).shape)}), got {list(value.shape)}")
        shard = _placement_shard(p)
        group = p.device_mesh.get_group()
        piece = value if shard is None else shard.local(value, dist.get_rank(group), dist.get_world_size(group))
        if getattr(p, "_fusedpar_packed", None) is not None:
            piece = piece.reshape(p._local_tensor.shape)
        state[key] = DTensor(piece.to(device=p.device, dtype=p.dtype), p._spec, requires_grad=False)


def register_state_dict_hooks(module: nn.Module) -> None:
    """State-dict hooks for a module holding DTensor parameters (idempotent): `state_dict()`
    shows packed parameters whole (a collective), and `load_state_dict` takes unsharded
    plain tensors (each rank keeps its piece) as well as DTensors."""
    if module.__dict__.get("_fusedpar_state_hooks"):
        return
    module._register_state_dict_hook(_state_dict_hook)
    module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
    module.__dict__["_fusedpar_state_hooks"] = True
