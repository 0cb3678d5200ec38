"""`--device` / `--dtype`: one meaning of "auto" for every command."""

import pytest
import torch

from livevlm.devices import resolve_device, resolve_dtype


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("") == torch.device("cpu")


def test_auto_is_the_gpu_when_one_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_a_gpu_that_is_not_there_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expected = r"--device cuda:1: this machine has 0 visible CUDA GPU\(s\); use --device cpu"
    with pytest.raises(ValueError, match=expected):
        resolve_device("cuda:1")


def test_a_gpu_index_past_the_last_one_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="has 2 visible"):
        resolve_device("cuda:2")


def test_an_unknown_device_name_is_named():
    with pytest.raises(ValueError, match="--device 'gpu0' is not a device torch knows"):
        resolve_device("gpu0")


def test_auto_precision_is_float32_on_the_cpu_and_bfloat16_on_a_gpu_that_has_it(monkeypatch):
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_dtype("auto", torch.device("cuda")) is torch.float16


def test_a_named_precision_is_kept_and_an_unknown_one_is_named():
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="--dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))
