"""Every registered encoder family describes itself, exports a servable artifact and a valid Triton config."""

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from embedstream.config import EncoderSettings
from embedstream.encoders import EncoderSpec, get_family, list_families, served_model_name
from embedstream.errors import ConfigError
from embedstream.export import ExportTarget, export_model, render_config
from embedstream.lineage import preprocessing_fingerprint, weights_fingerprint

# A small setting per family keeps the unit tier fast; new families add a line here.
SMALL = {"cnn": EncoderSettings(family="cnn", arch="mobilenetv3_small_050", weights="random", max_batch_size=16)}
SMALL["transformer"] = EncoderSettings(family="transformer", arch="all-MiniLM-L6-v2", max_batch_size=16)

# Time-series families take their sizes from arch (w<window>c<channels>h<hidden>[l<latent>]) with random weights.
SMALL["lstm"] = EncoderSettings(family="lstm", arch="w16c3h8", weights="random", max_batch_size=16)
SMALL["autoencoder"] = EncoderSettings(family="autoencoder", arch="w16c3h16l4", weights="random", max_batch_size=16)
# The null family imitates a real encoder named in arch as <family>/<arch>; its output is zeros.
SMALL["null"] = EncoderSettings(family="null", arch="autoencoder/w16c3h16l4", weights="random", max_batch_size=16)


@pytest.fixture(params=list_families())
def family_settings(request):
    if request.param not in SMALL:
        pytest.fail(f"encoder family {request.param!r} has no small test setting in SMALL")
    return SMALL[request.param]


def test_spec_round_trips_through_json(family_settings):
    spec = get_family(family_settings.family).describe(family_settings)
    assert EncoderSpec.from_json(spec.to_json()) == spec
    assert spec.embedding_output.dims == (spec.embedding_dim,)


def test_the_worker_computes_the_name_the_exporter_gives_the_model(family_settings):
    # The worker asks Triton for this name without torch; the spec it then reads was named the same way.
    assert served_model_name(family_settings) == get_family(family_settings.family).describe(family_settings).name
    renamed = family_settings.model_copy(update={"model_name": "custom-name"})
    assert served_model_name(renamed) == get_family(family_settings.family).describe(renamed).name == "custom-name"


@pytest.mark.parametrize("target", [ExportTarget(), ExportTarget(backend="pytorch", kind="gpu", instances=2)])
def test_config_pbtxt_parses_as_a_triton_model_config(family_settings, target):
    spec = get_family(family_settings.family).describe(family_settings)
    cfg = text_format.Parse(render_config(spec, target), model_config_pb2.ModelConfig())
    assert cfg.name == spec.name and cfg.backend == target.backend
    assert cfg.max_batch_size == spec.max_batch_size
    assert [i.name for i in cfg.input] == [t.name for t in spec.inputs]
    assert list(cfg.output[0].dims) == [spec.embedding_dim]
    assert cfg.dynamic_batching.preferred_batch_size[-1] <= spec.max_batch_size
    assert cfg.instance_group[0].kind == (
        model_config_pb2.ModelInstanceGroup.KIND_GPU
        if target.kind == "gpu"
        else model_config_pb2.ModelInstanceGroup.KIND_CPU
    )
    assert EncoderSpec.from_json(cfg.parameters["embedstream.spec"].string_value) == spec


def test_exported_torchscript_equals_the_module(family_settings, tmp_path):
    fam = get_family(family_settings.family)
    spec = export_model(family_settings, tmp_path)
    scripted = torch.jit.load(str(tmp_path / spec.name / "1" / "model.pt"))
    inputs = fam.example_inputs(spec, 5)
    with torch.inference_mode():
        want = fam.build(family_settings)(*inputs)
        got = scripted(*inputs)
    # Models with extra outputs (the autoencoder) return a tuple in spec.outputs order: compare each.
    got, want = ((x,) if isinstance(x, torch.Tensor) else tuple(x) for x in (got, want))
    assert len(got) == len(spec.outputs)
    assert got[0].shape == (5, spec.embedding_dim)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.numpy().astype(np.float32), w.numpy().astype(np.float32), rtol=1e-4, atol=1e-4)
    assert (tmp_path / spec.name / "1" / "model.py").is_file()
    # Every family's export names the weights it wrote (lineage), recomputable from the file Triton loads.
    assert spec.weights_sha256 == weights_fingerprint(scripted.state_dict())
    assert spec.preprocessing_sha256 == preprocessing_fingerprint(spec)


def test_cnn_loads_a_safetensors_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(123)
    ref = timm.create_model("mobilenetv3_small_050", num_classes=10).eval()
    ckpt = tmp_path / "w.safetensors"
    save_file(ref.state_dict(), str(ckpt))  # classifier tensors included: they are ignored
    settings = EncoderSettings(arch="mobilenetv3_small_050", weights=str(ckpt))
    model = get_family("cnn").build(settings)
    x = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    with torch.inference_mode():
        feats = model(x)
        norm = (
            x.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        ) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        want = ref.forward_head(ref.forward_features(norm), pre_logits=True)
    np.testing.assert_allclose(feats.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


def test_weights_must_be_chosen_explicitly():
    with pytest.raises(ConfigError, match=r"encoder\.weights is not set"):
        get_family("cnn").build(EncoderSettings(arch="mobilenetv3_small_050"))


def test_missing_checkpoint_and_unknown_arch_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        get_family("cnn").build(EncoderSettings(arch="mobilenetv3_small_050", weights=str(tmp_path / "none.pt")))
    with pytest.raises(ConfigError, match="architecture"):
        get_family("cnn").describe(EncoderSettings(arch="no_such_net_42"))


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ConfigError, match="cnn"):
        get_family("quantum")
