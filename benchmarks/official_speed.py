"""Streaming speed at the official VideoLLM-online v1+ size, with random weights (for a GPU).

The paper reports 10–15 FPS on an A100 for its 8B model (Llama-3-8B-Instruct + SigLIP-L/384, 10 tokens per
frame, bf16). No such weights can be downloaded here, so this builds the same shapes with random weights:
speed depends on shapes, not on values. It then streams a synthetic-world video through the three engine
modes of `stream_speed.py` (sequential / pipeline / multiframe) and prints a table (never asserts a time).

Random weights would speak at random (the separator is rarely the argmax), so the LM head gets a bias
that makes the separator its argmax: the model never speaks by itself, and every response runs to the
token cap. Two workloads are measured:
  frames    no queries: FPS of the frame path alone (decode, encode, one forward per frame or per batch
            of waiting frames, the silence decision);
  answers   a question every `--answer-every` seconds, answered to the token cap (`--max-new-tokens`):
            FPS with responses, response latency and decode tokens/s.

    python benchmarks/official_speed.py                       # official size on the GPU (bf16)
    python benchmarks/official_speed.py --size tiny --device cpu --dtype float32   # a smoke run here
    python benchmarks/official_speed.py --decode compiled     # response tokens through the compiled static step
    python benchmarks/official_speed.py --sessions 1 4 16     # K streams batched, instead of the modes
    python benchmarks/official_speed.py --loader --work /tmp/official-random     # through livevlm's loader
    python benchmarks/official_speed.py --model /models/videollm-online-8b-v1plus \
        --llm /models/Meta-Llama-3-8B-Instruct --vision /models/siglip-large-patch16-384   # the real weights

`--loader` writes the random model first as an official checkpoint folder (PEFT adapter with LoRA r=128 and
the connector, a bf16 base LLM folder, a SigLIP folder; ~18 GB at the official size) and loads it back with
`livevlm.load`, so the figures are those of the model `livevlm stream --model FOLDER` runs (LoRA merged).
`--model` loads an existing folder (or hub id) instead. Either way the LM head gets the same silence bias.

`--sessions K [K ...]` measures, instead of the modes, the aggregate frames-only FPS of K streams on the one
model with their frames in one forward per step (`livevlm.engine.SessionBatch`: one frame of each stream a
step, every stream fed the same video, encoded once beforehand, so only the LLM's frame path is timed),
next to one `StreamSession` fed the same frame tokens alone.

`--decode` chooses how response tokens are decoded (`EngineConfig.decode`): "eager" (one forward per token,
Python-bound on a GPU), "static" (the static-shape step, uncompiled: a check) or "compiled" (that step under
torch.compile with CUDA graphs on a GPU; it compiles during the warm-up pass, so the timed rows replay it).

Needs the Llama-3 tokenizer: `quicktok-v1` installed (`scripts/install.sh dev`), or a converted
`llama3-tokenizer/` folder under $LIVEVLM_CACHE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from stream_speed import MODES, run_mode, video_for  # noqa: E402

# Meta-Llama-3-8B-Instruct's config.json (the shapes that set the speed) and SigLIP-L/384's vision half.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009,
                 tie_word_embeddings=False)
SIGLIP_L_384 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=384, patch_size=16)
# The same structure, small enough for a CPU smoke run.
TINY_LLM = LLAMA3_8B | dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=64, patch_size=16)


def build_random_model(size: str, device: str, dtype):
    """(LiveModel, StreamFormat, FrameEncoder) of the official layout with random weights on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from livevlm.backbones import llama3_tokenizer
    from livevlm.config import FormatConfig
    from livevlm.model import LiveModel
    from livevlm.stream_format import StreamFormat, register_placeholder
    from livevlm.vision import build_frame_encoder

    llm_shape, vision_shape = (LLAMA3_8B, SIGLIP_L_384) if size == "official" else (TINY_LLM, TINY_VISION)
    torch.manual_seed(0)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(LlamaConfig(**llm_shape), dtype=dtype)
        tower = SiglipVisionModel._from_config(SiglipVisionConfig(**vision_shape), dtype=dtype)
    encoder = build_frame_encoder(tower, pooled_token=True, grid=3).to(device).eval()
    tokenizer = llama3_tokenizer()
    format_config = FormatConfig()  # the official v1+ layout
    placeholder_id = register_placeholder(tokenizer, format_config.placeholder)
    # connector_hidden 0 = the LLM's width: Linear(1024 -> 4096) -> GELU -> Linear(4096 -> 4096), as in v1+.
    model = LiveModel(llm, vision_shape["hidden_size"], placeholder_id, 0).to(device=device, dtype=dtype)
    model.eval().requires_grad_(False)
    fmt = StreamFormat(tokenizer, format_config, 1 + 3 * 3)
    # Random logits are ~N(0, 1.3²); +50 on the separator makes "stay silent" the decision at every frame.
    head = llm.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features, device=device, dtype=dtype), requires_grad=False)
    head.bias[fmt.separator_id] = 50.0
    return model, fmt, encoder, format_config.fps


def write_official_folder(size: str, root: Path, device: str, dtype) -> tuple[Path, Path, Path]:
    """A random model of the official shapes saved as the official format: (adapter, base LLM, vision) folders.

    The adapter holds LoRA (r=128, α=256; B random, so the merge changes every targeted weight), the head copy
    and the connector under the official key names, in bf16, with a PEFT 0.10 adapter_config.json.
    """
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from livevlm.backbones import llama3_tokenizer
    from livevlm.official import OFFICIAL_TARGETS, PEFT_010_DEFAULTS, target_module_names

    llm_shape, vision_shape = (LLAMA3_8B, SIGLIP_L_384) if size == "official" else (TINY_LLM, TINY_VISION)
    adapter, base, vision = root / "videollm-online-8b-v1plus", root / "llm", root / "vision"
    if (adapter / "adapter_model.safetensors").is_file():
        return adapter, base, vision
    torch.manual_seed(0)
    with torch.device(device):
        llm = LlamaForCausalLM._from_config(LlamaConfig(**llm_shape), dtype=dtype)
        tower = SiglipVisionModel._from_config(SiglipVisionConfig(**vision_shape), dtype=dtype)
    llm.to(torch.bfloat16).save_pretrained(base)  # as Meta ships it; the head copy below is bf16 too
    llama3_tokenizer().save_pretrained(base)
    tower.save_pretrained(vision)
    rank, hidden = 128, llm_shape["hidden_size"]
    tensors = {}
    for name in sorted(target_module_names(llm, OFFICIAL_TARGETS)):
        out_features, in_features = llm.get_submodule(name).weight.shape
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, in_features, device=device) * 0.01
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_features, rank, device=device) * 0.001
    tensors["base_model.model.lm_head.base_layer.weight"] = llm.lm_head.weight.detach()
    connector = torch.nn.Sequential(torch.nn.Linear(vision_shape["hidden_size"], hidden), torch.nn.GELU(),
                                    torch.nn.Linear(hidden, hidden)).to(device)
    tensors |= {f"base_model.model.connector.{k}": v.detach() for k, v in connector.state_dict().items()}
    adapter.mkdir(parents=True)
    save_file({k: v.to(torch.bfloat16).contiguous().cpu() for k, v in tensors.items()},
              str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = PEFT_010_DEFAULTS | {"base_model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "r": rank,
                                  "lora_alpha": 256, "target_modules": OFFICIAL_TARGETS,
                                  "modules_to_save": ["connector"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    del llm, tower, tensors
    return adapter, base, vision


def load_through_loader(model: str, llm: str | None, vision: str | None, device: str, dtype_name: str):
    """(LiveModel, StreamFormat, FrameEncoder, fps) as `livevlm stream --model` loads them, with the silence bias."""
    import torch

    import livevlm

    loaded = livevlm.load(model, llm=llm, vision=vision, device=device, dtype=dtype_name)
    head = loaded.model.llm.get_output_embeddings()
    dtype = head.weight.dtype
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features, device=head.weight.device, dtype=dtype),
                                   requires_grad=False)
    head.bias[loaded.fmt.separator_id] = 50.0  # as build_random_model: stay silent at every frame
    return loaded.model, loaded.fmt, loaded.encoder.eval(), loaded.fps


def hf_decode_baseline(model, context: int = 1300, steps: int = 64) -> float:
    """Greedy decode tokens/s of the bare HF model (DynamicCache, no engine) after a `context`-token prefill:
    what the engine's own decode loop is compared against."""
    import torch
    from transformers import DynamicCache

    llm = model.llm
    device = model.device
    ids = torch.randint(0, 128000, (1, context), device=device, generator=torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        for _ in range(2):  # the first round warms kernels up
            cache = DynamicCache()
            logits = llm(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                logits = llm(input_ids=token, past_key_values=cache, use_cache=True).logits
                int(token)  # read the token on the host, as a streaming loop must
            elapsed = time.perf_counter() - start
    return steps / elapsed


def batched_rows(model, fmt, encoder, video: str, fps: float, counts: list[int], decode: str) -> list[dict]:
    """Frames-only FPS of one `StreamSession` alone, then of K sessions batched (`SessionBatch`) for each K in
    `counts`, all fed the frame tokens of `video` (encoded once, on the model's device) one frame a step;
    each preceded by an untimed pass over its first 8 frames. Prints each row as JSON; returns them."""
    import torch

    from livevlm.config import EngineConfig
    from livevlm.engine import ResponseEvent, SessionBatch, StreamSession
    from livevlm.video import read_frames

    stream = list(read_frames(video, fps=fps, size=encoder.image_size, resample=encoder.resample))
    tokens = encoder.encode(frame for _, frame in stream).to(model.device)  # [T, N, D]
    times = [time_s for time_s, _ in stream]
    cuda = model.device.type == "cuda"
    config = EngineConfig(threshold=0.725, max_frames_per_forward=1, decode=decode)

    def stepper(sessions: int | None):
        """`step(i)`: frame i to every stream (None: one StreamSession alone) → each stream's events."""
        if sessions is None:
            alone = StreamSession(model, fmt, config)
            return lambda i: [alone.step(tokens[i:i + 1], times[i:i + 1])]
        batch = SessionBatch(model, fmt, rows=sessions)
        for _ in range(sessions):
            batch.add(config)
        return lambda i: batch.step([tokens[i:i + 1]] * sessions, [times[i:i + 1]] * sessions)

    def run(sessions: int | None, frames: int) -> tuple[float, int]:
        step = stepper(sessions)
        said = 0
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(frames):
            said += sum(isinstance(e, ResponseEvent) for events in step(i) for e in events)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, said

    rows = []
    for sessions in [None, *counts]:
        run(sessions, min(8, len(times)))  # warm-up: kernels and the caches' first allocations for these shapes
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        elapsed, said = run(sessions, len(times))
        count = sessions or 1
        row = {"sessions": count, "how": "alone" if sessions is None else "batched", "frames": count * len(times),
               "fps": count * len(times) / elapsed, "fps_per_stream": len(times) / elapsed, "elapsed_s": elapsed,
               "responses": said, "device": str(model.device), "gpu": torch.cuda.get_device_name() if cuda else "",
               "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("official", "tiny"), default="official")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--minutes", type=float, default=1.0, help="length of the synthetic video")
    parser.add_argument("--modes", nargs="+", default=[*MODES, MODES[0]], choices=MODES,
                        help="timed in this order; the default times the sequential loop first and last, and "
                             "the gap between those two rows is the noise")
    parser.add_argument("--answer-every", type=float, default=10.0,
                        help="seconds between the questions of the 'answers' workload (0 = skip it)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--decode", choices=("eager", "static", "compiled"), default="eager",
                        help="how response tokens are decoded (engine.decode): the eager forward per token, the "
                             "static-shape step, or that step compiled (CUDA graphs on a GPU)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--videos", default="data/bench", help="where the synthetic videos are cached")
    parser.add_argument("--switch-interval", type=float, default=0.0,
                        help="sys.setswitchinterval in seconds (0 = Python's default, 5 ms)")
    parser.add_argument("--hf-baseline", action="store_true",
                        help="also time the bare HF model's greedy decode (no engine)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[],
                        help="instead of the modes: aggregate frames-only FPS of K streams batched, for each K")
    parser.add_argument("--json", default="", help="also write every row to this JSON file")
    parser.add_argument("--loader", action="store_true",
                        help="write the random model as an official checkpoint folder under --work and load it with "
                             "livevlm.load (the path `livevlm stream --model` takes)")
    parser.add_argument("--work", default="data/bench/official-random", help="where --loader writes its folders")
    parser.add_argument("--model", default="", help="load this official (or livevlm) checkpoint folder / hub id")
    parser.add_argument("--llm", default="", help="with --model: the base LLM folder or hub id")
    parser.add_argument("--vision", default="", help="with --model: the vision tower folder or hub id")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    dtype = getattr(torch, args.dtype)
    started = time.perf_counter()
    if args.loader:
        folder, llm, vision = write_official_folder(args.size, Path(args.work) / args.size, args.device, dtype)
        print(f"wrote the random official-format checkpoint under {folder.parent} in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        model, fmt, encoder, fps = load_through_loader(str(folder), str(llm), str(vision), args.device, args.dtype)
    elif args.model:
        model, fmt, encoder, fps = load_through_loader(args.model, args.llm or None, args.vision or None,
                                                       args.device, args.dtype)
    else:
        model, fmt, encoder, fps = build_random_model(args.size, args.device, dtype)
    path = "livevlm.load" if args.loader or args.model else "built in memory"
    params = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in encoder.parameters())
    print(f"{args.size} model ({path}; {params / 1e9:.2f}B parameters, {args.dtype}, {args.device}) ready in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    folder = Path(args.videos)
    folder.mkdir(parents=True, exist_ok=True)
    video = str(video_for(args.minutes, folder))
    cuda = torch.device(args.device).type == "cuda"
    if args.sessions:
        rows = batched_rows(model, fmt, encoder, video, fps, args.sessions, args.decode)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"\n{args.size} size ({path}), {args.dtype} on {rows[0]['gpu'] or args.device}, {args.minutes:g}-min "
              f"synthetic video at {fps:g} fps, frames only (pre-encoded), one frame of each stream a step")
        print("| streams | how | aggregate FPS | FPS per stream | × one session alone | peak GPU memory |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['sessions']} | {row['how']} | {row['fps']:.1f} | {row['fps_per_stream']:.1f} | "
                  f"{row['fps'] / rows[0]['fps']:.2f}× | {row['peak_gpu_gb']:.1f} GB |")
        return
    workloads = [("frames", [])]
    if args.answer_every > 0:
        times = [i * args.answer_every for i in range(int(args.minutes * 60 / args.answer_every))]
        workloads.append(("answers", [(t, "What is happening now?") for t in times]))
    # Warm-up: one untimed pass of every workload over the same video, so that kernels, the allocator's
    # blocks for the full KV cache and the encoder's batches stay out of the figures. (A 6-second warm-up
    # with 4-token answers left the first timed mode 2-3x slow on an H200.)
    # With --decode compiled, the warm-up is also where the decode step compiles.
    for _, queries in workloads:
        run_mode("pipeline", model, fmt, encoder, video, fps, args.threads, 0, queries=queries,
                 max_new_tokens=args.max_new_tokens, decode=args.decode)
    rows = []
    for workload, queries in workloads:
        for mode in args.modes:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            row = run_mode(mode, model, fmt, encoder, video, fps, args.threads, 0, queries=queries,
                           max_new_tokens=args.max_new_tokens, decode=args.decode)
            row |= {"workload": workload, "decode": args.decode, "size": args.size, "device": args.device,
                    "path": path, "gpu": torch.cuda.get_device_name() if cuda else "",
                    "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0}
            decode_s = row["responses"] * row["mean_latency_s"]
            row["decode_tokens_per_s"] = row["response_tokens"] / decode_s if decode_s > 0 else 0.0
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.hf_baseline:
        print(f"bare HF greedy decode (no engine, 1300-token context): {hf_decode_baseline(model):.0f} tokens/s",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    weights = args.model or "random weights"
    print(f"\n{args.size} size ({path}), {weights}, {args.dtype} on {rows[0]['gpu'] or args.device}, "
          f"{args.minutes:g}-min synthetic video at {fps:g} fps, {args.decode} decoding")
    print("| workload | mode | FPS | responses | mean response latency | decode tokens/s | peak GPU memory |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workload']} | {row['mode']} | {row['fps']:.1f} | {row['responses']} | "
              f"{row['mean_latency_s']:.2f} s | {row['decode_tokens_per_s']:.0f} | {row['peak_gpu_gb']:.1f} GB |")


if __name__ == "__main__":
    main()
