"""A hypothesis strategy of malformed or hostile remote-config payloads (tests/test_remote_config*.py)."""

from __future__ import annotations

import json

from hypothesis import strategies as st

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)
_sections = st.sampled_from(["capture", "detector", "encoder", "tracker", "events", "mqtt", "web", "logging",
                             "supervisor", "remote_config", "device_id", "state_dir", "bogus"])
_keys = st.sampled_from(["source", "score_threshold", "classes", "max_age", "n_init", "zones", "lines", "host",
                         "enabled", "level", "port", "model", "nms_iou", "gating_threshold", "x", ""])


@st.composite
def hostile_payloads(draw) -> bytes:
    """Malformed or hostile desired messages, every one of them invalid."""
    kind = draw(st.integers(0, 9))
    if kind == 0:  # wrong types / unknown keys in a well-formed envelope (one unknown key at least)
        overlay = draw(st.dictionaries(_sections, st.dictionaries(_keys, _values, max_size=3), max_size=3))
        overlay.setdefault(draw(_sections), {})
        section = next(iter(overlay))
        if isinstance(overlay[section], dict):
            overlay[section]["no_such_key_" + draw(st.text("abcxyz", min_size=1, max_size=5))] = draw(_values)
        else:
            overlay["no_such_section"] = 1
        return json.dumps({"version": draw(st.integers(1, 10**6)), "config": overlay}, allow_nan=True).encode()
    if kind == 1:  # version in every wrong shape
        version = draw(st.one_of(st.text(max_size=8), st.floats(), st.integers(max_value=0), st.booleans(),
                                 st.none(), st.integers(min_value=2**63, max_value=2**200)))
        return json.dumps({"version": version, "config": {}}).encode()
    if kind == 2:  # arbitrary bytes (invalid UTF-8 included)
        return draw(st.binary(max_size=300))
    if kind == 3:  # deep nesting
        depth = draw(st.integers(13, 400))
        return b'{"version": 1, "config": ' + b'{"a":' * depth + b'1' + b'}' * depth + b'}'
    if kind == 4:  # huge bodies
        size = draw(st.sampled_from([65537, 200_000, 10 * 1024 * 1024]))
        return b'{"version": 1, "config": {"x": "' + b"a" * size + b'"}}'
    if kind == 5:  # YAML tags that construct Python objects
        tag = draw(st.sampled_from(["!!python/object/apply:os.system", "!!python/name:os.system",
                                    "!!python/object/new:subprocess.Popen", "!!python/module:os"]))
        return f"version: 1\nconfig: {tag} [\"true\"]\n".encode()
    if kind == 6:  # NaN / infinities in JSON and YAML
        return draw(st.sampled_from([
            b'{"version": 1, "config": {"tracker": {"max_age": NaN}}}',
            b'{"version": 1, "config": {"tracker": {"gating_threshold": Infinity}}}',
            b'version: 1\nconfig: {tracker: {gating_threshold: .inf}}',
            b'version: 1\nconfig: {detector: {score_threshold: .nan}}',
        ]))
    if kind == 7:  # huge numbers where the schema wants small ones
        n = draw(st.integers(min_value=10**6, max_value=10**300))
        key = draw(st.sampled_from(["tracker.max_age", "detector.max_detections", "web.port", "tracker.n_init"]))
        sec, k = key.split(".")
        return json.dumps({"version": 1, "config": {sec: {k: n}}}).encode()
    if kind == 8:  # local-only keys
        key = draw(st.sampled_from(["device_id", "state_dir", "mqtt.host", "mqtt.password", "remote_config.enabled",
                                    "mqtt.tls.enabled", "web.password_file"]))
        parts = key.split(".")
        overlay = {parts[0]: "x"} if len(parts) == 1 else {parts[0]: {parts[1]: "x"}}
        return json.dumps({"version": 1, "config": overlay}).encode()
    # Free text: YAML scalars, never a mapping with version and config.
    return ("# " + draw(st.text(max_size=200)).replace("\n", " ")).encode("utf-8", "surrogatepass")
