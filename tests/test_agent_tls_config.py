"""The agent's security settings are checked when the config is read: without
``insecure = true`` it needs mqtts://, https://, signing_key and its TLS material, and every
refusal is one line naming the field and the way out; the TLS material (inline PEM or a path
next to the config) must parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tls_helpers import TestCA, signing_pub

from agent.config import SECURE_HOW, AgentConfig, ConfigError, load_config

EXIT_WITHIN = 30.0


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def pki(folder: Path, ca: TestCA, device: str = "ann-laptop") -> dict[str, str]:
    """Write ca.crt, device.crt, device.key into `folder`; their TOML lines, relative."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_text(ca.cert_pem)
    ca.device(device).write(folder, "device")
    return {"tls_ca": '"ca.crt"', "tls_cert": '"device.crt"', "tls_key": '"device.key"'}


SECURE = {
    "tenant": '"contoso"',
    "user_id": '"ann"',
    "client_id": '"ann-laptop"',
    "broker_url": '"mqtts://127.0.0.1"',
    "server_url": '"https://127.0.0.1:8443"',
    "cache_path": '"cache.sqlite"',
}


def write(path: Path, **fields: str | None) -> Path:
    values = {**SECURE, **fields}
    path.write_text("".join(f"{k} = {v}\n" for k, v in values.items() if v is not None))
    return path


def problems(path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path, env=env or {})
    return e.value.problems


def test_a_secure_config_with_files_next_to_it_loads_from_any_directory(
    tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = pki(tmp_path / "etc", ca)
    cfg_path = write(tmp_path / "etc" / "agent.toml", signing_key=f'"{signing_pub()}"', **files)
    monkeypatch.chdir(tmp_path)  # the files are found next to the config, not here
    cfg = load_config(cfg_path, env={})
    assert not cfg.insecure and cfg.broker_tls and cfg.server_tls
    assert cfg.broker_port == 8883  # mqtts without a port
    assert cfg.tls_ca == str(tmp_path / "etc" / "ca.crt")
    assert cfg.tls_key == str(tmp_path / "etc" / "device.key")


def test_inline_pem_is_taken_as_is(tmp_path: Path, ca: TestCA) -> None:
    dev = ca.device("ann-laptop")
    path = write(
        tmp_path / "agent.toml",
        signing_key=f'"{signing_pub()}"',
        tls_ca=f'"""{ca.cert_pem}"""',
        tls_cert=f'"""{dev.cert_pem}"""',
        tls_key=f'"""{dev.key_pem}"""',
    )
    cfg = load_config(path, env={})
    assert cfg.tls_ca == ca.cert_pem and cfg.tls_key == dev.key_pem


def test_not_insecure_refuses_every_plain_or_missing_setting_one_line_each(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path / "agent.toml",
        broker_url='"mqtt://127.0.0.1:1883"',
        server_url='"http://127.0.0.1:8080"',
    )
    lines = problems(path)
    fields = [line.split(": ")[1].split(" ")[0] for line in lines]
    assert fields == ["broker_url", "server_url", "signing_key", "tls_ca", "tls_cert", "tls_key"]
    for line in lines:
        assert line.startswith(f"invalid agent configuration in {path}: ")
        assert line.endswith(SECURE_HOW)  # the enroll bundle, or insecure = true for a lab
    assert "'mqtt://127.0.0.1:1883' is plain MQTT" in lines[0] and "mqtts://" in lines[0]
    assert "'http://127.0.0.1:8080' is plain HTTP" in lines[1] and "https://" in lines[1]


def test_the_defaults_are_refused_too_without_insecure() -> None:
    with pytest.raises(ValueError, match="plain MQTT") as e:
        AgentConfig(tenant="contoso", user_id="ann", client_id="ann-pc")
    assert "plain HTTP" in str(e.value) and "signing_key" in str(e.value)


def test_insecure_allows_plain_links_and_unsigned_state(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", broker_url='"mqtt://127.0.0.1"', server_url='"http://h"')
    cfg = load_config(path, env={"ADDIN_AGENT_INSECURE": "true"})  # as from the environment
    assert cfg.insecure and not cfg.broker_tls and cfg.broker_port == 1883
    assert cfg.signing_key is None and cfg.tls_ca is None
    assert "state messages accepted unsigned (no signing_key)" in cfg.lab_gaps()
    bad = problems(path, env={"ADDIN_AGENT_INSECURE": "maybe"})
    assert len(bad) == 1 and "insecure (from ADDIN_AGENT_INSECURE)" in bad[0]


@pytest.mark.parametrize(
    "key", ["abc", "", "!!!!", "AAAA", "67kWAry6wX///koV5lS1bsvhCym7KNpxTnr9P1AxvA8=AAAA"]
)
def test_a_signing_key_that_is_not_32_base64_bytes_is_refused(tmp_path: Path, key: str) -> None:
    path = write(tmp_path / "agent.toml", insecure="true", signing_key=f'"{key}"')
    if not key:
        assert load_config(path, env={}).signing_key is None  # empty = unset (insecure)
        return
    (line,) = problems(path)
    assert "signing_key: is not a base64 Ed25519 public key (32 bytes" in line


def test_a_missing_file_names_its_full_path(tmp_path: Path, ca: TestCA) -> None:
    files = pki(tmp_path, ca)
    path = write(tmp_path / "agent.toml", signing_key=f'"{signing_pub()}"', **files)
    (tmp_path / "ca.crt").unlink()
    (line,) = problems(path)
    assert f"tls_ca: file {tmp_path / 'ca.crt'} does not exist" in line


def test_corrupt_pem_is_refused_per_field(tmp_path: Path, ca: TestCA) -> None:
    files = pki(tmp_path, ca)
    text = (tmp_path / "device.crt").read_text()
    (tmp_path / "device.crt").write_text(text[: len(text) // 2])  # a truncated copy
    (tmp_path / "device.key").write_text("not a key\n")
    path = write(
        tmp_path / "agent.toml",
        signing_key=f'"{signing_pub()}"',
        tls_ca='"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----"',
        tls_cert=files["tls_cert"],
        tls_key=files["tls_key"],
    )
    lines = problems(path)
    assert len(lines) == 3
    assert "tls_ca: the inline PEM text holds no readable PEM certificate" in lines[0]
    assert f"tls_cert: file {tmp_path / 'device.crt'} holds no readable PEM certificate" in lines[1]
    assert f"tls_key: file {tmp_path / 'device.key'} holds no readable PEM private key" in lines[2]


def test_an_encrypted_key_is_refused(tmp_path: Path, ca: TestCA) -> None:
    dev = ca.device("ann-laptop")
    locked = dev.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ).decode()
    path = write(
        tmp_path / "agent.toml",
        insecure="true",
        tls_cert=f'"""{dev.cert_pem}"""',
        tls_key=f'"""{locked}"""',
    )
    (line,) = problems(path)
    assert "tls_key: the inline PEM text is encrypted with a passphrase" in line


def test_a_certificate_needs_its_own_key_and_this_devices_name(tmp_path: Path, ca: TestCA) -> None:
    dev, other = ca.device("ann-laptop"), ca.device("ann-laptop")
    base = {"insecure": "true", "tls_ca": f'"""{ca.cert_pem}"""'}
    alone = write(tmp_path / "a.toml", **base, tls_cert=f'"""{dev.cert_pem}"""')
    (line,) = problems(alone)
    assert "tls_cert is set but tls_key is not" in line
    mismatched = write(
        tmp_path / "b.toml",
        **base,
        tls_cert=f'"""{dev.cert_pem}"""',
        tls_key=f'"""{other.key_pem}"""',
    )
    (line,) = problems(mismatched)
    assert "tls_key is not the key of tls_cert" in line
    bob = ca.device("bob-pc")
    foreign = write(
        tmp_path / "c.toml",
        **base,
        tls_cert=f'"""{bob.cert_pem}"""',
        tls_key=f'"""{bob.key_pem}"""',
    )
    (line,) = problems(foreign)
    assert "tls_cert is for device 'bob-pc' (its CN) but client_id is 'ann-laptop'" in line


def test_tls_values_from_the_environment(
    tmp_path: Path, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inline PEM in ADDIN_AGENT_TLS_CA; a relative path from the environment is taken
    from the current directory (as for cache_path)."""
    pki(tmp_path / "here", ca)
    path = write(tmp_path / "agent.toml", insecure="true", broker_url='"mqtts://127.0.0.1:1"')
    env = {
        "ADDIN_AGENT_TLS_CA": ca.cert_pem,
        "ADDIN_AGENT_TLS_CERT": "here/device.crt",
        "ADDIN_AGENT_TLS_KEY": "here/device.key",
    }
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, env=env)
    assert cfg.tls_ca == ca.cert_pem and cfg.tls_cert == "here/device.crt"
    wrong = {**env, "ADDIN_AGENT_TLS_CERT": "nowhere/device.crt"}
    (line,) = problems(path, env=wrong)
    assert "tls_cert (from ADDIN_AGENT_TLS_CERT): file nowhere/device.crt does not exist" in line


def test_addin_agent_run_prints_the_refusals_as_error_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "agent.toml", broker_url='"mqtt://127.0.0.1:1"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADDIN_AGENT_")}
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN,
    )
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 5, r.stderr  # broker_url, signing_key, tls_ca, tls_cert, tls_key
    assert all(line.startswith("error: invalid agent configuration") for line in lines)
    assert all("set insecure = true for a lab" in line for line in lines)
