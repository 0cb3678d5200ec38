"""`livevlm render`: print how one dialogue record is tokenised and labelled, token by token.

The debug view that makes a labelling bug visible: each token, its id, and what it is trained to predict
(F marks the per-frame stay-silent / speak targets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from livevlm.cli import CommandError


@dataclass
class RenderArgs:
    dialogues: str = field(metadata={"help": "dialogue JSONL"})
    index: int = field(default=0, metadata={"help": "which record (0-based line among the dialogues)"})
    llm: str = field(default="default", metadata={"help": "tokenizer folder (an HF LLM folder) or 'default'"})
    tokens_per_frame: int = field(default=10, metadata={"help": "placeholders per frame"})
    max_frames: int = field(default=16, metadata={"help": "show at most this many frames"})
    recipe: str = field(default="", metadata={"help": "a training recipe: render in its format (e.g. a decision "
                                                      "token, notes) instead of the paper's layout"})


def render(args: RenderArgs) -> int:
    from dataclasses import replace

    from transformers import AutoTokenizer

    from livevlm.config import FormatConfig, load_recipe
    from livevlm.data.schema import read_dialogues
    from livevlm.default_model import resolve_llm
    from livevlm.stream_format import StreamFormat, register_placeholder, timeline_to_items

    dialogues = read_dialogues(args.dialogues)
    if not 0 <= args.index < len(dialogues):
        raise CommandError(f"{args.dialogues} holds {len(dialogues)} dialogues; --index {args.index} is out of range")
    dialogue = dialogues[args.index]
    tokenizer = AutoTokenizer.from_pretrained(resolve_llm(args.llm))
    register_placeholder(tokenizer)
    layout = load_recipe(args.recipe).format if args.recipe else FormatConfig()
    fmt = StreamFormat(tokenizer, replace(layout, fps=dialogue.fps), args.tokens_per_frame)
    frames = min(dialogue.num_frames(), args.max_frames)
    turns = [(t.role, t.time_s, t.text) for t in dialogue.turns]
    rendered = fmt.render(timeline_to_items(turns, frames, dialogue.fps, dialogue.start_s))
    print(f"# {dialogue.id}: {frames} frames, {len(rendered)} tokens, "
          f"{sum(lab != -100 for lab in rendered.labels)} labelled")
    print(fmt.describe(rendered))
    return 0
