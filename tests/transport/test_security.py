"""TLS, mutual TLS, certificate rotation and bearer tokens against a real server, with
certificates made in the test (cryptography)."""

from __future__ import annotations

import time

import grpc
import pytest
from certificates import Authority, write

from axguard.cli import main
from axguard.errors import ConfigError
from axguard_client import AxguardClient, Unauthenticated, Unavailable
from conftest import EXAMPLES, RunningServer

DIGIT = EXAMPLES / "digit_4.png"


def works(target: str, **options: object) -> bool:
    try:
        with AxguardClient(target, timeout=10, **options) as client:
            return client.check(DIGIT).prediction.class_name == "4"
    except Unavailable:
        return False


def test_tls_handshake_wrong_ca_and_plaintext(demo_engine, pki):
    server = RunningServer(demo_engine, tls={"cert_file": pki["cert"], "key_file": pki["key"]})
    try:
        assert works(server.target, tls_ca=pki["ca_pem"])
        assert not works(server.target, tls_ca=pki["other_pem"])  # not our CA
        assert not works(server.target)  # plaintext to a TLS port
        with AxguardClient(server.target, tls_ca=pki["ca_pem"], timeout=10) as client:
            assert client.health() == "SERVING"
    finally:
        server.stop()


def test_an_expired_server_certificate_is_refused(demo_engine, pki):
    server = RunningServer(demo_engine, tls={"cert_file": pki["expired_cert"],
                                             "key_file": pki["expired_key"]})
    try:
        assert not works(server.target, tls_ca=pki["ca_pem"])
    finally:
        server.stop()


def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(demo_engine, pki):
    server = RunningServer(demo_engine, tls={"cert_file": pki["cert"], "key_file": pki["key"],
                                             "client_ca_file": pki["clients_pem"]})
    try:
        assert works(server.target, tls_ca=pki["ca_pem"], tls_cert=pki["client_cert"],
                     tls_key=pki["client_key"])
        assert not works(server.target, tls_ca=pki["ca_pem"])  # no client certificate
        assert not works(server.target, tls_ca=pki["ca_pem"], tls_cert=pki["stranger_cert"],
                         tls_key=pki["stranger_key"])  # signed by another CA
    finally:
        server.stop()


def test_a_rotated_certificate_is_picked_up_without_restart(demo_engine, pki, tmp_path):
    cert = write(tmp_path, "tls.crt", pki["cert"].read_bytes())
    key = write(tmp_path, "tls.key", pki["key"].read_bytes())
    server = RunningServer(demo_engine, tls={"cert_file": cert, "key_file": key})
    try:
        assert works(server.target, tls_ca=pki["ca_pem"])
        rotated_ca = Authority("rotated CA")
        new_cert, new_key = rotated_ca.issue("localhost")
        new_ca = write(tmp_path, "rotated-ca.pem", rotated_ca.pem())
        time.sleep(0.01)  # a new modification time
        write(tmp_path, "tls.key", new_key)
        write(tmp_path, "tls.crt", new_cert)
        assert works(server.target, tls_ca=new_ca)  # the next handshake uses the new pair
        assert not works(server.target, tls_ca=pki["ca_pem"])
        assert server.parts.certificates.reloads == 1
    finally:
        server.stop()


def test_bad_tls_settings_are_refused(demo_engine, pki):
    from pydantic import ValidationError

    from axguard.config import load_settings

    with pytest.raises(ValidationError, match="both cert_file and key_file"):
        load_settings(server={"tls": {"cert_file": pki["cert"]}})
    with pytest.raises(ConfigError) as info:
        RunningServer(demo_engine, tls={"cert_file": pki["folder"] / "missing.pem",
                                        "key_file": pki["key"]})
    assert info.value.field == "server.tls"


def test_bearer_tokens(demo_engine, tmp_path, caplog):
    tokens = write(tmp_path, "tokens", b"# pipeline tokens\ns3cret-one\n\nother-token\n")
    server = RunningServer(demo_engine, auth={"token_file": tokens})
    try:
        with caplog.at_level("INFO", logger="axguard"):
            for token in (None, "wrong", "s3cret-on"):
                with AxguardClient(server.target, timeout=10, token=token) as client:
                    with pytest.raises(Unauthenticated, match="authorization"):
                        client.check(DIGIT)
                    with pytest.raises(Unauthenticated):
                        list(client.diagnose(DIGIT, max_steps=3))
                    assert client.health() == "SERVING"  # probes need no token
        assert works(server.target, token="s3cret-one")
        assert works(server.target, token="other-token")
        assert "s3cret" not in caplog.text and "wrong" not in caplog.text
        registry = server.metrics.registry
        assert registry.get_sample_value("axguard_auth_refused_total",
                                         {"grpc_method": "Check"}) == 3
        assert registry.get_sample_value("axguard_grpc_requests_total", {
            "grpc_method": "Check", "grpc_code": "UNAUTHENTICATED"}) == 3
        time.sleep(0.01)
        write(tmp_path, "tokens", b"rotated-token\n")  # the Secret was updated
        assert works(server.target, token="rotated-token")
        with (AxguardClient(server.target, timeout=10, token="s3cret-one") as client,
              pytest.raises(Unauthenticated)):
            client.check(DIGIT)
    finally:
        server.stop()


def test_cli_client_speaks_tls_and_tokens(demo_engine, pki, tmp_path, capsys):
    tokens = write(tmp_path, "tokens", b"cli-token\n")
    server = RunningServer(demo_engine, tls={"cert_file": pki["cert"], "key_file": pki["key"]},
                           auth={"token_file": tokens})
    try:
        common = ["--target", server.target, "--tls-ca", str(pki["ca_pem"])]
        assert main(["check", str(DIGIT), *common, "--token-file", str(tokens)]) == 0
        assert "predicted '4'" in capsys.readouterr().out
        assert main(["check", str(DIGIT), *common]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert main(["health", *common]) == 0
    finally:
        server.stop()


def test_plaintext_stays_the_default(demo_engine):
    server = RunningServer(demo_engine)
    try:
        with grpc.insecure_channel(server.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
        assert works(server.target)
    finally:
        server.stop()
