"""The local broker's TLS + SASL front without a network: SCRAM and PLAIN against kafka-python's own client
mechanisms, and its Kafka frames read back with kafka-python's own protocol codec."""

from __future__ import annotations

import pytest
from kafka.net.sasl.scram import ScramClient
from kafka.protocol.sasl import SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeResponse

from embedstream.config import KafkaSettings
from embedstream.kafka_io import KafkaSecurityError, check_connection, client_kwargs
from embedstream.local.stack.secure_front import (
    AuthFailed,
    BrokerSecurity,
    Credentials,
    PlainServer,
    ScramServer,
    authenticate_response,
    authenticate_token,
    handshake_response,
)

CREDS = Credentials.of({"svc": "right-password"}, iterations=4096)


def scram(user: str, password: str, mechanism: str) -> ScramServer:
    client, server = ScramClient(user, password, mechanism), ScramServer(mechanism, CREDS)
    client.process_server_first_message(server.step(client.first_message()))
    client.process_server_final_message(server.step(client.final_message()))  # checks the server's signature
    return server


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_scram_accepts_the_right_password_and_proves_the_server(mechanism):
    server = scram("svc", "right-password", mechanism)
    assert server.done and server.user == "svc"


@pytest.mark.parametrize(("user", "password"), [("svc", "wrong-password"), ("nobody", "right-password")])
def test_scram_refuses_a_wrong_password_and_an_unknown_user_alike(user, password):
    with pytest.raises(AuthFailed, match="invalid credentials"):
        scram(user, password, "SCRAM-SHA-512")


def test_plain_checks_the_password():
    assert PlainServer(CREDS).step(b"\0svc\0right-password") == b""
    for token in (b"\0svc\0wrong", b"\0nobody\0right-password", b"other\0svc\0right-password"):
        with pytest.raises(AuthFailed):
            PlainServer(CREDS).step(token)


def test_credentials_keep_no_password():
    assert "right-password" not in repr(CREDS)
    security = BrokerSecurity("c.pem", "k.pem", {"svc": "right-password"})  # type: ignore[arg-type]
    assert "right-password" not in repr(security)


@pytest.mark.parametrize("version", [0, 1, 2])
def test_sasl_authenticate_frames_decode_as_kafka_python_reads_them(version):
    request = SaslAuthenticateRequest(auth_bytes=b"token")
    request.API_VERSION = version
    request.with_header(correlation_id=5, client_id="cid")
    assert bytes(authenticate_token(request.encode(header=True), version)) == b"token"
    raw = authenticate_response(9, version, 58, "refused", b"answer")
    response = SaslAuthenticateResponse.decode(raw, version=version, header=True)
    assert (response.error_code, response.error_message, bytes(response.auth_bytes)) == (58, "refused", b"answer")


def test_handshake_response_lists_the_mechanisms():
    raw = handshake_response(3, 0, ("SCRAM-SHA-512", "PLAIN"))
    response = SaslHandshakeResponse.decode(raw, version=1, header=True)
    assert response.error_code == 0 and list(response.mechanisms) == ["SCRAM-SHA-512", "PLAIN"]


def test_client_kwargs_pass_sasl_only_with_sasl_and_tls_files_only_with_tls():
    plain = client_kwargs(KafkaSettings(sasl_mechanism="PLAIN", sasl_username="u", ssl_cafile="/ca.pem"))
    assert plain == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    k = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", sasl_username="u",
                      sasl_password="p", ssl_cafile="/ca.pem")  # fmt: skip
    conf = client_kwargs(k)
    assert conf["sasl_plain_password"] == "p" and conf["ssl_cafile"] == "/ca.pem"


def test_sasl_without_a_password_is_named_before_connecting():
    k = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u")
    with pytest.raises(KafkaSecurityError, match=r"needs kafka\.sasl_password"):
        check_connection(k)
