"""Widen a trained checkpoint's LoRA to a higher rank, the model's outputs unchanged at the start.

Why: `train.init_from` keeps a checkpoint's LoRA rank (it is one of the settings that shape the weights), so a
stage that wants more capacity where the request meets the frames would otherwise start from a fresh
adapter and lose what the earlier stages taught. Widening keeps every trained direction: each `lora_A`
`[r, in]` gets `R - r` new rows drawn as peft draws a fresh adapter's (Kaiming-uniform, bound 1/sqrt(in)), each
`lora_B` `[out, r]` gets `R - r` zero columns, and `lora_alpha` is scaled by R / r so that the scale alpha / r
stays what it was. B·A is then exactly the trained product (the new columns of B are zero); the new
directions start learning from the first step, as a fresh adapter's do. Writes a copy of the checkpoint folder
with the wider adapter (float32) and the new `lora_r`/`lora_alpha`; start the next stage from it with
`train.init_from` and the same `model.lora_r`/`model.lora_alpha`.

    python scripts/widen_lora.py src/livevlm/assets/default_model runs/default-r32 --rank 32
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def widen_pair(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`lora_A` [r, in], `lora_B` [out, r] → [R, in], [out, R]; the new rows of A random, the new columns of B
    zero, so B_wide @ A_wide == B @ A."""
    old_rank, fan_in = lora_a.shape
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), peft's init of lora_A
    new_rows = (torch.rand(rank - old_rank, fan_in, generator=generator) * 2 - 1) * bound
    wide_a = torch.cat([lora_a.float(), new_rows], dim=0)
    wide_b = torch.cat([lora_b.float(), torch.zeros(lora_b.shape[0], rank - old_rank)], dim=1)
    return wide_a, wide_b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a livevlm checkpoint folder with finetune: lora")
    parser.add_argument("out", help="the new checkpoint folder")
    parser.add_argument("--rank", type=int, required=True, help="the new LoRA rank (above the checkpoint's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new rows of lora_A")
    args = parser.parse_args()
    source, out = Path(args.checkpoint), Path(args.out)
    config = yaml.safe_load((source / "livevlm.yaml").read_text())
    model = config["model"]
    if model.get("finetune") != "lora":
        raise SystemExit(f"{source}: finetune is {model.get('finetune')!r}; only a LoRA checkpoint can be widened")
    old_rank, old_alpha = int(model["lora_r"]), model["lora_alpha"]
    if args.rank <= old_rank:
        raise SystemExit(f"--rank {args.rank}: must be above the checkpoint's lora_r {old_rank}")
    new_alpha = old_alpha * args.rank / old_rank
    new_alpha = int(new_alpha) if float(new_alpha).is_integer() else new_alpha

    adapter = load_file(str(source / "adapter_model.safetensors"))
    generator = torch.Generator().manual_seed(args.seed)
    widened: dict[str, torch.Tensor] = {}
    for key in sorted(adapter):
        if ".lora_A." not in key:
            continue
        key_b = key.replace(".lora_A.", ".lora_B.")
        widened[key], widened[key_b] = widen_pair(adapter[key], adapter[key_b], args.rank, generator)
    if len(widened) != len(adapter):
        raise SystemExit(f"{source}: adapter holds weights other than lora_A/lora_B pairs; not widened")

    shutil.copytree(source, out, dirs_exist_ok=True)
    save_file(widened, str(out / "adapter_model.safetensors"))
    adapter_config = json.loads((source / "adapter_config.json").read_text())
    adapter_config |= {"r": args.rank, "lora_alpha": new_alpha}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    model |= {"lora_r": args.rank, "lora_alpha": new_alpha}
    (out / "livevlm.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    sums = out / "SHA256SUMS"
    if sums.exists():  # the packaged copy's checksums no longer hold for the widened adapter
        sums.unlink()
    print(f"{out}: LoRA r {old_rank} → {args.rank}, alpha {old_alpha} → {new_alpha} ({len(widened) // 2} pairs)")


if __name__ == "__main__":
    main()
