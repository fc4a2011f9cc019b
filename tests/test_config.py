import pytest

from llmquant.config import QuantizeConfig, build_config, load_recipe
from llmquant.errors import InputError


def test_flags_override_recipe_and_dashes_map_to_fields(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("bits: 3\ngroup-size: 64\nact_order: false\nnsamples: 16\n")
    cfg = build_config(str(r), {"model": "m", "out": "o", "bits": 4, "group_size": None})
    assert (cfg.bits, cfg.group_size, cfg.act_order, cfg.nsamples) == (4, 64, False, 16)


def test_unknown_recipe_key_is_named(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("bitz: 3\n")
    with pytest.raises(InputError, match="unknown key 'bitz'"):
        load_recipe(r)


def test_shipped_recipes_are_valid():
    from pathlib import Path
    recipes = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert recipes
    for r in recipes:
        build_config(str(r), {"model": "m", "out": "o"}).validate()


@pytest.mark.parametrize("field,value,match", [
    ("bits", 5, "--bits 5"), ("group_size", 0, "--group-size 0"), ("damp", -1.0, "--damp"),
    ("format", "awq", "--format awq"), ("nsamples", 0, "--nsamples 0"), ("seqlen", 1, "--seqlen 1"),
    ("dtype", "int8", "--dtype int8"), ("device", "tpu", "--device tpu"),
    ("hessian_dtype", "int8", "--hessian-dtype int8"),
])
def test_validation_messages(field, value, match):
    cfg = QuantizeConfig(model="m", out="o", **{field: value})
    with pytest.raises(InputError, match=match):
        cfg.validate()


def test_format_defaults_follow_symmetry():
    assert QuantizeConfig(sym=True).checkpoint_format == "gptq"
    assert QuantizeConfig(sym=False).checkpoint_format == "gptq_v2"
