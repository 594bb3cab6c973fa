"""Imports go only downward through camelid's layers (the README's Architecture section).

Every `import` of a camelid module is read from the source, those inside functions included: a lower layer never
imports a higher one, and a stage imports only the stages before it in the loop (data, then training, then
evaluation and serving).
"""

import ast
from pathlib import Path

import camelid

PACKAGE = Path(camelid.__file__).parent

# Layer by layer, bottom up. A module not named here is a test failure: a new file must say where it belongs.
LAYERS = [
    # files and formats
    {"errors", "files", "gguf_file", "kquants", "config", "tokenizer", "chat_template", "template_worker",
     "named_models", "pipeline_report", "plots", "client", "memory"},
    # the model and its weights
    {"model", "checkpoint", "lora", "adapters", "quantize", "native"},
    # generation and examples
    {"generate", "examples", "chat", "llamacpp", "backend", "jobs", "engine", "grammar"},
    # the stages, in the loop's order: each may import those before it
    {"data"}, {"train"}, {"eval"}, {"export", "ollama"}, {"serve"}, {"cost"},
    # the command line
    {"cli", "__main__"},
]


def layer_of(module: str) -> int:
    """The layer of `camelid.X...` by its first part X."""
    top = module.split(".")[1] if module.startswith("camelid.") else module
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"camelid.{top} is in no layer of tests/test_layers.py: add it where it belongs")


def modules():
    """(module name, path) of every camelid module but the package's own empty __init__."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "camelid":
            yield name, path


def camelid_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("camelid.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("camelid"):
            if node.module == "camelid":
                found |= {f"camelid.{a.name}" for a in node.names}
            else:
                found.add(node.module)
    return found


def test_imports_go_only_downward():
    upward = []
    for importer, path in modules():
        for imported in camelid_imports(path):
            if layer_of(imported) > layer_of(importer):
                upward.append(f"{importer} imports {imported}")
    assert not upward, "\n".join(upward)


def test_the_layers_name_every_module():
    for name, _ in modules():
        layer_of(name)



def test_the_readme_architecture_names_every_file():
    """The README's Architecture section says what each file holds: a new file goes there too."""
    readme = (PACKAGE.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Architecture") :]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else None]
    missing = [name for name, path in modules() if path.name != "__init__.py" and path.name not in section]
    assert not missing, f"not in the README's Architecture section: {missing}"
