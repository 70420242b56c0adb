"""Config schema: the example file is valid and complete, errors name key paths and lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from edged.config import (
    ConfigError,
    EdgedConfig,
    changed_paths,
    config_to_dict,
    deep_merge,
    load_config,
    resolve_state_dir,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "edged.yaml"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True, cwd=ROOT)


def test_example_config_is_valid_and_equals_defaults():
    cfg = load_config(EXAMPLE)
    # The example documents the defaults: loading it must give exactly the built-in defaults.
    assert config_to_dict(cfg) == config_to_dict(EdgedConfig())


def _leaf_paths(model: type, prefix: str = "") -> list:
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        path = f"{prefix}{name}"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaf_paths(ann, path + ".")
        else:
            out.append(path)
    return out


def test_example_config_mentions_every_key():
    data = yaml.safe_load(EXAMPLE.read_text())
    missing = []
    for path in _leaf_paths(EdgedConfig):
        node = data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.append(path)
                break
            node = node[part]
    assert not missing, f"config/edged.yaml lacks keys: {missing}"


def test_check_config_cli_accepts_example():
    r = _run_cli("check-config", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_check_config_names_all_three_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "device_id: door\n"
        "tracker:\n"
        "  max_agee: 40\n"            # misspelled key (line 3)
        "  n_init: three\n"           # wrong type (line 4)
        "detector:\n"
        "  score_threshold: 1.7\n"    # out of range (line 6)
    )
    r = _run_cli("check-config", str(bad))
    assert r.returncode != 0
    err = r.stderr
    assert "tracker.max_agee (line 3): unknown key; did you mean 'max_age'?" in err
    assert "tracker.n_init (line 4)" in err and "integer" in err
    assert "detector.score_threshold (line 6)" in err and "less than or equal to 1" in err


def test_nested_list_errors_name_index_and_line(tmp_path):
    bad = tmp_path / "zones.yaml"
    bad.write_text(
        "events:\n"
        "  zones:\n"
        "    - name: door\n"
        "      polygon: [[0, 0], [1, 0], [1, 1.5]]\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    text = str(exc.value)
    assert "events.zones.0.polygon (line 4)" in text
    assert "normalised" in text


def test_invalid_yaml_reports_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("capture:\n  source: [unclosed\n")
    r = _run_cli("check-config", str(bad))
    assert r.returncode != 0
    assert "line" in r.stderr and "not valid YAML" in r.stderr


def test_missing_file_is_a_clear_error(tmp_path):
    r = _run_cli("check-config", str(tmp_path / "nope.yaml"))
    assert r.returncode != 0
    assert "nope.yaml" in r.stderr and "cannot read" in r.stderr


def test_top_level_must_be_mapping(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def test_overlay_merges_and_is_validated_by_the_same_schema(tmp_path):
    base = load_config(EXAMPLE)
    new = load_config(EXAMPLE, overlay={"tracker": {"max_age": 50}, "events": {"zones": [
        {"name": "door", "polygon": [[0, 0], [0.5, 0], [0.5, 0.5]]}]}})
    assert new.tracker.max_age == 50 and new.tracker.n_init == base.tracker.n_init
    assert changed_paths(base, new) == ["events.zones", "tracker.max_age"]
    with pytest.raises(ConfigError, match=r"tracker.max_age: Input should be greater than or equal to 1"):
        load_config(EXAMPLE, overlay={"tracker": {"max_age": 0}})
    with pytest.raises(ConfigError, match=r"mqtt.hots: unknown key; did you mean 'host'"):
        load_config(EXAMPLE, overlay={"mqtt": {"hots": "x"}})


def test_config_is_an_immutable_value():
    a, b = load_config(EXAMPLE), load_config(EXAMPLE)
    assert a == b and changed_paths(a, b) == []
    with pytest.raises(Exception):
        a.tracker.max_age = 3  # type: ignore[misc]


def test_deep_merge_replaces_lists_and_keeps_base():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    out = deep_merge(base, {"a": {"c": [3]}})
    assert out == {"a": {"b": 1, "c": [3]}, "d": 1}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


def test_password_is_redacted_and_never_echoed(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("mqtt:\n  password: s3cret\n  password_file: /etc/pw\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert "s3cret" not in str(exc.value)
    ok = tmp_path / "ok.yaml"
    ok.write_text("mqtt:\n  password: s3cret\n")
    assert config_to_dict(load_config(ok))["mqtt"]["password"] == "***"


def test_device_id_must_be_topic_safe(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text("device_id: 'cam/+1'\n")
    with pytest.raises(ConfigError, match=r"device_id \(line 1\)"):
        load_config(f)


def test_version_and_config_commands():
    r = _run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("edged ")
    r = _run_cli("config", "--config", str(EXAMPLE))
    assert r.returncode == 0
    assert yaml.safe_load(r.stdout)["tracker"]["max_age"] == 70


def test_relative_state_dir_is_next_to_the_config_file(tmp_path, monkeypatch):
    """The config header says relative paths follow the config file: state_dir too, whatever the
    working directory (a service started from / must not write into /state)."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg_file = conf_dir / "edged.yaml"
    cfg_file.write_text("state_dir: var/state\n")
    cfg = load_config(cfg_file)
    assert resolve_state_dir(cfg, cfg_file) == conf_dir / "var" / "state"
    # A relative config path given from another directory points at the same place.
    assert resolve_state_dir(cfg, "../etc/edged.yaml") == conf_dir / "var" / "state"
    # Without a config file: the working directory.
    assert resolve_state_dir(load_config(None), None) == elsewhere / "state"
    # Absolute and ~ paths are taken as they are.
    absolute = load_config(None, overlay={"state_dir": str(tmp_path / "abs")})
    assert resolve_state_dir(absolute, cfg_file) == tmp_path / "abs"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home = load_config(None, overlay={"state_dir": "~/edged"})
    assert resolve_state_dir(home, cfg_file) == tmp_path / "home" / "edged"
    assert not (conf_dir / "var").exists() and not (elsewhere / "state").exists()  # nothing created
