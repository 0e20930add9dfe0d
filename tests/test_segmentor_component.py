"""The segmentor is a component like the backbone and the heads (issue 23): ``model.type`` names
it, ``model.options`` are typed once at load by the dataclass it registered, and the builder
builds it through the registry without typing anything again."""
from __future__ import annotations

import copy
import dataclasses
import typing

import pytest
import yaml

from segcli.configurable import Component
from segcli.errors import SegcliError
from segcli.models.builder import build_segmentor
from segcli.models.dtop import COMBINERS, DToPOptions
from segcli.models.shrunk import ShrunkOptions
from segcli.recipe import load_recipe, recipe_from_dict
from segcli.workflows.prune import dtop_options, pruned_recipe

VIT = {"type": "vit", "name": "test_vit", "img_size": 64, "patch_size": 8, "out_indices": [2, 3, 5]}
ATM = {"type": "atm", "embed_dim": 32, "num_heads": 1, "num_layers": 1}
MODEL = {"backbone": VIT, "decode_head": {**ATM, "in_index": [2]}, "aux_heads": [{**ATM, "in_index": [0]}]}


def recipe(**model):
    return recipe_from_dict({"model": {**copy.deepcopy(MODEL), **model}}, where="r.yaml")


def test_options_are_typed_at_load_by_the_registered_class():
    loaded = recipe(type="dtop", options={"p0": 0.9, "exit_layers": [2]})
    assert loaded.model.segmentor == Component("dtop", DToPOptions(p0=0.9, exit_layers=(2,)))
    assert recipe(type="dtop").model.options == DToPOptions()  # no options: the defaults
    assert recipe().model.segmentor == Component("encoder_decoder", None)
    # the YAML shape is kept: model.type + model.options, and it loads back the same
    dumped = loaded.to_dict()["model"]
    assert dumped["type"] == "dtop" and dumped["options"]["p0"] == 0.9
    assert recipe_from_dict(loaded.to_dict()) == loaded


@pytest.mark.parametrize("model, where, text", [
    ({"type": "dtop", "options": {"p00": 0.9}}, "r.yaml.model.options.p00", "did you mean 'p0'"),
    ({"type": "dtop", "options": {"p0": 1.5}}, "r.yaml.model.options.p0", "must be in (0, 1]"),
    ({"type": "dtop", "options": {"k": -1}}, "r.yaml.model.options.k", "must be >= 0"),
    ({"type": "dtopp"}, "r.yaml.model.type", "did you mean 'dtop'"),
    ({"options": {"p0": 0.9}}, "r.yaml.model.options", "takes no options"),
])
def test_a_wrong_segmentor_or_option_is_named_at_load(model, where, text):
    with pytest.raises(SegcliError) as err:
        recipe(**model)
    assert err.value.where == where and text in err.value.one_line()


def test_the_builder_does_not_type_options_again():
    """Options are typed once, at load: a config written in code gives them typed, as it gives
    ``Component("atm", ATMConfig())``; a raw mapping is a programming error, not retyped."""
    loaded = recipe(type="dtop", options={"p0": 0.9})
    model = build_segmentor(loaded.model, num_classes=3)
    assert model.options is loaded.model.options
    with pytest.raises(TypeError, match="DToPOptions"):
        build_segmentor(dataclasses.replace(loaded.model, options={"p0": 0.9}), num_classes=3)
    with pytest.raises(TypeError, match="DToPOptions"):  # another segmentor's options
        build_segmentor(dataclasses.replace(loaded.model, options=ShrunkOptions()), num_classes=3)


def test_a_recipe_changing_model_type_does_not_inherit_the_other_segmentors_options(tmp_path):
    """The bug: ``model.options`` were merged key by key across a changed ``model.type``, so a
    recipe turning a Shrunk base into DToP (or back into a plain encoder-decoder) got the base's
    ``qd_index`` among its options and was rejected, as a backbone whose type changes is not."""
    base = {"model": {**MODEL, "type": "shrunk", "options": {"qd_index": 0}}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "dtop.yaml").write_text(yaml.safe_dump(
        {"_base_": "base.yaml", "model": {"type": "dtop", "options": {"p0": 0.9}}}))
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"_base_": "base.yaml", "model": {"type": "encoder_decoder"}}))
    (tmp_path / "same.yaml").write_text(yaml.safe_dump({"_base_": "base.yaml", "model": {"options": {"edge": True}}}))
    assert load_recipe(tmp_path / "dtop.yaml").model.segmentor == Component("dtop", DToPOptions(p0=0.9))
    assert load_recipe(tmp_path / "plain.yaml").model.options is None
    # the same segmentor still merges its options key by key
    assert load_recipe(tmp_path / "same.yaml").model.options == ShrunkOptions(qd_index=0, edge=True)


def test_prune_types_its_options_once_and_names_them():
    assert dtop_options(0.5, 1, (2,)) == DToPOptions(p0=0.5, k=1, exit_layers=(2,))
    for values, where in (((1.5, 5, None), "p0"), ((0.5, -1, None), "k"), ((0.5, 5, (-2,)), "exit_layers[0]")):
        with pytest.raises(SegcliError) as err:
            dtop_options(*values)
        assert err.value.where == where
    with pytest.raises(SegcliError, match="exit_layers repeats a block"):
        dtop_options(0.5, 5, (2, 2))
    # re-pruning replaces p0, k and exit_layers, and keeps the other options
    released = recipe(type="dtop", options={"p0": 0.9, "strict": True, "combine": "released"})
    again = pruned_recipe(released, dtop_options(0.5, 1, None)).model.options
    assert again == DToPOptions(p0=0.5, k=1, strict=True, combine="released")


def test_every_combine_variant_has_its_combiner():
    assert set(COMBINERS) == set(typing.get_args(typing.get_type_hints(DToPOptions)["combine"]))
