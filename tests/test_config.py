from pathlib import Path

import pytest

from turnwise.config import ConfigError, load_config


def test_defaults_use_service_names():
    cfg = load_config()
    assert (cfg.global_batch_size, cfg.group_size) == (128, 8)
    assert (cfg.clip_low_threshold, cfg.clip_high_threshold) == (0.8, 1.2)
    assert cfg.pass_k_values == (1, 2, 4, 8, 16, 32)
    assert cfg.async_config.max_steps_off_policy == 0


def test_yaml_and_overrides(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text("group_size: 4\ndata:\n  train_path: tasks.jsonl\n")
    cfg = load_config(path, ["learning_rate=3e-4", "async_config.max_steps_off_policy=2"])
    assert cfg.group_size == 4
    assert cfg.learning_rate == pytest.approx(3e-4)
    assert cfg.async_config.max_steps_off_policy == 2
    assert cfg.data.train_path == str(tmp_path / "tasks.jsonl")  # relative to the file


@pytest.mark.parametrize(("override", "message"), [
    ("grup_size=4", "unknown config key 'grup_size'; did you mean 'group_size'?"),
    ("data.trian_path=x", "unknown config key 'data.trian_path'; did you mean 'data.train_path'?"),
    ("nonsense_key_xyz=1", "unknown config key 'nonsense_key_xyz'"),
    ("group_size=abc", "group_size: Input should be a valid integer"),
    ("group_size=0", "group_size: Input should be greater than or equal to 1"),
    ("loss_agg_mode=sum", "loss_agg_mode"),
    ("data=3", "must be a section"),
    ("no_equals_sign", "must look like key.sub=value"),
])
def test_bad_input_is_named(override: str, message: str):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_public_dump_masks_every_secret_and_keeps_the_rest():
    cfg = load_config(None, ['runtime.api_keys=["key-of-this-run-0123", {key: other-key-4567, job: j}]',
                             "tinker.api_key=tml-secret-89", "group_size=4"])
    public = cfg.public_dump()
    text = repr(public)
    assert not any(s in text for s in ("key-of-this-run-0123", "other-key-4567", "tml-secret-89"))
    assert public["runtime"]["api_keys"] == ["***", {"key": "***", "job": "j"}]
    assert public["group_size"] == 4 and cfg.runtime.api_keys[0] == "key-of-this-run-0123"
