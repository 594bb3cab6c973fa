"""`camelid export gguf | gguf-adapter | ollama | hf | merge`: a model written as a GGUF file for llama.cpp or an HF
directory, or a LoRA adapter as llama.cpp's adapter GGUF."""

from camelid.cli.options import MODEL_KINDS, add_force, add_written_dtype
from camelid.config import GGUF_TYPES
from camelid.errors import CamelidError


def add_export(sub) -> None:
    p = sub.add_parser("export", help="write a model as a GGUF file or an HF directory (see: camelid export --help)")
    export = p.add_subparsers(dest="export_command", required=True, metavar="KIND")

    p = export.add_parser(
        "gguf", help="write one GGUF file that llama.cpp runs: weights, tokenizer and chat template",
        description="Writes MODEL as a GGUF file for llama.cpp (and camelid): the llama architecture, the "
        "tokenizer as llama.cpp reads it, and the chat template. A LoRA adapter directory is merged into its base "
        "first. Norms and biases stay float32, as llama.cpp's own converter keeps them; 4- and 5-bit types keep "
        "the vocabulary projection in q8_0. The file appears whole or not at all.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_KINDS)
    p.add_argument("out", metavar="OUT.gguf", help="the file to write (refused if it exists, unless --force)")
    p.add_argument("--type", default="f16", metavar="TYPE",
                   help=f"weight type: {', '.join(GGUF_TYPES)} (default f16: half the size of f32 and practically "
                   "lossless; q8_0: a quarter of f32, slightly lossy; q6_k to q4_0: smaller again and lossy, meant for "
                   "7B-size models; q4_k_m is what most people download; the _k mixes are byte for byte what "
                   "llama.cpp's llama-quantize writes)")
    p.add_argument("--name", help="the model name stored in the file, which llama.cpp and its front ends show "
                   "(general.name; default: a GGUF's own; for a `camelid train` run's RUN/model, the run's name; "
                   "for an HF directory, the Hub id in its config.json; else the file or directory name)")
    add_force(p, "OUT.gguf if it exists")
    p.set_defaults(func=cmd_export_gguf)

    p = export.add_parser(
        "hf", help="write a Hugging Face model directory that transformers loads (adapters merged)",
        description="Writes MODEL as an HF-format directory: config.json, model.safetensors, tokenizer.json, "
        "tokenizer_config.json and the chat template. A LoRA adapter directory is merged into its base first. "
        "`camelid convert` and `camelid export merge` do the same.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_KINDS)
    p.add_argument("out", metavar="OUT_DIR", help="the directory to create (must not exist, or be empty)")
    add_written_dtype(p)
    add_force(p, "OUT_DIR if it is an existing directory")
    p.set_defaults(func=cmd_export_hf)

    p = export.add_parser(
        "ollama", help="write a GGUF file and an Ollama Modelfile (template, stops, system prompt) in a directory",
        description="Writes DIR/model.gguf (as `export gguf`) and DIR/Modelfile for `ollama create NAME -f "
        "DIR/Modelfile`: a TEMPLATE in Ollama's Go-template syntax that renders chats exactly as camelid's chat "
        "template does, tools, tool calls and their results included where the template writes them (checked "
        "before it is written), PARAMETER stop for every end-of-turn token the template "
        "writes, the default SYSTEM prompt if the template has one, and the sampling defaults. A template that "
        "cannot be translated is said so, and the Modelfile is written without a TEMPLATE rather than a wrong one.",
    )
    p.add_argument("model", metavar="MODEL", help=MODEL_KINDS)
    p.add_argument("out", metavar="DIR", help="the directory to create (must not exist, or be empty)")
    p.add_argument("--type", default="q8_0", metavar="TYPE",
                   help=f"weight type of the GGUF: {', '.join(GGUF_TYPES)} (default q8_0: a quarter of f32, "
                   "nearly lossless)")
    p.add_argument("--template", metavar="NAME", help="a built-in chat template to use instead of the model's own "
                   "(as in `camelid chat --template`)")
    p.add_argument("--name", help="the model name stored in the GGUF (general.name; default as in `export gguf`)")
    add_force(p, "DIR if it is an existing directory")
    p.set_defaults(func=cmd_export_ollama)

    p = export.add_parser(
        "gguf-adapter", help="write a LoRA adapter as llama.cpp's adapter GGUF (llama-cli --lora, lora_path=)",
        description="Writes a LoRA adapter directory as one small GGUF file that llama.cpp applies on top of the "
        "base model's GGUF at run time (`llama-cli -m base.gguf --lora OUT.gguf`, llama-cpp-python's lora_path=), "
        "so every adapter need not be a full model file. The adapter is checked against its base tensor by tensor "
        "first. The file appears whole or not at all.",
    )
    p.add_argument("adapter", metavar="ADAPTER",
                   help="a LoRA adapter directory (adapter_config.json naming its base, adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT.gguf", help="the file to write (refused if it exists, unless --force)")
    p.add_argument("--base", metavar="MODEL",
                   help="the base model the adapter will run on: its GGUF file, HF directory or name (default: the "
                   "base named in adapter_config.json); an adapter that does not fit it is refused")
    p.add_argument("--type", default="f32", choices=("f32", "f16"),
                   help="how the adapter's A and B are stored (default f32: exact; f16: half the size)")
    add_force(p, "OUT.gguf if it exists")
    p.set_defaults(func=cmd_export_gguf_adapter)

    p = export.add_parser("merge", help="fold a LoRA adapter into its base model; write an HF-format directory "
                          "(export hf, for adapter directories only)")
    p.add_argument("adapter", metavar="ADAPTER",
                   help="a LoRA adapter directory (adapter_config.json naming its base, adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT", help="the directory to create (must not exist, or be empty)")
    add_written_dtype(p)
    add_force(p, "OUT if it is an existing directory")
    p.set_defaults(func=cmd_export_merge)


def cmd_export_gguf(args) -> None:
    import time

    from camelid.export import export_gguf

    start = time.perf_counter()
    path = export_gguf(args.model, args.out, type=args.type, name=args.name, overwrite=args.force)
    print(f"wrote {path} (GGUF {args.type}, {path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")


def cmd_export_ollama(args) -> None:
    from pathlib import Path

    from camelid.ollama import MODELFILE, export_ollama

    out, missing = export_ollama(args.model, args.out, type=args.type, template_name=args.template, name=args.name,
                                 overwrite=args.force)
    for note in missing:
        print(f"note: {note}")
    name = Path(args.out).name.lower().replace(" ", "-") or "mine"
    print(f"wrote {out} (model.gguf, {args.type}; {MODELFILE}); create the Ollama model with: "
          f"ollama create {name} -f {out / MODELFILE}")


def cmd_export_gguf_adapter(args) -> None:
    from camelid.export import export_gguf_adapter

    path = export_gguf_adapter(args.adapter, args.out, base=args.base, type=args.type, overwrite=args.force)
    print(f"wrote {path} (LoRA adapter GGUF, {args.type}, {path.stat().st_size / 1e6:.1f} MB); run it on its base: "
          f"llama-cli -m BASE.gguf --lora {path}")


def cmd_export_hf(args) -> None:
    write_hf(args.model, args.out, dtype=args.dtype, force=args.force)


def cmd_export_merge(args) -> None:
    from camelid.lora import is_adapter_dir

    if not is_adapter_dir(args.adapter):
        raise CamelidError(f"{args.adapter}: not a LoRA adapter directory (no adapter_config.json); "
                           "to copy a full model use `camelid export hf`")
    write_hf(args.adapter, args.out, dtype=args.dtype, force=args.force)


def write_hf(model: str, out: str, *, dtype: str | None, force: bool) -> None:
    """`export hf`, `export merge` and `convert`: one library call (an adapter directory comes merged)."""
    from camelid.export import export_hf

    path = export_hf(model, out, dtype=dtype, overwrite=force)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"wrote {path} (HF directory, {dtype or 'float32'}, {size / 1e6:.1f} MB)")
