"""Widen a trained hue model's connector for `model.change_hues`, the new columns a copy of its hue columns.

Why: `train.init_from` starts new inputs at zero weight, so the model starts exactly as it was and must
learn from the stream stage alone what the changed pixels' hues mean. Stage 1 (single frames) has already
taught the connector and the LLM what a token's hue histogram says ("this cell holds red"); copying the hue
columns to the changed-hue columns (in the tokens' half and in their changes' half) makes "the changed
pixels are red" arrive in the same directions from the first step, so the stream stage has only to learn
when it matters. Writes a copy of the checkpoint folder with the widened connector and `change_hues: true`;
start the next stage from it with `train.init_from`. A step of the default model's build
(`scripts/build_default_model.sh`: stage 1 → this → stage 1b, the changes).

    python scripts/init_change_hues.py runs/default-align/model runs/default-align-chg
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def widen(weight: torch.Tensor, hue_start: int, hue_bins: int, frame_delta: bool) -> torch.Tensor:
    """fc1 weight `[H, D]` (`[H, 2D]` with frame_delta: tokens' columns, then changes') → `[H, D + K]` per half,
    the K new columns (the changed hues, after the hues) a copy of the hue columns `[hue_start, hue_start + K)`."""
    halves = list(weight.chunk(2, dim=1)) if frame_delta else [weight]
    widened = [torch.cat([half, half[:, hue_start:hue_start + hue_bins]], dim=1) for half in halves]
    return torch.cat(widened, dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a livevlm checkpoint folder trained with hue_bins, without change_hues")
    parser.add_argument("out", help="the new checkpoint folder")
    args = parser.parse_args()
    source, out = Path(args.checkpoint), Path(args.out)
    config = yaml.safe_load((source / "livevlm.yaml").read_text())
    model = config["model"]
    if not model.get("hue_bins") or model.get("change_hues"):
        raise SystemExit(f"{source}: needs hue_bins and no change_hues, got hue_bins={model.get('hue_bins')}, "
                         f"change_hues={model.get('change_hues')}")
    connector = load_file(str(source / "connector.safetensors"))
    weight = connector["fc1.weight"]  # [H, D] or [H, 2D]
    width = weight.shape[1] // (2 if model.get("frame_delta") else 1)
    hue_start = width - model["hue_bins"]  # the hues are the last channels of a token
    connector["fc1.weight"] = widen(weight, hue_start, model["hue_bins"], bool(model.get("frame_delta")))
    shutil.copytree(source, out, dirs_exist_ok=True)
    save_file(connector, str(out / "connector.safetensors"))
    model["change_hues"] = True
    (out / "livevlm.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"{out}: fc1 {tuple(weight.shape)} → {tuple(connector['fc1.weight'].shape)}, change_hues: true")


if __name__ == "__main__":
    main()
