"""`livevlm serve`: one model in memory, many live sessions over WebSocket, and the web page that drives them.

    protocol.py  the `/v1/stream` messages: client messages parsed and checked, the limits, the server's replies
    worker.py    the model worker: per-session queues, round-robin scheduling, the engine's events → messages
    app.py       the FastAPI app: `/` (the page), `/health`, the `/v1/stream` WebSocket, the API key
    static/      the page (plain HTML, CSS and JavaScript)

The protocol, the limits, the scheduling and the security notes: docs/server.md.
"""
