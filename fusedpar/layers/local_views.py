"""What a forward computes with: this rank's local tensors of DTensor parameters.

Every parameter of a parallelized model is a DTensor (sharding.py), but no kernel or schedule
dispatches through DTensor: modules read `local_param(p)` in forward, and modules whose
forward fusedpar does not own (a Hugging Face norm, an embedding, an MoE experts block) get
the same through `install_local_views`, which puts the local tensors in the instance dict for
the length of a forward.

    no_grad (decode)       the local tensor itself                          nothing added
    a leaf parameter of    a plain autograd leaf aliasing the local storage, no hook
    a parallel linear      (`param_operand` -> `_bare_leaf`, `GradTarget`): the linear's
                           autograd Function hands the gradient to `p.grad` as a DTensor in
                           its own backward, as AccumulateGrad would (`_accumulate`)
    any other leaf         its gradient leaf (`_grad_leaf`): the same kind of leaf; one hook
    parameter, or one      per backward hands the accumulated gradient to `p.grad` as a
    with tensor hooks      DTensor (`_GradToParam`)
    a DTensor computed     `_LocalView`, one autograd node keeping its history
    in forward
    under torch.compile    `p.to_local()`, which the compiler traces

Packed parameters (`[gate; up]`, a DTensor over a `[parts, size/parts]` view) are flattened
back to the kernels' layout. torch's DDP(device_mesh=) transform, which takes every parameter
out of `named_parameters()`, is refused at the first forward (`_refuse_localized`).
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from . import traced

__all__ = ["local_tensor", "local_param", "param_operand", "param_operands", "GradTarget", "install_local_views",
           "param_of"]


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
        return _dtensor(grad, ctx.spec)


def _dtensor(local: Tensor, spec: Any) -> DTensor:
    """`DTensor(local, spec, requires_grad=False)` without `DTensor.__init__`, which does
    nothing but carry export-tracing wrappers (the gradient hook: 5.9 -> 3.6 µs a call, timeit;
    the object is built by `DTensor.__new__`, torch's C++ constructor, with spec and local set)."""
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
        _accumulate(p, local)


def _accumulate(p: Tensor, local: Tensor) -> None:
    """What autograd's AccumulateGrad does for a parameter, for the DTensor parameter `p`
    given its local gradient `local` (kernels' layout): `p`'s tensor hooks see the DTensor
    gradient first, it is stored (or added in place to the one there), then `p`'s
    post-accumulate hooks run. No comm."""
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


class GradTarget:
    """Where an autograd Function of fusedpar's puts a parameter's gradient itself
    (`param_operand`): the DTensor parameter, and the autograd node that would otherwise
    accumulate it (the operand's AccumulateGrad), which says whether this backward wants it."""

    __slots__ = ("param", "node")

    def __init__(self, param: Tensor, node: Any) -> None:
        self.param, self.node = weakref.ref(param), node  # weakly: kept in `_BARE` while the parameter lives

    def wanted(self) -> bool:
        """Whether the running backward accumulates into the parameter (`.backward()` does;
        `torch.autograd.grad(out, [x])` for other inputs does not). In backward only."""
        return torch._C._will_engine_execute_node(self.node)

    def accumulate(self, local: Tensor) -> None:
        """Hand this local gradient (kernels' layout) to the parameter, as AccumulateGrad would."""
        p = self.param()
        if p is not None:
            _accumulate(p, local)


def param_operand(p: Tensor | None) -> tuple[Tensor | None, GradTarget | None]:
    """What one of fusedpar's autograd Functions computes with for the parameter `p`, and,
    where the Function itself hands the gradient to `p.grad` (returning None for the operand),
    its `GradTarget`: for a leaf DTensor parameter with no tensor hooks, in grad mode, not
    compiling, the operand is a plain autograd leaf aliasing the local storage with no hook
    (`_bare_leaf`), and its gradient moves to `p.grad` in the Function's backward, which runs
    in Python anyway: no hook call per parameter per backward. Otherwise `local_param(p)` and
    None (the gradient leaf and its hook, which also serve `register_hook` hooks in their
    order). For callers that run the Function on the operand itself, with autocast off (a
    cast in between would take the gradient). The Function must hand every gradient of a
    target on (`GradTarget.accumulate`)."""
    if p is None or not isinstance(p, DTensor):
        return p, None
    if not (p.requires_grad and torch.is_grad_enabled()):  # decode: the local tensor itself
        packed = p.__dict__.get("_fusedpar_packed")
        return (p._local_tensor if packed is None else _kernel_layout(p._local_tensor, packed)), None
    if p.grad_fn is not None or p._backward_hooks or p._post_accumulate_grad_hooks or torch.compiler.is_compiling():
        return local_param(p), None
    return _bare_leaf(p)


def param_operands(weight: Tensor | None, bias: Tensor | None
                   ) -> tuple[Tensor | None, Tensor | None, tuple[GradTarget | None, GradTarget | None] | None]:
    """`param_operand` of a layer's weight and bias: `(w, b, targets)`, `targets` the pair of
    their `GradTarget`s, or None when neither has one (then the Function returns both
    gradients to autograd)."""
    (w, tw), (b, tb) = param_operand(weight), param_operand(bias)
    return w, b, ((tw, tb) if tw is not None or tb is not None else None)


def _bare_leaf(p: Tensor) -> tuple[Tensor, GradTarget]:
    """`_grad_leaf` without its hook, with the target its gradient goes to; kept (`_BARE`)
    while `p`'s local tensor is the same one."""
    lt = p._local_tensor
    kept = _BARE.get(id(p))
    if kept is not None and kept[1] is lt and kept[0]() is p:
        return kept[2], kept[3]
    leaf = _kernel_layout(lt, p.__dict__.get("_fusedpar_packed")).detach().requires_grad_(True)
    leaf._fusedpar_param = weakref.ref(p)  # graph walkers see the parameter behind it (`param_of`)
    # the node is held here: a leaf keeps only a weak reference to its AccumulateGrad, and the
    # one `wanted` asks about must be the one in this forward's graph
    target = GradTarget(p, torch.autograd.graph.get_gradient_edge(leaf).node)
    if kept is None or kept[0]() is not p:
        weakref.finalize(p, _BARE.pop, id(p), None)
    _BARE[id(p)] = (weakref.ref(p), lt, leaf, target)
    return leaf, target


def _grad_leaf(p: Tensor) -> Tensor:
    """The plain tensor a leaf DTensor parameter's forward computes with when a gradient is
    wanted: its local tensor in the kernels' layout, detached (same storage and version
    counter) and made an autograd leaf of its own, kept (`_LEAVES`) while `p`'s local tensor
    is the same one. Autograd accumulates into it in C++ at the cost of a plain parameter; its
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
# the same for `_bare_leaf`: (the parameter, weakly; its local tensor; the leaf; its GradTarget)
_BARE: dict[int, tuple[weakref.ref, Tensor, Tensor, GradTarget]] = {}


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
