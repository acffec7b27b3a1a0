"""The weights layer every family loads through: checkpoint files, the hub hook, seeded random init."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from embedstream.encoders._weights import load_weights
from embedstream.errors import ConfigError


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.body = torch.nn.Linear(width, 2)


def _load(weights, fit="lenient", **kw):
    return load_weights(weights, Tiny, what="encoder tiny", seed=5, fit=fit, **kw)


def _state(module, **extra):
    return {**{k: v.clone() for k, v in module.state_dict().items()}, **extra}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_loads_in_either_format_and_the_module_is_in_eval_mode(tmp_path, suffix):
    ref = Tiny()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(_state(ref), str(path))
    else:
        torch.save({"state_dict": _state(ref), "epoch": 3}, path)  # a training loop's wrapper is unwrapped
    got = _load(str(path))
    assert not got.training
    torch.testing.assert_close(got.state_dict(), ref.state_dict())


def test_lenient_drops_unexpected_tensors_with_a_log_line_and_fails_on_missing_ones(tmp_path, caplog):
    ref = Tiny()
    extra = tmp_path / "extra.safetensors"
    save_file(_state(ref, **{"head.weight": torch.zeros(4, 2)}), str(extra))
    with caplog.at_level(logging.INFO, logger="embedstream.encoders._weights"):
        _load(str(extra))
    assert "ignoring 1 tensors" in caplog.text
    short = tmp_path / "short.safetensors"
    save_file({"body.weight": ref.body.weight.detach().clone()}, str(short))
    with pytest.raises(ConfigError, match=r"lacks 1 tensors of the model, e\.g\. \['body\.bias'\]"):
        _load(str(short))


def test_strict_refuses_unexpected_missing_and_misshapen_tensors(tmp_path):
    ref = Tiny()
    cases = {
        "extra": _state(ref, **{"head.weight": torch.zeros(1)}),
        "short": {"body.weight": ref.body.weight.detach().clone()},
        "shape": _state(Tiny(width=4)),
    }
    for name, state in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(ConfigError, match=r"does not fit the model: missing \[\], unexpected \['head\.weight'\]"):
        _load(str(tmp_path / "extra.safetensors"), fit="strict")
    with pytest.raises(ConfigError, match=r"missing \['body\.bias'\]"):
        _load(str(tmp_path / "short.safetensors"), fit="strict")
    with pytest.raises(ConfigError, match=r"tensor body\.weight is \(2, 4\), the model needs \(2, 3\)"):
        _load(str(tmp_path / "shape.safetensors"), fit="strict")


def test_random_weights_are_seeded_and_said_out_loud(caplog):
    with caplog.at_level(logging.WARNING, logger="embedstream.encoders._weights"):
        a, b = _load("random"), _load("random")
    torch.testing.assert_close(a.state_dict(), b.state_dict())
    assert "encoder tiny uses random weights, as configured: embeddings carry no meaning" in caplog.text


def test_pretrained_and_unset_go_to_the_family_hub_call_or_are_refused(tmp_path):
    hub = Tiny()
    assert _load("pretrained", pretrained=lambda: hub) is hub
    assert _load(None, pretrained=lambda: hub, unset="pretrained") is hub
    with pytest.raises(ConfigError, match=r"encoder\.weights is not set: give a checkpoint path, 'pretrained'"):
        _load(None, pretrained=lambda: hub)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        _load("pretrained")
    with pytest.raises(ConfigError, match="not found"):
        _load(str(tmp_path / "none.safetensors"))


def test_a_torch_file_without_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError, match="holds no state dict"):
        _load(str(path))
