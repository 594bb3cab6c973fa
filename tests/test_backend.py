"""camelid.backend: one loader for chat, generate and serve; what llama.cpp has no use for is refused, not ignored."""

import pytest
import torch

from camelid.backend import DEFAULT_CONTEXT, check_backend, load_backend, set_threads
from camelid.errors import CamelidError


@pytest.mark.parametrize("options, message", [
    ({"backend": "vllm"}, "unknown backend 'vllm'; choose one of: camelid, llamacpp"),
    ({"backend": "camelid", "threads": 0}, "--threads must be at least 1, not 0"),
    ({"backend": "llamacpp", "threads": -2}, "--threads must be at least 1, not -2"),
    ({"backend": "llamacpp", "device": "cpu"}, "--device does not apply to --backend llamacpp (llama.cpp runs where "
     "llama-cpp-python was built to run); leave it out"),
    ({"backend": "llamacpp", "dtype": "float32"}, "--dtype does not apply to --backend llamacpp (llama.cpp computes "
     "in the GGUF file's own types); leave it out"),
    ({"backend": "llamacpp", "quantize": "int8"}, "--quantize does not apply to --backend llamacpp (llama.cpp runs "
     "the GGUF file's own quantization; pick a quantized GGUF file instead); leave it out"),
])
def test_options_a_backend_cannot_take_are_refused_in_one_line(options, message):
    with pytest.raises(CamelidError) as exc_info:
        check_backend(**options)
    assert str(exc_info.value) == message


def test_the_defaults_pass_on_either_backend():
    for backend in ("camelid", "llamacpp"):
        check_backend(backend, device=None, dtype=None, quantize="none", threads=None)
    check_backend("camelid", device="cpu", dtype="bfloat16", quantize="int8", threads=3)


@pytest.fixture
def torch_threads():
    """Torch's thread count, restored after the test."""
    own = torch.get_num_threads()
    yield own
    torch.set_num_threads(own)


def test_threads_go_to_torch_or_to_llama_cpp_with_torch_on_one(torch_threads):
    torch.set_num_threads(3)
    assert set_threads("camelid", None) is None and torch.get_num_threads() == 3  # torch's own count kept
    assert set_threads("camelid", 2) == 2 and torch.get_num_threads() == 2
    assert set_threads("llamacpp", None) == 2 and torch.get_num_threads() == 1  # llama.cpp gets torch's count
    assert set_threads("llamacpp", 2) == 2 and torch.get_num_threads() == 1  # again with it: nothing changes


def test_camelids_backend_loads_the_model_as_load_model_does_with_the_context_asked_for(tiny_chat_dir, torch_threads):
    from camelid.checkpoint import load_model
    from camelid.generate import stream

    model = load_backend(str(tiny_chat_dir), device="cpu", dtype="float32")
    assert (model.name, model.stream) == ("camelid", stream)
    assert model.context == min(model.loaded.config.max_sequence_length, DEFAULT_CONTEXT)
    reference = load_model(tiny_chat_dir, device="cpu", dtype="float32")
    for (name, ours), theirs in zip(model.loaded.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    assert load_backend(str(tiny_chat_dir), device="cpu", n_ctx=64).context == 64
