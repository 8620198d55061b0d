"""Every style fusedpar accepts is one object from one table (plan/styles.py): each Hugging
Face string transformers registers for tensor parallelism, and each torch ParallelStyle
fusedpar maps, resolves to an object whose check refuses a module or parameter it cannot
split, naming the path and the style, before anything is converted (no process group)."""
from __future__ import annotations

import pytest
from torch import nn

from fusedpar.plan.layouts import Layouts
from fusedpar.plan.styles import TABLE, Knobs, Site, Style, Unchanged, style_for
from fusedpar.plan.torch_styles import GatherInput, read_plan

# transformers' styles that split experts across ranks (expert parallelism): fusedpar splits
# each expert across ranks (moe_tp_experts) and refuses these as styles it does not know
_EXPERT_PARALLEL = {"grouped_gemm", "ep_dispatch_experts"}

# style → a path of `_Toy` the style cannot take (None: takes anything)
_BAD = {
    **{s: "embed" for s in ("colwise", "colwise_rep", "colwise_gather_output", "rowwise", "rowwise_rep",
                            "rowwise_split_input", "packed_colwise", "packed_rowwise")},  # not an nn.Linear
    "embedding_rowwise": "proj", "embedding_colwise": "proj",  # not an nn.Embedding
    "moe_tp_experts": "proj",  # a 2-D weight the plan leaves unsplit
    "mla_kv_a_proj": "embed",  # not an nn.Linear with rope features
    **{s: "norm.weight" for s in ("moe_identity_expert", "all_reduce", "replicated_with_grad_allreduce",
                                  "sequence_parallel")},  # hooks on a module: not a bare parameter
    "replicate": None, "local_params": None,
}


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)


def _site(model: nn.Module, path: str, name: str, given: Style | None = None) -> Site:
    matches = {path: (name, path)}
    params = dict(model.named_parameters())
    module = model.get_submodule(path.rpartition(".")[0] if path in params else path)
    style = style_for(name, path, matches, params, given)
    return Site(model, path, path, style, [0, 1], matches, params, Knobs(None, "torch", "torch", True), module)


def test_every_hugging_face_style_is_in_the_table():
    from transformers.integrations.tensor_parallel import ALL_PARALLEL_STYLES

    hf = set(ALL_PARALLEL_STYLES._global_mapping) - _EXPERT_PARALLEL
    assert hf, "transformers registers no tensor-parallel styles"
    missing = sorted(hf - set(TABLE))
    assert not missing, f"Hugging Face styles with no style object in plan/styles.py TABLE: {missing}"
    assert set(_BAD) == set(TABLE), f"this test's targets and TABLE differ: {set(_BAD) ^ set(TABLE)}"


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_style_refuses_what_it_cannot_split(name):
    model = _Toy()
    style = TABLE[name]()
    assert isinstance(style, Style) and style.name == name
    bad = _BAD[name]
    if bad is None:  # nothing to refuse: the module or parameter stays replicated
        for path in ("embed", "proj", "norm.weight"):
            at = _site(model, path, name)
            assert isinstance(at.style, Unchanged)
            at.style.check(at)
        return
    at = _site(model, bad, name)
    with pytest.raises((TypeError, ValueError)) as err:
        at.style.check(at)
    assert f"parallelize: {bad} (plan key {bad!r}, style {name!r})" in str(err.value)


def _torch_styles():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
    )

    # (plan key, torch style, the fusedpar style it reads as, a path that style cannot take)
    return [
        ("proj", ColwiseParallel(), "colwise", "embed"),
        ("proj", ColwiseParallel(output_layouts=Replicate()), "colwise_gather_output", "embed"),
        ("proj", ColwiseParallel(input_layouts=Shard(1)), "colwise", "embed"),
        ("proj", RowwiseParallel(), "rowwise", "embed"),
        ("proj", RowwiseParallel(output_layouts=Shard(1)), "rowwise", "embed"),
        ("proj", RowwiseParallel(input_layouts=Replicate()), "rowwise_split_input", "embed"),
        ("embed", RowwiseParallel(input_layouts=Replicate()), "embedding_rowwise", "proj"),
        ("embed", ColwiseParallel(output_layouts=Shard(1)), "embedding_colwise", "proj"),
        ("norm", SequenceParallel(), "sequence_parallel", "norm.weight"),
        ("", PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)), None, None),
    ]


@pytest.mark.parametrize("case", range(10))
def test_torch_styles_read_as_the_same_objects(case):
    key, torch_style, name, bad = _torch_styles()[case]
    model = _Toy()
    read = read_plan(model, {key: torch_style})
    if name is None:  # a style no Hugging Face string names: its column-parallel children gather
        assert isinstance(read.styles[key], GatherInput) and key not in read.strings
        return
    style = read.styles[key]
    assert type(style) is type(TABLE[name]()) and style.name == name and read.strings == {key: name}
    at = _site(model, bad, name, given=style)
    assert at.style is style or bad in at.params  # a parameter takes the style's parameter variant
    with pytest.raises((TypeError, ValueError)) as err:
        at.style.check(at)
    assert f"parallelize: {bad} (plan key {bad!r}, style {name!r})" in str(err.value)


def _torch_layouts():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # (plan key, torch style, the layouts its style object carries, whether it runs on
    # sequence shards when torch's layouts are taken literally)
    return [
        ("proj", ColwiseParallel(), Layouts("replicate", "shard(-1)"), False),
        ("proj", ColwiseParallel(use_local_output=False), Layouts("replicate", "shard(-1)", False), False),
        ("proj", ColwiseParallel(input_layouts=Shard(1)), Layouts("shard(1)", "shard(-1)"), True),
        ("proj", RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
         Layouts("shard(-1)", "shard(1)", False), True),
        ("proj", RowwiseParallel(input_layouts=Replicate()), Layouts("replicate", "replicate"), False),
        ("embed", RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
         Layouts("replicate", "shard(1)"), False),
    ]


@pytest.mark.parametrize("case", range(6))
def test_torch_layouts_are_fields_of_the_style_object(case):
    """What a torch style says at its module's edges (input_layouts, output_layouts,
    use_local_output) is its style object's `layouts`: the object sets the edges itself
    (install_layouts) and says which paths it puts on sequence shards."""
    key, torch_style, layouts, on_shards = _torch_layouts()[case]
    model = _Toy()
    read = read_plan(model, {key: torch_style, "norm": "replicate"})
    style = read.styles[key]
    assert style.layouts == layouts, f"{torch_style}: {style!r}"
    assert style.layouts.dtensor_placement == (None if torch_style.use_local_output else layouts.output_layouts)
    assert read.styles["norm"].layouts == Layouts()  # a string beside torch styles takes DTensor inputs
    assert read_plan(model, {key: "replicate"}).styles[key] == "replicate"  # no torch style: a string, no layouts
    at = _site(model, key, style.name, given=style)
    at.style.check(at)
    at.literal = True
    assert list(at.style.sequence_shards(at)) == ([key] if on_shards else []), f"{torch_style}"


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.up, self.mlp.gate, self.mlp.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)


def _gather_input_site(model: nn.Module, children: dict[str, str], *, literal: bool) -> Site:
    """PrepareModuleInput(Shard(1) -> Replicate()) on `mlp`, read as torch_styles reads it, its
    Site told what `children` (path → style string) build, as parallelize tells it."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    builds = {}
    for path, name in children.items():
        at = _site(model, path, name)
        at.style.check(at)
        builds[path] = at.build
    style = read_plan(model, {"mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                                        desired_input_layouts=(Replicate(),))}).styles["mlp"]
    params = dict(model.named_parameters())
    return Site(model, "mlp", "mlp", style, [0, 1], {}, params, Knobs(None, "torch", "torch", True), model.mlp,
                literal=literal, builds=builds)


def test_prepare_module_input_is_a_style_its_column_children_gather_for():
    model = _Block()
    at = _gather_input_site(model, {"mlp.up": "colwise", "mlp.gate": "colwise", "mlp.down": "rowwise"}, literal=True)
    at.style.check(at)
    assert set(at.style.sequence_shards(at)) == {"mlp.up", "mlp.gate"}  # the row layer's input stays split on features
    assert at.style.apply(model.mlp, None, at) is model.mlp  # nothing at the module itself
    # fusedpar's own region over decoder layers gathers there already: nothing to find, nothing refused
    at = _gather_input_site(model, {"mlp.down": "rowwise"}, literal=False)
    at.style.check(at)
    assert not at.style.sequence_shards(at)


@pytest.mark.parametrize("children", [{"mlp.down": "rowwise"}, {"mlp.up": "colwise_gather_output"}, {}])
def test_prepare_module_input_without_column_children_is_refused_by_its_check(children):
    at = _gather_input_site(_Block(), children, literal=True)
    with pytest.raises(ValueError) as err:
        at.style.check(at)
    msg = str(err.value)
    assert "plan['mlp']" in msg and "PrepareModuleInput(Shard(1) -> Replicate()) on mlp" in msg, msg
    assert "expected column-parallel linears directly under it" in msg and "got none" in msg, msg
