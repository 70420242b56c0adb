"""Start-up checks (edged.preflight) and `edged check-config`: what `edged run` refuses, check-config
refuses too, naming the key and the file. Real files throughout: edged's own models, a truncated copy
of its encoder, real (and broken) certificate files."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml

from conftest import ROOT, need_module
from edged import exitcodes
from edged.config import load_config
from edged.preflight import Problem, exit_code, preflight

ENCODER = ROOT / "edged" / "models" / "encoder.tflite"


def _config(tmp_path: Path, **sections: Any) -> Path:
    """A config that passes every check (demo source, default models, no TLS) plus `sections`."""
    data: Dict[str, Any] = {"state_dir": str(tmp_path / "state"), "capture": {"source": "demo"},
                            "web": {"enabled": False}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    path = tmp_path / "edged.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _problems(path: Path) -> List[Problem]:
    return preflight(load_config(path), path)


def _check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edged", "check-config", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_a_usable_config_has_no_problem_and_creates_nothing(tmp_path):
    path = _config(tmp_path, state_dir="deep/state/dir")
    assert _problems(path) == []
    assert not (tmp_path / "deep").exists(), "preflight must not create the state directory"


def test_missing_detector_model_names_key_and_file(tmp_path):
    path = _config(tmp_path, detector={"model": "nope.tflite"})
    assert [(p.key, p.exit_code) for p in _problems(path)] == [("detector.model", exitcodes.CONFIG)]
    message = _problems(path)[0].message
    assert str(tmp_path / "nope.tflite") in message and "not found" in message


def test_corrupt_encoder_names_key_and_file(tmp_path):
    truncated = tmp_path / "encoder-truncated.tflite"
    truncated.write_bytes(ENCODER.read_bytes()[: ENCODER.stat().st_size // 2])
    path = _config(tmp_path, encoder={"model": truncated.name})
    problems = _problems(path)
    assert [(p.key, p.exit_code) for p in problems] == [("encoder.model", exitcodes.CONFIG)]
    assert str(truncated) in problems[0].message and "not a valid TFLite model" in problems[0].message


def test_encoder_is_not_checked_when_run_does_not_load_it(tmp_path):
    truncated = tmp_path / "encoder-truncated.tflite"
    truncated.write_bytes(ENCODER.read_bytes()[:1000])
    assert _problems(_config(tmp_path, encoder={"model": truncated.name, "enabled": False})) == []
    assert _problems(_config(tmp_path, encoder={"model": truncated.name}, tracker={"use_appearance": False})) == []


def test_class_missing_from_the_model(tmp_path):
    problems = _problems(_config(tmp_path, detector={"classes": ["person", "persn"]}))
    assert [(p.key, p.exit_code) for p in problems] == [("detector.classes", exitcodes.CONFIG)]
    assert "persn" in problems[0].message and "yolov3-tiny-416-int8.tflite" in problems[0].message


def test_missing_tls_ca_file(tmp_path):
    path = _config(tmp_path, mqtt={"tls": {"enabled": True, "ca_file": "ca.pem"}})
    problems = _problems(path)
    assert [(p.key, p.exit_code) for p in problems] == [("mqtt.tls.ca_file", exitcodes.CONFIG)]
    assert str(tmp_path / "ca.pem") in problems[0].message


def test_tls_ca_file_that_is_no_certificate(tmp_path):
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    problems = _problems(_config(tmp_path, mqtt={"tls": {"enabled": True, "ca_file": "ca.pem"}}))
    assert [p.key for p in problems] == ["mqtt.tls.ca_file"]
    assert str(tmp_path / "ca.pem") in problems[0].message


def test_valid_tls_ca_file_passes_and_tls_is_only_checked_when_used(tmp_path):
    _write_self_signed_ca(tmp_path / "ca.pem")
    assert _problems(_config(tmp_path, mqtt={"tls": {"enabled": True, "ca_file": "ca.pem"}})) == []
    # The daemon builds no TLS context when TLS or MQTT is off: neither does preflight.
    assert _problems(_config(tmp_path, mqtt={"tls": {"enabled": False, "ca_file": "absent.pem"}})) == []
    assert _problems(_config(tmp_path, mqtt={"enabled": False, "tls": {"enabled": True, "ca_file": "absent.pem"}})) == []


def test_unreadable_password_file(tmp_path):
    problems = _problems(_config(tmp_path, mqtt={"username": "dev", "password_file": "secret.txt"}))
    assert [(p.key, p.exit_code) for p in problems] == [("mqtt.password_file", exitcodes.CONFIG)]
    assert str(tmp_path / "secret.txt") in problems[0].message
    (tmp_path / "secret.txt").write_text("s3cret\n")
    assert _problems(_config(tmp_path, mqtt={"username": "dev", "password_file": "secret.txt"})) == []


def test_missing_video_file_is_no_input(tmp_path):
    problems = _problems(_config(tmp_path, capture={"source": "clips/door.mp4"}))
    assert [(p.key, p.exit_code) for p in problems] == [("capture.source", exitcodes.NO_INPUT)]
    assert str(tmp_path / "clips" / "door.mp4") in problems[0].message


def test_cameras_and_streams_are_not_checked_but_a_bad_scheme_is(tmp_path):
    for source in ("/dev/video7", 3, "rtsp://127.0.0.1:1/stream"):
        assert _problems(_config(tmp_path, capture={"source": source})) == [], source
    problems = _problems(_config(tmp_path, capture={"source": "ftp://127.0.0.1/x.mp4"}))
    assert [(p.key, p.exit_code) for p in problems] == [("capture.source", exitcodes.CONFIG)]
    assert "unsupported URL scheme 'ftp'" in problems[0].message


def test_demo_without_scikit_image(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # what an install without the demo extra sees
    problems = _problems(_config(tmp_path))
    assert [(p.key, p.exit_code) for p in problems] == [("capture.source", exitcodes.NO_INPUT)]
    assert "scikit-image" in problems[0].message


def test_state_dir_under_a_file_cannot_be_created(tmp_path):
    (tmp_path / "plain-file").write_text("x")
    problems = _problems(_config(tmp_path, state_dir="plain-file/state"))
    assert [(p.key, p.exit_code) for p in problems] == [("state_dir", exitcodes.CANT_CREATE)]
    assert str(tmp_path / "plain-file") in problems[0].message


def test_exit_code_prefers_config_problems():
    no_input = Problem("capture.source", "x", exitcodes.NO_INPUT)
    config = Problem("detector.model", "y", exitcodes.CONFIG)
    assert exit_code([]) == exitcodes.OK
    assert exit_code([no_input]) == exitcodes.NO_INPUT
    assert exit_code([no_input, config]) == exitcodes.CONFIG
    assert str(config) == "detector.model: y"


# ---------------------------------------------------------------------------------------------- CLI
def test_check_config_names_every_problem_run_would_refuse(tmp_path):
    truncated = tmp_path / "enc.tflite"
    truncated.write_bytes(ENCODER.read_bytes()[:5000])
    path = _config(tmp_path, detector={"model": "missing-detector.tflite"}, encoder={"model": "enc.tflite"},
                   capture={"source": "missing.mp4"}, mqtt={"tls": {"enabled": True, "ca_file": "missing-ca.pem"}})
    r = _check_config(path)
    assert r.returncode == exitcodes.CONFIG, r.stderr
    assert "OK" not in r.stdout
    lines = r.stderr.splitlines()
    for key, file in (("detector.model", "missing-detector.tflite"), ("encoder.model", "enc.tflite"),
                      ("capture.source", "missing.mp4"), ("mqtt.tls.ca_file", "missing-ca.pem")):
        assert any(line.startswith(f"  - {key}: ") and str(tmp_path / file) in line for line in lines), (key, r.stderr)


def test_check_config_exit_code_of_a_missing_video_alone(tmp_path):
    r = _check_config(_config(tmp_path, capture={"source": "gone.mp4"}))
    assert r.returncode == exitcodes.NO_INPUT
    assert f"capture.source: video file {tmp_path / 'gone.mp4'} does not exist" in r.stderr


def test_check_config_hides_a_camera_password(tmp_path):
    r = _check_config(_config(tmp_path, capture={"source": "rtsp://admin:S3cret@127.0.0.1:1/x"}))
    assert r.returncode == 0, r.stderr
    assert "S3cret" not in r.stdout + r.stderr and "admin:***@127.0.0.1" in r.stdout


def _write_self_signed_ca(path: Path) -> None:
    x509 = need_module("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edged preflight test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
