"""The process's device (models.device): its choice, and moving nested batches between devices."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.models.device import default_device, model_device, move_to, settle_gpu_attention
from posttrain.models.io import resolve_dtype
from posttrain.rollout.sampling import draw


def test_default_device_follows_the_override_and_cuda(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    monkeypatch.delenv("POSTTRAIN_DEVICE")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert default_device() == expected


def test_default_device_refuses_a_bad_or_missing_device(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_DEVICE", "gpu0")
    with pytest.raises(ConfigError, match="POSTTRAIN_DEVICE='gpu0' is not a device"):
        default_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("POSTTRAIN_DEVICE", "cuda:1")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            default_device()


@pytest.fixture
def attention_settings():
    """torch's cuDNN attention switch and `settle_gpu_attention`'s once-per-process memo, as they were after the
    test (a test that pretends to have a GPU settles the process's attention)."""
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    settle_gpu_attention.cache_clear()
    yield
    torch.backends.cuda.enable_cudnn_sdp(enabled)
    settle_gpu_attention.cache_clear()


def test_a_gpu_process_runs_attention_without_cudnn_unless_asked(monkeypatch, attention_settings):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("POSTTRAIN_CUDNN_ATTENTION", raising=False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    monkeypatch.setenv("POSTTRAIN_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    assert torch.backends.cuda.cudnn_sdp_enabled()  # a process on the CPU leaves torch's attention as it is
    monkeypatch.delenv("POSTTRAIN_DEVICE")
    assert default_device().type == "cuda"
    assert not torch.backends.cuda.cudnn_sdp_enabled()

    torch.backends.cuda.enable_cudnn_sdp(True)
    settle_gpu_attention.cache_clear()  # a fresh process
    monkeypatch.setenv("POSTTRAIN_CUDNN_ATTENTION", "1")
    assert default_device().type == "cuda"
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_cuda_without_an_index_is_the_local_rank(monkeypatch, attention_settings):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("POSTTRAIN_DEVICE", "cuda")
    assert default_device() == torch.device("cuda", 3)
    monkeypatch.delenv("POSTTRAIN_DEVICE")
    assert default_device() == torch.device("cuda", 3)


@dataclasses.dataclass(frozen=True)
class Batch:
    ids: torch.Tensor
    parts: list
    name: str
    derived: int = dataclasses.field(init=False, default=7)


def test_move_to_walks_nested_batches_and_keeps_what_is_there():
    ids, mask = torch.arange(6).view(2, 3), torch.ones(2, 3, dtype=torch.bool)
    batch = {"inner": Batch(ids=ids, parts=[mask, ("text", 3)], name="b"), "scale": 0.5}
    moved = move_to(batch, "cpu")
    assert moved is batch  # dicts in place
    inner = moved["inner"]
    assert inner.ids is ids and inner.parts[0] is mask  # already on the CPU: not copied
    assert inner.parts[1] == ("text", 3) and inner.name == "b" and inner.derived == 7 and moved["scale"] == 0.5
    assert move_to("a string", "cpu") == "a string"


def test_model_device_is_where_the_parameters_are():
    assert model_device(torch.nn.Module()) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_auto_dtype_is_fp32_master_weights_on_every_device():
    assert resolve_dtype("auto") == torch.float32
    assert resolve_dtype("bfloat16") == torch.bfloat16


def test_draw_takes_its_uniforms_from_the_generators_device():
    """A seeded CPU generator drives the draw (the rollout engine's generator is a CPU one on any device): the
    tokens are those of the inverse transform of the generator's own uniforms."""
    probs = torch.softmax(torch.randn(5, 11, dtype=torch.float64), dim=-1)
    tokens = draw(probs, torch.Generator().manual_seed(3))
    u = torch.rand(5, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = [next(j for j in range(11) if probs[i, :j + 1].sum() > u[i, 0] * probs[i].sum()) for i in range(5)]
    assert tokens.tolist() == expected
