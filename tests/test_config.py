"""btrm.config: the typed view holds every trainer.yaml knob and nothing else, with the config's values."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from btrm import config, schema


def test_the_typed_view_has_a_field_for_each_trainer_yaml_knob_and_no_other():
    """Fails when trainer.yaml and btrm/config.py drift apart (a knob added to one only)."""
    assert sorted(config.knob_names()) == sorted(schema.trainer_yaml_knobs())


def test_no_field_has_a_default_of_its_own():
    """trainer.yaml is the only place a default is written."""

    def sections(cls):
        for field in dataclasses.fields(cls):
            yield cls, field
            hint = config.typing.get_type_hints(cls)[field.name]
            if dataclasses.is_dataclass(hint) and hint is not config.LossConfig:
                yield from sections(hint)

    with_default = [
        f"{cls.__name__}.{field.name}"
        for cls, field in sections(config.RunConfig)
        if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    ]
    assert with_default == []


def test_values_are_the_composed_configs_resolved():
    composed = schema.compose_config(["optim.lr=2e-6", "trainer.experiment_name=typed", "data.group_columns=[domain]"])
    view = config.RunConfig.from_config(composed)
    assert view.optim.lr == 2e-6 and view.optim.betas == (0.9, 0.95)
    assert view.trainer.default_local_dir == "checkpoints/typed"  # ${trainer.save_path}/${trainer.experiment_name}
    assert view.data.group_columns == ("domain",) and view.model.fsdp_config.wrap_policy.min_num_params == 0
    assert view.trainer.checkpoint.load_contents == ("model", "optimizer", "extra")
    assert view.loss.type == "bt" and view.loss.max_strength == 3
    resolved = OmegaConf.to_container(composed, resolve=True)
    for key in config.knob_names():
        value = OmegaConf.select(OmegaConf.create(resolved), key)
        got = view
        for part in key.split("."):
            got = getattr(got, part)
        expected = tuple(value) if isinstance(value, list) else value
        if isinstance(expected, dict):
            expected = dict(expected)
        assert got == expected or (got is None and expected is None), key


def test_a_knob_without_a_field_is_refused_by_name():
    tree = OmegaConf.to_container(schema.compose_config([]), resolve=True)
    tree["trainer"]["new_knob"] = 1
    with pytest.raises(ValueError, match=r"keys without a field \['trainer.new_knob'\]"):
        config.RunConfig.from_config(tree)
    tree["trainer"].pop("new_knob")
    del tree["data"]["max_samples"]
    with pytest.raises(ValueError, match=r"fields without a key \['data.max_samples'\]"):
        config.RunConfig.from_config(tree)
