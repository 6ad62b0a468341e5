"""``cache.device.resolve_device``: the device names every command accepts (``--device``)."""
from __future__ import annotations

import pytest
import torch

from cache.device import resolve_device
from cache.errors import InputError


@pytest.fixture()
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture()
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_and_cpu_on_a_machine_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_an_input_error(no_cuda, name):
    with pytest.raises(InputError, match=f"--device '{name}': CUDA is not available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "mps", "meta"])
def test_unknown_names_are_input_errors(name):
    with pytest.raises(InputError, match=f"--device '{name}': expected auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_cuda_is_the_gpu_of_the_local_rank(two_gpus, monkeypatch):
    assert resolve_device("auto", local_rank=0) == torch.device("cuda:0")
    assert resolve_device("cuda", local_rank=3) == torch.device("cuda:1")  # modulo the visible GPUs
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")  # an index is kept
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's variable when no rank is given
    assert resolve_device("cuda") == torch.device("cuda:1")
