"""PackedLinear: prepacked inference for nn.Linear (the native kernel, and oneDNN where the
native kernels are off), against F.linear as the reference."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shipyard.generate.packed import (
    NATIVE_MAX_ROWS,
    PackedLinear,
    onednn_available,
    pack_linears,
)
from shipyard.kernels import native


@pytest.fixture(autouse=True, params=["native", "onednn"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs on both packed kernels (the native one off: oneDNN takes over)."""
    if request.param == "native" and not native.load():
        pytest.skip(f"native kernels unavailable: {native.native_unavailable()}")
    if request.param == "onednn":
        if not onednn_available():
            pytest.skip("PyTorch built without oneDNN")
        monkeypatch.setenv(native.DISABLE_ENV, native.NATIVE_KERNEL)
    return str(request.param)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4, bias=False)).eval()


def test_pack_swaps_plain_linears_and_keeps_parameters() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    assert pack_linears(model) == 2
    assert all(type(m) is PackedLinear for m in (model[0], model[2]))
    assert [id(p) for p in model.parameters()] == params  # same Parameters: optimizers still work
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert pack_linears(model) == 0  # already packed


def test_packed_matches_f_linear_and_rows_are_independent() -> None:
    model = _model()
    x = torch.randn(5, 3, 8)
    want = model(x)
    pack_linears(model)
    with torch.inference_mode():
        got = model(x)
        alone = model(x[:1])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(alone, got[:1])  # a row's result does not depend on its batch


def test_repacks_after_the_weight_changes() -> None:
    layer = _model()[0]
    pack_linears(layer)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        layer(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place, as an optimizer step or load_state_dict
    with torch.inference_mode():
        got = layer(x)
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)


def test_training_and_autograd_use_f_linear() -> None:
    layer = _model()[0]
    pack_linears(layer)
    x = torch.randn(2, 8)
    layer(x).sum().backward()  # grad enabled: the plain path, gradients flow
    assert layer.weight.grad is not None
    layer.train()
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_a_used_packed_model_can_be_copied_and_saved() -> None:
    model = _model()
    pack_linears(model)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        want = model(x)  # fills the (uncopyable) oneDNN weight cache
    twin = copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    with torch.inference_mode():
        assert torch.equal(twin(x), want)


def test_weights_made_under_inference_mode_still_pack() -> None:
    with torch.inference_mode():
        layer = nn.Linear(4, 3).eval()
        x = torch.randn(2, 4)
        want = F.linear(x, layer.weight, layer.bias)
    pack_linears(layer)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), want)


def test_the_kernel_follows_what_loads_and_long_inputs_match_too(backend: str) -> None:
    model = _model()
    pack_linears(model)
    assert model[0].native is (backend == "native")
    x = torch.randn(NATIVE_MAX_ROWS + 5, 8)  # past the native kernel's rows: F.linear's turn
    with torch.inference_mode():
        got = model(x)
    torch.testing.assert_close(got, nn.Sequential(*_model())(x), rtol=1e-5, atol=1e-6)
