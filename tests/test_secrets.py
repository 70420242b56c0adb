"""Secrets never leak: URL credentials and passwords from files and the environment appear in no log line,
traceback, stats payload, HTTP page, systemd STATUS= or `edged config` output."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from edged import secrets
from edged.config import CaptureConfig, ConfigError, MqttConfig, config_to_dict, load_config, read_password
from edged.secrets import SecretFilter, redact_text, redact_url, register_secret
from tests.conftest import ROOT, free_port, wait_for_port
from tests.mqttutil import Collector


@pytest.mark.parametrize("url, shown", [
    ("rtsp://user:S3cret@cam.lan:554/stream1", "rtsp://user:***@cam.lan:554/stream1"),
    ("rtsp://:S3cret@cam/x", "rtsp://:***@cam/x"),
    # An unencoded '@' or '/' in the password (a common mistake) still hides all of it.
    ("rtsp://admin:p@ss/w0rd@10.0.0.7/live", "rtsp://admin:***@10.0.0.7/live"),
    ("rtsp://admin:pa?ss#w0rd@10.0.0.7/live", "rtsp://admin:***@10.0.0.7/live"),
    ("http://cam/snap.jpg?mail=a@b.org&token=T", "http://cam/snap.jpg?mail=a@b.org&token=***"),
    ("http://cam/snap.cgi?user=admin&pwd=S3cret&channel=1", "http://cam/snap.cgi?user=admin&pwd=***&channel=1"),
    ("https://h/x.m3u8?access_token=abc&X-Amz-Signature=f00&mode=1&api_key=k",
     "https://h/x.m3u8?access_token=***&X-Amz-Signature=***&mode=1&api_key=***"),
    ("rtsp://user@cam/x", "rtsp://user@cam/x"),  # no password: the user is not a secret
    ("rtsp://cam:554/x?channel=2", "rtsp://cam:554/x?channel=2"),
    ("demo", "demo"),
    ("/videos/door.mp4", "/videos/door.mp4"),
])
def test_redact_url(url: str, shown: str):
    assert redact_url(url) == shown


def test_redact_text_finds_every_url_and_registered_secret():
    register_secret("Reg1stered!pw")
    text = ("open rtsp://a:S3cret@h/x failed, then http://b:Oth3r@h2:8080/y?token=T0k and "
            "password Reg1stered!pw, encoded Reg1stered%21pw")
    out = redact_text(text)
    assert out == ("open rtsp://a:***@h/x failed, then http://b:***@h2:8080/y?token=*** and "
                   "password ***, encoded ***")
    assert redact_text(out) == out  # idempotent


def test_short_secrets_are_not_replaced_in_free_text_but_warned_about(monkeypatch, caplog):
    monkeypatch.setattr(secrets, "_warned_short", False)
    caplog.set_level(logging.WARNING, logger="edged.secrets")
    register_secret("ab")
    register_secret("cd")
    assert redact_text("about a cab") == "about a cab"  # normal words stay readable
    assert redact_url("rtsp://u:ab@cam/x") == "rtsp://u:***@cam/x"  # structure still hides it
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "shorter than 4 characters" in warnings[0]


def test_filter_redacts_message_arguments_tracebacks_and_stack():
    register_secret("F1lterSecret")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(SecretFilter())
    logger = logging.getLogger("edged.test.filter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        logger.warning("opening %s with %s", "rtsp://u:S3cretArg@cam/x", "F1lterSecret")
        try:
            raise OSError("cannot open http://u:S3cretExc@cam/y?token=T0kenExc")
        except OSError:
            logger.exception("failed")
        logger.info("where is F1lterSecret used", stack_info=True)
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert "rtsp://u:***@cam/x with ***" in out
    assert "Traceback" in out and "http://u:***@cam/y?token=***" in out
    assert "Stack (most recent call last)" in out
    for secret in ("S3cretArg", "F1lterSecret", "S3cretExc", "T0kenExc"):
        assert secret not in out


_LOGGING_SCRIPT = """
import logging, threading
from edged.logs import setup_logging
from edged.secrets import register_secret
setup_logging("debug", "text")
register_secret("Pr0cessSecret")
logging.getLogger("somelib").debug("connect to rtsp://cam:Pr0cessS3cret@h/x")
logging.getLogger("edged.x").error("password is Pr0cessSecret")
t = threading.Thread(target=lambda: open("/nonexistent/rtsp://u:Thr3adS3cret@h/x"), name="worker")
t.start(); t.join()
raise RuntimeError("uncaught with http://u:Ma1nS3cret@h/y")
"""


def test_setup_logging_installs_the_filter_for_every_logger_and_uncaught_exceptions():
    r = subprocess.run([sys.executable, "-c", _LOGGING_SCRIPT], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 1
    err = r.stderr
    assert "somelib: connect to rtsp://cam:***@h/x" in err and "edged.x: password is ***" in err
    assert "uncaught exception in thread worker" in err and "rtsp://u:***@h/x" in err
    assert "uncaught exception" in err and "http://u:***@h/y" in err and "Traceback" in err
    for secret in ("Pr0cessS3cret", "Pr0cessSecret", "Thr3adS3cret", "Ma1nS3cret"):
        assert secret not in err


# ---------------------------------------------------------------------------------------------- config
def test_config_to_dict_redacts_url_credentials_and_every_password(tmp_path: Path):
    f = tmp_path / "edged.yaml"
    f.write_text("capture:\n  source: rtsp://user:S3cret@cam/x?token=T0ken\n  password_env: CAM_PW\n"
                 "mqtt:\n  username: edged\n  password: MqttS3cret\n")
    data = config_to_dict(load_config(f))
    assert data["capture"]["source"] == "rtsp://user:***@cam/x?token=***"
    assert data["capture"]["password_env"] == "CAM_PW"  # where the secret is, not the secret
    assert data["mqtt"]["password"] == "***" and data["mqtt"]["username"] == "edged"
    assert "S3cret" not in json.dumps(data) and "T0ken" not in json.dumps(data)
    assert config_to_dict(load_config(f), redact=False)["capture"]["source"].startswith("rtsp://user:S3cret@")


@pytest.mark.parametrize("capture, message", [
    ({"source": "rtsp://cam/x", "username": "u", "password_file": "/p", "password_env": "P"},
     "give password_file or password_env, not both"),
    ({"source": 0, "username": "u"}, "apply to a network stream source"),
    ({"source": "clip.mp4", "password_env": "P"}, "apply to a network stream source"),
    ({"source": "rtsp://cam/x", "password_env": "P"}, "a stream password needs a user"),
])
def test_stream_credential_keys_are_checked(capture: dict, message: str):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overlay={"capture": capture})
    assert "capture" in str(info.value)


def test_mqtt_password_env_is_read_registered_and_exclusive(monkeypatch):
    monkeypatch.setenv("EDGED_TEST_MQTT_PW", "EnvMqttS3cret")
    cfg = MqttConfig(username="edged", password_env="EDGED_TEST_MQTT_PW")
    assert read_password(cfg) == "EnvMqttS3cret"
    assert redact_text("sent EnvMqttS3cret") == "sent ***"
    monkeypatch.delenv("EDGED_TEST_MQTT_PW")
    with pytest.raises(ConfigError, match="mqtt.password_env: environment variable EDGED_TEST_MQTT_PW is not set"):
        read_password(cfg)
    with pytest.raises(ConfigError, match="only one of password, password_file, password_env"):
        load_config(None, overlay={"mqtt": {"password": "x", "password_env": "Y"}})


def test_password_file_path_expands_credentials_directory(tmp_path: Path, monkeypatch):
    """systemd's LoadCredential= puts the file in $CREDENTIALS_DIRECTORY."""
    (tmp_path / "camera").write_text("Cred1ntialS3cret\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    from edged.config import read_stream_password

    cfg = CaptureConfig(source="rtsp://cam/x", username="u", password_file="$CREDENTIALS_DIRECTORY/camera")
    assert read_stream_password(cfg) == "Cred1ntialS3cret"


def test_invalid_values_are_echoed_redacted(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("capture:\n  name: 'rtsp://u:Ech0S3cret@cam/x'\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert "capture.name (line 2)" in str(info.value) and "rtsp://u:***@cam/x" in str(info.value)
    assert "Ech0S3cret" not in str(info.value)


def test_edged_config_prints_no_secret(tmp_path: Path):
    f = tmp_path / "edged.yaml"
    f.write_text("capture:\n  source: 'rtsp://user:S3cret@cam/x?sig=S1gS3cret'\nmqtt:\n  password: MqttS3cret\n")
    r = subprocess.run([sys.executable, "-m", "edged", "config", "--config", str(f)], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "S3cret" not in r.stdout + r.stderr
    shown = yaml.safe_load(r.stdout)
    assert shown["capture"]["source"] == "rtsp://user:***@cam/x?sig=***" and shown["mqtt"]["password"] == "***"


_CAPTURE_SCRIPT = """
import sys
from edged.logs import setup_logging
setup_logging("debug", "text")
from edged.capture import CaptureThread, open_source
from edged.config import CaptureConfig
cfg = CaptureConfig(source=sys.argv[1], timeout_s=1.0, reconnect_min_s=0.05, reconnect_max_s=0.1)
cap = CaptureThread(open_source(cfg), cfg).start()
assert cap.wait_for(lambda s: s.reconnects >= 3, timeout=60)
print(cap.stats()["last_error"])
cap.stop()
"""


@pytest.mark.parametrize("user_env", [{}, {"OPENCV_LOG_LEVEL": "DEBUG"}])
def test_native_opencv_and_ffmpeg_output_never_shows_the_stream_url(user_env: dict):
    """FFmpeg and OpenCV write to stderr themselves, beyond any Python redaction: nothing of theirs may
    carry the URL (FFmpeg is quieted; OpenCV names the URL only for other backends than FFmpeg)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    env.update(user_env)
    r = subprocess.run([sys.executable, "-c", _CAPTURE_SCRIPT, f"rtsp://user:S3cret@127.0.0.1:{port}/x"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"connection to 127.0.0.1:{port} refused" in r.stdout
    assert f"rtsp://user:***@127.0.0.1:{port}/x" in r.stderr  # edged's own lines, redacted
    assert "S3cret" not in r.stdout + r.stderr
    assert "[tcp @" not in r.stderr  # FFmpeg's own chatter is off


# ---------------------------------------------------------------------------------------------- end to end
def _http_get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:  # /healthz and /snapshot.jpg answer 503 without frames
        return exc.read()


@pytest.mark.slow
def test_a_stream_password_appears_nowhere_while_the_daemon_reconnects(tmp_path: Path, broker):
    """The issue's proof: `rtsp://user:S3cret@127.0.0.1:<closed port>/x`, plus a camera password from the
    environment and an MQTT password from a file, all at logging.level debug; every output is searched."""
    cam_port, web_port = free_port(), free_port()  # nothing listens on cam_port: reconnects forever
    env_secret, file_secret = "EnvCamS3cretValue", "MqttF1leS3cretValue"
    secrets_ = ("S3cret", env_secret, file_secret)
    (tmp_path / "mqtt.pass").write_text(file_secret + "\n")
    cfg_path = tmp_path / "edged.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "device_id": "leakcheck",
        "state_dir": str(tmp_path / "state"),
        "capture": {"source": f"rtsp://user:S3cret@127.0.0.1:{cam_port}/x", "timeout_s": 1.0,
                    "reconnect_min_s": 0.1, "reconnect_max_s": 0.3, "password_env": "EDGED_TEST_CAM_PASSWORD"},
        "mqtt": {"host": "127.0.0.1", "port": broker.port, "stats_interval_s": 1.0, "username": "edged",
                 "password_file": str(tmp_path / "mqtt.pass")},
        "web": {"enabled": True, "host": "127.0.0.1", "port": web_port},
        "logging": {"level": "debug", "format": "text"},
    }))
    shown_url = f"rtsp://user:***@127.0.0.1:{cam_port}/x"

    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    env = dict(os.environ, NOTIFY_SOCKET=str(notify_path), EDGED_TEST_CAM_PASSWORD=env_secret)
    for name in ("OPENCV_FFMPEG_LOGLEVEL", "OPENCV_LOG_LEVEL", "OPENCV_FFMPEG_DEBUG", "JOURNAL_STREAM"):
        env.pop(name, None)  # edged's own defaults, as under systemd
    sub = Collector(broker.port, "#")
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    proc = None
    try:
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "--config", str(cfg_path)],
                                    stdout=out, stderr=err, cwd=ROOT, env=env)

        def reconnecting_stats(ms) -> int:
            return sum(1 for m in ms if m.topic.endswith("/stats") and m.json()["capture"]["reconnects"] >= 2)

        assert sub.wait_for(lambda ms: reconnecting_stats(ms) >= 2, timeout=180), err_path.read_text()[-3000:]
        wait_for_port(web_port)
        pages = {p: _http_get(f"http://127.0.0.1:{web_port}{p}")
                 for p in ("/", "/index.html", "/status.json", "/metrics", "/healthz", "/snapshot.jpg")}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert sub.wait_for(lambda ms: any(m.payload == b"offline" for m in ms), timeout=30)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        sub.close()
    notify.setblocking(False)
    datagrams = []
    while True:
        try:
            datagrams.append(notify.recv(65536).decode())
        except BlockingIOError:
            break
    notify.close()
    shown_config = subprocess.run([sys.executable, "-m", "edged", "config", "--config", str(cfg_path)],
                                  capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert shown_config.returncode == 0, shown_config.stderr

    outputs = {"stdout": out_path.read_text(), "stderr": err_path.read_text(),
               "edged config": shown_config.stdout + shown_config.stderr}
    outputs.update({f"mqtt {m.topic} #{i}": m.payload.decode(errors="replace") for i, m in enumerate(sub.messages)})
    outputs.update({f"http {p}": body.decode(errors="replace") for p, body in pages.items()})
    outputs.update({f"sd_notify #{i}": d for i, d in enumerate(datagrams)})
    leaks = {where: s for where, text in outputs.items() for s in secrets_ if s in text}
    assert not leaks, f"secrets leaked: {leaks}"

    # ... and it looked in the right places: the redacted URL is where the real one would have been.
    stats = [m.json() for m in sub.messages if m.topic.endswith("/stats")]
    assert stats[-1]["capture"]["source"] == f"url {shown_url}"
    assert f"connection to 127.0.0.1:{cam_port} refused" in stats[-1]["capture"]["last_error"]
    assert json.loads(pages["/status.json"])["capture"]["source"] == f"url {shown_url}"
    assert any(d.startswith("READY=1") and shown_url in d for d in datagrams), datagrams
    assert shown_url in outputs["stderr"] and "retrying in" in outputs["stderr"]
    assert yaml.safe_load(shown_config.stdout)["capture"]["source"] == shown_url
    assert yaml.safe_load(shown_config.stdout)["mqtt"]["password_file"] == str(tmp_path / "mqtt.pass")
    # FFmpeg's and OpenCV's own chatter (which at debug levels prints the URL) stayed off stderr.
    assert "[tcp @" not in outputs["stderr"] and "VIDEOIO(FFMPEG)" not in outputs["stderr"]
