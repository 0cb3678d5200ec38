"""`livevlm serve`: one model in memory behind a web page and a WebSocket API, for several users at once.

    livevlm serve [--model DIR|HUB_ID] [--llm …] [--vision …] [--host 127.0.0.1] [--port 8000]
                  [--max-sessions N] [--api-key KEY]

The options are checked and the port is taken first (a port in use costs a second, not a model load); the
model loads before the port accepts connections. One log line gives the URL; nothing else is printed but
warnings (uvicorn logs only those). Ctrl-C closes the open sessions (close code 1012) and exits 130.
`--port 0` takes a free port (the log line names it). Protocol, limits and security: docs/server.md.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import warnings
from dataclasses import dataclass, field

from livevlm.cli import CommandError, on_interrupt_raise
from livevlm.config import DecodeMode
from livevlm.devices import DtypeName

log = logging.getLogger(__name__)

_D = "the server's limit; see docs/server.md"


@dataclass
class ServeArgs:
    model: str = field(default="", metadata={
        "help": "checkpoint folder, the paper's released checkpoint (its folder or hub id); empty = the shipped "
                "default model"})
    llm: str = field(default="", metadata={"help": "base LLM folder or hub id, overriding the checkpoint's"})
    vision: str = field(default="", metadata={"help": "vision tower folder or hub id, overriding the checkpoint's"})
    host: str = field(default="127.0.0.1", metadata={
        "help": "address to listen on; 0.0.0.0 = every interface (then set --api-key)"})
    port: int = field(default=8000, metadata={"help": "TCP port; 0 = any free port"})
    max_sessions: int = field(default=4, metadata={"help": "sessions at once; one more is refused (close 1013)"})
    api_key: str = field(default="", metadata={
        "help": "require this key on /health and /v1/stream (Authorization: Bearer KEY, or ?key=KEY); "
                "default: $LIVEVLM_API_KEY, else none"})
    idle_timeout: float = field(default=120.0, metadata={"help": "close a session silent this many seconds"})
    max_fps: float = field(default=60.0, metadata={"help": f"frames per second one session may send ({_D})"})
    queue_frames: int = field(default=16, metadata={
        "help": "frames a session may have waiting; past it the oldest is dropped and reported"})
    max_message_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": f"largest message ({_D})"})
    max_image_pixels: int = field(default=4096 * 4096, metadata={"help": f"largest image, width × height ({_D})"})
    max_query_chars: int = field(default=2000, metadata={"help": f"longest query or system prompt ({_D})"})
    queue_queries: int = field(default=4, metadata={"help": f"queries a session may have waiting ({_D})"})
    max_frames_per_forward: int = field(default=8, metadata={"help": "frames per LLM forward when catching up"})
    decode: DecodeMode = field(default="eager", metadata={
        "help": "how every session's response tokens are decoded: eager (one forward each); compiled (a "
                "static-shape step under torch.compile, CUDA graphs on a GPU); "
                "static (the same step uncompiled). The same responses (docs/engine.md)"})
    batch_sessions: bool = field(default=False, metadata={
        "help": "forward the frames of all sessions together, one batched LLM forward (for a GPU serving many "
                "streams; each session's KV budget is allocated at start). The same responses"})
    device: str = field(default="auto", metadata={"help": "auto (a GPU when there is one), cpu, cuda, cuda:1, …"})
    dtype: DtypeName = field(default="auto", metadata={
        "help": "weight precision; auto = bfloat16 on a GPU, float32 on the CPU"})


def serve(args: ServeArgs) -> int:
    from livevlm.server.protocol import ServerLimits

    limits = ServerLimits(max_sessions=args.max_sessions, idle_timeout_s=args.idle_timeout,
                          max_message_bytes=args.max_message_bytes,
                          max_text_bytes=min(ServerLimits.max_text_bytes, args.max_message_bytes),
                          max_image_pixels=args.max_image_pixels, max_fps=args.max_fps,
                          max_query_chars=args.max_query_chars, queue_frames=args.queue_frames,
                          queue_queries=args.queue_queries)
    if args.max_frames_per_forward < 1:
        raise CommandError(f"--max-frames-per-forward {args.max_frames_per_forward}: give at least 1")
    api_key = args.api_key or os.environ.get("LIVEVLM_API_KEY") or None
    if not _is_loopback(args.host) and not api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this machine can use the model",
                    args.host)
    sock = _bind(args.host, args.port)
    try:
        model = _load(args)
        return _run(model, limits, api_key, args, sock)
    finally:
        sock.close()


def _run(model, limits, api_key: str | None, args: ServeArgs, sock: socket.socket) -> int:
    import uvicorn
    from PIL import Image

    from livevlm.server.app import ServerOptions, create_app

    # Images above max_image_pixels are refused from their header; Pillow's own warning would only repeat it.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    app = create_app(model, ServerOptions(limits=limits, model_name=args.model or "default", api_key=api_key,
                                          max_frames_per_forward=args.max_frames_per_forward,
                                          decode=args.decode, batch_sessions=args.batch_sessions))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    line = (f"serving {args.model or 'the default model'} on {model.runs_on}: http://{shown}:{port}/ (page), "
            f"ws://{shown}:{port}/v1/stream (API){', API key required' if api_key else ''}; "
            f"up to {limits.max_sessions} sessions")

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:  # listening: the one line that says where
                log.info("%s", line)

    server = Server(uvicorn.Config(app, **uvicorn_settings(limits)))
    on_interrupt_raise()  # uvicorn re-raises Ctrl-C after its graceful shutdown: caught below
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        log.info("stopped")
        return 130
    return 0


def uvicorn_settings(limits) -> dict:
    """uvicorn's settings for the app: the sans-I/O websockets protocol, its message cap at
    max_message_bytes (a larger message closes the connection with 1009), no compression (images do not
    compress, and inflating is work a client could make the server do), uvicorn's logs through ours."""
    return {"ws": "websockets-sansio", "ws_max_size": limits.max_message_bytes, "ws_per_message_deflate": False,
            "log_config": None, "access_log": False, "timeout_graceful_shutdown": 5, "lifespan": "on"}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Take the port now (listening starts when the model is loaded). Raises CommandError."""
    if not 0 <= port <= 65535:
        raise CommandError(f"--port {port}: give a TCP port from 1 to 65535 (0 = any free port)")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise CommandError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); "
                           "is another server using the port? Choose another with --port") from None
    sock.set_inheritable(True)
    return sock


def _load(args: ServeArgs):
    from livevlm import runtime

    log.info("loading %s …", args.model or "the default model")
    runtime.pin_mmap_threshold()  # flat memory for endless streams (see livevlm.runtime)
    from transformers.utils import logging as hf_logging

    import livevlm

    hf_logging.disable_progress_bar()
    model = livevlm.load(args.model or "default", llm=args.llm or None, vision=args.vision or None,
                         device=args.device, dtype=args.dtype)
    model.encoder  # noqa: B018  (loaded now, not on the first frame)
    return model
