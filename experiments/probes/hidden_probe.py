"""Where does a new object's colour get lost inside the model? Linear probes on its hidden states.

Why: `word_accuracy.py` says how often the model names a new object's colour, `feature_probe.py` that the
frozen features carry it. This probes the path between: the last frame's input tokens, their connector
outputs (layer 0) and each layer's hidden states, at the frame tokens and where the colour word is predicted
(teacher-forced narration streams; fitted on one split, scored on another). Prints figures; asserts nothing.

    python experiments/probes/hidden_probe.py --model runs/experiment-frame-delta/model \
        --train data/world-train5/dialogue.jsonl data/world-train5/features-rgb \
        --test data/world-heldout/dialogue.jsonl data/world-heldout/features-rgb
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# Scripts, not a package: feature_probe.py sits beside this file, word_accuracy.py in benchmarks/.
_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parents[1] / "benchmarks"))
sys.path.insert(0, str(_HERE))
from feature_probe import probe_accuracy  # noqa: E402
from word_accuracy import slotted_words  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="checkpoint folder; empty = the shipped default model")
    p.add_argument("--train", nargs=2, required=True, metavar=("DIALOGUE", "FEATURES"), help="fit on these")
    p.add_argument("--test", nargs=2, required=True, metavar=("DIALOGUE", "FEATURES"), help="score on these")
    p.add_argument("--layers", type=int, nargs="+", default=[0, 4, 8, 12, 16, 20, 24, 30],
                   help="hidden-state layers (0 = the embeddings)")
    a = p.parse_args()

    from livevlm.checkpoint import load_checkpoint
    from livevlm.data.dataset import StreamDataset
    from livevlm.default_model import default_model_path
    from livevlm.stream_format import StreamFormat

    loaded = load_checkpoint(a.model or default_model_path())
    fmt = StreamFormat(loaded.tokenizer, loaded.format_config, loaded.model_config.tokens_per_frame)

    def collect(data, feats):
        ds = StreamDataset(data, fmt, cache_dir=feats)
        rows = []
        for idx in range(len(ds)):
            if ds.dialogues[idx].task != "narration":
                continue
            s = ds[idx]
            with torch.no_grad():
                embeds = loaded.model.embed(s.input_ids[None], s.frame_tokens)
                out = loaded.model.llm(inputs_embeds=embeds, output_hidden_states=True)
            hs = out.hidden_states  # tuple of [1, L, H]
            pred = out.logits[0].argmax(-1).tolist()
            labels = s.labels.tolist()
            frame_pos = (s.input_ids == fmt.placeholder_id).nonzero().flatten().tolist()
            frame_inputs = loaded.model.frame_inputs(s.frame_tokens).flatten(0, 1)  # [T·N, D'], placeholder order
            for i, word, slot, _ in slotted_words(labels, s.frame_ends, fmt.eos_id, loaded.tokenizer):
                if slot != "colour: new object":
                    continue
                seen = sum(q < i for q in frame_pos)  # frame tokens before the word: the last frame's are the last N
                last_frame = slice(seen - fmt.tokens_per_frame, seen)
                r = {"colour": word, "right": pred[i] == labels[i], "input": frame_inputs[last_frame].flatten().float()}
                for layer in a.layers:
                    r[f"text{layer}"] = hs[layer][0, i].float()
                    r[f"frame{layer}"] = hs[layer][0, frame_pos[last_frame]].float().flatten()
                rows.append(r)
        return rows

    tr, te = collect(*a.train), collect(*a.test)
    print(f"{len(tr)} train / {len(te)} test new-object colours; model argmax right on test: "
          f"{sum(r['right'] for r in te) / len(te):.0%}")
    print("input (last frame's 10 tokens, raw):", f"{probe_accuracy(tr, te, 'input', 'colour'):.0%}")
    for layer in a.layers:
        print(f"layer {layer}: at the colour word's position {probe_accuracy(tr, te, f'text{layer}', 'colour'):.0%}, "
              f"last frame's tokens {probe_accuracy(tr, te, f'frame{layer}', 'colour'):.0%}")


if __name__ == "__main__":
    main()
