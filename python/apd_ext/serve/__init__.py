"""Serving APD: a Ray Serve deployment (one Engine per replica) behind a
FastAPI ingress with OpenAI-style completions. `apd serve` starts it.

    protocol.py  request bodies, 400 errors naming the field, usage, SSE
    loop.py      the replica's step loop (asyncio task over one Engine; admission, failures, drain)
    metrics.py   the replica's Prometheus metrics (GET /metrics)
    app.py       the FastAPI routes (APDServer)
    ray_app.py   the Ray Serve deployment and `apd serve`
"""
