"""`livevlm world generate`: render synthetic-world videos and their exact event annotations."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field


@dataclass
class GenerateArgs:
    """Arguments of `livevlm world generate`."""

    out: str = field(metadata={"help": "output folder: videos/*.mp4 and annotations.jsonl are written there"})
    videos: int = field(default=10, metadata={"help": "number of videos"})
    seed: int = field(default=0, metadata={"help": "random seed (same seed = same annotations and videos)"})
    duration: float = field(default=30.0, metadata={"help": "seconds per video"})
    size: int = field(default=256, metadata={"help": "frame side in pixels (even)"})
    video_fps: int = field(default=10, metadata={"help": "native frame rate of the rendered videos"})
    density: float = field(default=12.0, metadata={"help": "scheduled events per minute (collisions and "
                                                           "exits come on top)"})
    max_objects: int = field(default=4, metadata={"help": "most objects on screen at once"})
    noise: float = field(default=0.0, metadata={"help": "camera noise std in grey levels (e.g. 6)"})
    flicker: float = field(default=0.0, metadata={"help": "per-frame brightness jitter (e.g. 0.1 = ±10%%)"})
    texture: bool = field(default=False, metadata={"help": "textured background as a distractor"})
    workers: int = field(default=1, metadata={"help": "processes rendering at once (same files for any number)"})


def generate(args: GenerateArgs) -> int:
    """Render the set and print where it is and how fast it went."""
    from livevlm.world import generate_world

    fixed = ("out", "videos", "seed", "duration", "workers")
    options = {k: v for k, v in asdict(args).items() if k not in fixed}
    start = time.perf_counter()
    path = generate_world(args.out, videos=args.videos, seed=args.seed, duration=args.duration,
                          workers=args.workers, **options)
    seconds = time.perf_counter() - start
    minutes = args.videos * args.duration / 60
    print(f"wrote {args.videos} videos and {path} in {seconds:.1f} s "
          f"({minutes * 60 / max(seconds, 1e-9):.0f}x real time)")
    return 0
