"""`embedstream train`: fit on generated normal data, save safetensors + sidecar, flag injected anomalies."""

import json

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open

from embedstream.cli import main
from embedstream.config import EncoderSettings
from embedstream.encoders import Sidecar, get_family
from embedstream.errors import ConfigError
from embedstream.export import export_model
from embedstream.training import synthetic
from embedstream.training.data import load_series
from embedstream.training.fit import TrainConfig, train_from_file

WINDOW = 32


@pytest.fixture(scope="module")
def normal_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "normal.csv"
    pcsv.write_csv(synthetic.normal_table(16, 600, seed=0), str(path))
    return path


@pytest.fixture(scope="module")
def trained(normal_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    return train_from_file(normal_csv, out, cfg=TrainConfig(window=WINDOW))


def settings(paths, family):
    return EncoderSettings(family=family, weights=str(paths[family]))


def test_autoencoder_flags_injected_anomalies(trained):
    model = get_family("autoencoder").build(settings(trained, "autoencoder"))
    results = []
    for seed in (11, 12):
        sig = synthetic.labelled_signal(200, WINDOW, seed=seed)
        with torch.inference_mode():
            _, err, flag = model(torch.from_numpy(sig.windows()))
        flags = flag.squeeze(1).numpy()
        precision, recall = synthetic.precision_recall(flags, sig.labels)
        kinds = np.array(sig.kinds)
        per_kind = {k: float(flags[kinds == k].mean()) for k in synthetic.KINDS}
        print(f"seed {seed}: precision {precision:.3f} recall {recall:.3f} per kind {per_kind}")
        results.append((precision, recall))
        assert recall >= 0.9 and precision >= 0.8, (precision, recall, per_kind)
        assert err.dtype == torch.float32 and flag.dtype == torch.bool


def test_weights_are_safetensors_with_a_sidecar_that_says_how_to_rebuild(trained):
    ae = trained["autoencoder"]
    side = Sidecar.read(ae.with_suffix(".json"))
    raw = json.loads(ae.with_suffix(".json").read_text())
    assert raw["threshold_rule"]["kind"] == "quantile" and raw["threshold_rule"]["q"] == 0.995
    assert (side.window_length, side.channels, side.latent, side.hidden) == (WINDOW, 3, 8, 64)
    assert len(side.mean) == len(side.std) == 3 and side.channel_names == ("ch0", "ch1", "ch2")
    with safe_open(str(ae), "pt") as f:
        assert float(f.get_tensor("threshold")) == pytest.approx(side.threshold)
        np.testing.assert_allclose(f.get_tensor("std").flatten().numpy(), side.std, rtol=1e-6)
    lstm = Sidecar.read(trained["lstm"].with_suffix(".json"))
    assert lstm.family == "lstm" and lstm.training["objective"] == "next_step"
    # Predicting the next normalised point beats predicting the mean (loss 1.0) by far.
    assert lstm.training["holdout_loss"] < 0.2
    with safe_open(str(trained["lstm"]), "pt") as f:
        assert not any(k.startswith("head") for k in f.keys()), "the training head is not served"


def test_lstm_embeds_windows_with_its_hidden_size(trained):
    model = get_family("lstm").build(settings(trained, "lstm"))
    spec = get_family("lstm").describe(settings(trained, "lstm"))
    sig = synthetic.labelled_signal(8, WINDOW, seed=3)
    with torch.inference_mode():
        emb = model(torch.from_numpy(sig.windows()))
    assert emb.shape == (8, spec.embedding_dim) == (8, 16)
    assert spec.inputs[0].dims == (WINDOW, 3) and spec.modality == "timeseries"


@pytest.mark.parametrize("family", ["lstm", "autoencoder"])
def test_trained_models_export_to_torchscript_that_matches(trained, family, tmp_path):
    enc = settings(trained, family)
    spec = export_model(enc, tmp_path)
    scripted = torch.jit.load(str(tmp_path / spec.name / "1" / "model.pt"))
    x = torch.from_numpy(synthetic.labelled_signal(5, WINDOW, seed=4).windows())
    with torch.inference_mode():
        want, got = get_family(family).build(enc)(x), scripted(x)
    want, got = ((v,) if isinstance(v, torch.Tensor) else v for v in (want, got))
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g.float().numpy(), w.float().numpy(), rtol=1e-4, atol=1e-5)
    if family == "autoencoder":
        assert [o.column for o in spec.outputs] == [None, "reconstruction_error", "anomaly"]
        assert spec.extra["threshold"] == pytest.approx(Sidecar.read(trained[family].with_suffix(".json")).threshold)


def test_weights_without_sidecar_of_another_family_or_pickled_are_refused(trained, tmp_path):
    with pytest.raises(ConfigError, match="holds a 'autoencoder' model"):
        get_family("lstm").describe(EncoderSettings(family="lstm", weights=str(trained["autoencoder"])))
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(trained["lstm"].read_bytes())
    with pytest.raises(ConfigError, match="sidecar"):
        get_family("lstm").build(EncoderSettings(family="lstm", weights=str(lonely)))
    with pytest.raises(ConfigError, match="never a pickle"):
        get_family("autoencoder").build(EncoderSettings(family="autoencoder", weights=str(tmp_path / "w.pt")))
    with pytest.raises(ConfigError, match=r"encoder\.weights is not set"):
        get_family("autoencoder").describe(EncoderSettings(family="autoencoder"))
    with pytest.raises(ConfigError, match="latent"):
        get_family("autoencoder").describe(EncoderSettings(family="autoencoder", arch="w8c3h4", weights="random"))


def test_parquet_and_csv_read_the_same_series(normal_csv, tmp_path):
    table = pcsv.read_csv(normal_csv)
    pq.write_table(table, tmp_path / "normal.parquet")
    a, names_a = load_series(normal_csv)
    b, names_b = load_series(tmp_path / "normal.parquet", channels=["ch0", "ch1", "ch2"])
    assert names_a == names_b == ["ch0", "ch1", "ch2"] and len(a) == len(b) == 16
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_the_train_command_writes_weights_for_export(normal_csv, tmp_path, capsys):
    args = ["--family", "autoencoder", "--epochs", "2", "--window", "16", "--no-progress"]
    code = main(["train", "--data", str(normal_csv), "--out", str(tmp_path), *args])
    assert code == 0
    assert (tmp_path / "autoencoder.safetensors").is_file() and (tmp_path / "autoencoder.json").is_file()
    assert not (tmp_path / "lstm.safetensors").exists()
    assert 'family = "autoencoder"' in capsys.readouterr().out
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path), "--no-progress"]) == 2


def test_a_topic_range_becomes_series_in_time_order_and_what_is_not_normal_traffic_is_skipped():
    from collections import defaultdict

    from embedstream.training.topic_series import _common_width, _take

    points: dict = defaultdict(list)
    segments: list = []
    msgs = [
        b'{"series_id": "a", "timestamp_ms": 2, "values": [2.0, 2.5]}',
        b'{"series_id": "a", "timestamp_ms": 1, "values": [1.0, 1.5]}',
        b'{"series_id": "w", "values": [[0.0, 0.1], [0.2, 0.3]]}',
        b"not json",
        b'{"series_id": "a", "timestamp_ms": 3, "values": [NaN, 1.0]}',
        b'{"timestamp_ms": 3, "values": [1.0, 1.0]}',
        b'{"series_id": "a", "values": [1.0, 1.0]}',
        b'{"series_id": "b", "timestamp_ms": 1, "values": [1.0, 2.0, 3.0]}',
    ]
    whys = [_take(m, i, points, segments) for i, m in enumerate(msgs)]
    assert whys == [None, None, None, "not_json", "not_json", "no_series_id", "no_timestamp", None]
    assert [v for _, _, v in sorted(points["a"])] == [[1.0, 1.5], [2.0, 2.5]]
    assert segments == [[[0.0, 0.1], [0.2, 0.3]]]
    assert _common_width(points, segments) == 2  # series b's 3 channels are the odd one out
