"""`livevlm export --format official|livevlm MODEL OUT`: a model written in the paper's released format, or back.

    livevlm export --format official runs/official_v1plus/model out/videollm-online-mine   # for the public code
    livevlm export --format livevlm chenjoya/videollm-online-8b-v1plus out/official-as-livevlm

`official` takes a livevlm LoRA checkpoint with a Llama-3 base and the v1+ layout; `livevlm` takes an official
folder or hub id. Official → livevlm → official gives back the same tensors, bit for bit (livevlm.official).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from livevlm.cli import CommandError


@dataclass
class ExportArgs:
    model: str = field(metadata={"help": "the model: a livevlm checkpoint folder (--format official), or an official "
                                         "folder or hub id (--format livevlm)"})
    out: str = field(metadata={"help": "the folder to write (must not exist)"})
    format: Literal["official", "livevlm"] = field(default="official", metadata={
        "help": "official: the VideoLLM-online PEFT adapter layout (public code, PEFT 0.10+); livevlm: a livevlm "
                "checkpoint"})
    llm: str = field(default="", metadata={
        "help": "base LLM folder or hub id: its tokenizer (--format livevlm) or its LM head (--format official, when "
                "the checkpoint has no copy); default: the one the model names"})
    vision: str = field(default="", metadata={
        "help": "--format livevlm: the vision tower livevlm.yaml names; default google/siglip-large-patch16-384"})
    base_name: str = field(default="", metadata={
        "help": "--format official: base_model_name_or_path in adapter_config.json; default: the checkpoint's hub "
                "id, else meta-llama/Meta-Llama-3-8B-Instruct"})


def export(args: ExportArgs) -> int:
    from livevlm.checkpoint import CONFIG_NAME
    from livevlm.official import export_livevlm, export_official, is_official_folder, resolve_model_ref

    if Path(args.out).exists():
        raise CommandError(f"{args.out} already exists; choose a new folder (or remove it)")
    folder = resolve_model_ref(args.model)
    if args.format == "official":
        if is_official_folder(folder):
            raise CommandError(f"{args.model} is already in the official format; --format livevlm converts it")
        if not (folder / CONFIG_NAME).is_file():
            raise CommandError(f"{args.model} is not a livevlm checkpoint ({CONFIG_NAME} is missing)")
        out = export_official(folder, args.out, llm=args.llm or None, base_name=args.base_name)
    else:
        if not is_official_folder(folder):
            raise CommandError(f"{args.model} is not an official VideoLLM-online checkpoint (adapter_config.json + "
                               f"adapter_model.safetensors, no {CONFIG_NAME}); --format official writes one")
        out = export_livevlm(folder, args.out, llm=args.llm or None, vision=args.vision or None)
    print(f"wrote {out} ({args.format} format)")
    return 0
