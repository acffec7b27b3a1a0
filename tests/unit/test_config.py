import pytest

from embedstream.config import dump_toml, load_settings
from embedstream.errors import ConfigError


def test_defaults_load():
    s = load_settings()
    assert s.kafka.input_topic == "images" and s.triton.protocol == "grpc"


def test_file_then_environment_wins(tmp_path, monkeypatch):
    cfg = tmp_path / "w.toml"
    cfg.write_text('[kafka]\nbootstrap_servers = "file:9092"\ngroup_id = "g-file"\n[batch]\nmax_size = 8\n')
    monkeypatch.setenv("EMBEDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    s = load_settings(cfg)
    assert s.kafka.bootstrap_servers == "env:9092"
    assert s.kafka.group_id == "g-file" and s.batch.max_size == 8


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("[batch]\nmax_size = 0\n", "batch.max_size"),
        ("[triton]\nprotocol = 'carrier-pigeon'\n", "triton.protocol"),
        ("[kafka]\nbogus = 1\n", "kafka.bogus"),
        ("[batch]\nmax_size = 64\n[encoder]\nmax_batch_size = 32\n", "exceeds encoder.max_batch_size"),
        ("[kafka]\nsession_timeout_ms = 3000\nheartbeat_interval_ms = 2000\n", "heartbeat"),
        ("not toml ===", "not valid TOML"),
    ],
)
def test_bad_values_give_a_clear_config_error(tmp_path, body, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_settings(cfg)


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_settings("nope.toml")


def test_dump_toml_round_trips_including_secrets(tmp_path):
    s = load_settings(
        kafka={"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "s3cret", "group_id": "g"},
        encoder={"arch": "resnet18"},
    )
    path = tmp_path / "out.toml"
    path.write_text(dump_toml(s))
    back = load_settings(path)
    assert back == s
    assert back.kafka.sasl_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(back)


def test_produce_samples_takes_the_config_s_connection_settings(tmp_path, monkeypatch):
    from embedstream import cli
    from embedstream.local import demo

    config = tmp_path / "w.toml"
    config.write_text('[kafka]\nbootstrap_servers = "a:1"\nsecurity_protocol = "SASL_SSL"\nsasl_username = "u"\n')
    seen = []
    monkeypatch.setattr(demo, "produce", lambda k, topic, batch: seen.append(k) or {})
    for extra in ([], ["--bootstrap", "b:2"]):
        assert cli.main(["produce-samples", "--config", str(config), "--count", "2", *extra]) == 0
    assert [(k.bootstrap_servers, k.security_protocol) for k in seen] == [("a:1", "SASL_SSL"), ("b:2", "SASL_SSL")]
