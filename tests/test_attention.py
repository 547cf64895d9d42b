"""scc.attention: the SDPA policy every backend runs under."""
import pytest
from torch.nn.attention import SDPBackend

from scc.attention import attention


def test_attention_policy():
    """math SDPA whenever a double backward or a trace needs it, and for compiled CPU graphs; eager and compiled
    CUDA keep PyTorch's own choice."""
    import torch.nn.attention as att

    def backends_inside(purpose, device):
        with attention(purpose, device):
            return set(att._cur_sdpa_kernel_backends())

    everything = backends_inside("eager", "cpu")
    assert backends_inside("differentiable", "cpu") == {SDPBackend.MATH}
    assert backends_inside("trace", "cpu") == {SDPBackend.MATH}
    assert backends_inside("compile", "cpu") == {SDPBackend.MATH}
    assert backends_inside("compile", "cuda") == everything and len(everything) > 1
    with pytest.raises(ValueError, match="unknown attention purpose"):
        attention("fast")
