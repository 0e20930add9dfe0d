"""The published experiment: the ``published:`` recipe section, and how a run differs from it."""
import textwrap

import pytest

from segcli.errors import SegcliError
from segcli.recipe import load_recipe, recipe_from_dict

MODEL = """
model:
  backbone: {type: vit, name: vit_tiny_patch16_224, img_size: 64, out_indices: [3, 5]}
  decode_head: {type: setr, in_index: -1}
data: {type: synthetic, batch_size: 16, crop_size: [64, 64]}
"""

PUBLISHED = """
published:
  numbers: {"mIoU": 51.3, "mIoU (ms)": 52.1, "GFLOPs": 637}
  source: "thesis table 4.1"
  official_config: "zbwxp/SegVit configs/segvit/segvit_vit-l_jax_640x640_160k_ade20k.py"
  gpus: 8
  batch_per_gpu: 2
  precision: fp32
  pretrained: "vit_large_p16_384_20220308-d4efb41d.pth"
  differences: {"train.grad_clip": "the thesis trains without clipping"}
"""


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_published_section_is_typed(tmp_path):
    recipe = load_recipe(_write(tmp_path / "r.yaml", MODEL + PUBLISHED))
    published = recipe.published
    assert published.numbers == {"mIoU": 51.3, "mIoU (ms)": 52.1, "GFLOPs": 637.0}
    assert all(isinstance(v, float) for v in published.numbers.values())
    assert published.global_batch == 16
    assert published.precision == "fp32"
    assert published.differences == {"train.grad_clip": "the thesis trains without clipping"}
    assert recipe_from_dict(recipe.to_dict()) == recipe  # the embedded form round-trips
    assert load_recipe(_write(tmp_path / "none.yaml", MODEL)).published is None


@pytest.mark.parametrize("override, message", [
    ("published.gpu=8", "did you mean 'gpus'"),
    ("published.gpus=0", "gpus must be >= 1"),
    ("published.batch_per_gpu=0", "batch_per_gpu must be >= 1"),
    ("published.precision=fp64", "choose one of"),
    ("published.numbers={mIoU: high}", "numbers.mIoU: expected a number"),
    ("published.numbers={}", "at least one"),
    ("published.differences={train.grad_clip: 3}", "differences.train.grad_clip"),
    ("published.numbers=51.3", "expected a mapping"),
])
def test_published_section_is_validated(tmp_path, override, message):
    path = _write(tmp_path / "r.yaml", MODEL + PUBLISHED)
    with pytest.raises(SegcliError, match=message):
        load_recipe(path, [override])


def test_published_keys_must_be_written(tmp_path):
    text = MODEL + PUBLISHED.replace("  pretrained: \"vit_large_p16_384_20220308-d4efb41d.pth\"\n", "")
    with pytest.raises(SegcliError, match="missing required key") as err:
        load_recipe(_write(tmp_path / "r.yaml", text))
    assert "published.pretrained" in str(err.value)


def test_published_is_not_inherited_through_base(tmp_path):
    """Each recipe names its own experiment: a child of a recipe with a number claims none of its own
    (a base's published block merged into a child would claim the base's number for another run)."""
    _write(tmp_path / "parent.yaml", MODEL + PUBLISHED)
    child = load_recipe(_write(tmp_path / "child.yaml", "_base_: parent.yaml\ntrain: {max_iters: 20}\n"))
    assert child.published is None
    assert child.data.batch_size == 16  # everything else is inherited
    restated = load_recipe(_write(tmp_path / "restated.yaml", "_base_: parent.yaml\n" + PUBLISHED.replace("51.3", "50.0")))
    assert restated.published.numbers["mIoU"] == 50.0
    assert restated.published.gpus == 8
