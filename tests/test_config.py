import pytest

from ctnocvr_rec.config import ConfigError, RunConfig, load_config, save_config
from ctnocvr_rec.data.schema import FieldSchema, SchemaError, load_schema


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["model.num_experts=8", "model.tower_hidden=[10,5]", "model.use_ctnocvr=false"])
    assert cfg.model.num_experts == 8 and cfg.model.tower_hidden == [10, 5] and cfg.model.use_ctnocvr is False


def test_unknown_keys_list_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="valid keys: .*num_experts"):
        load_config(None, ["model.num_expert=8"])
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*stepz.*valid keys"):
        load_config(p)


def test_bad_value_type_is_an_error():
    with pytest.raises(ConfigError, match="model.num_experts"):
        load_config(None, ["model.num_experts=many"])


def test_roundtrip(tmp_path):
    cfg = load_config(None, ["train.seed=7", "model.field_embedding_dims.101=24"])
    save_config(cfg, tmp_path / "r.yaml")
    again = load_config(tmp_path / "r.yaml")
    assert again == cfg and isinstance(again, RunConfig)


def test_schema_file_and_errors():
    schema = load_schema("aliccp")
    assert len(schema) == 23
    assert schema["109_14"].weighted and schema["109_14"].multi_valued and schema["109_14"].is_user
    assert schema["205"].group == "item" and schema["205"].table_name == "t_205"
    with pytest.raises(SchemaError, match="group"):
        FieldSchema.from_dict({"fields": [{"name": "1", "group": "nope"}]})
    with pytest.raises(SchemaError, match="num_buckets"):
        FieldSchema.from_dict({"fields": [{"name": "1", "group": "item", "mapping": "hash"}]})
