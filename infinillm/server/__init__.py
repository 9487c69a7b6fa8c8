"""Server: the OpenAI-compatible HTTP API, the engine-core process behind it, its metrics and
the live page.

    app.py       create_app(async_engine, model_name, api_key) -> FastAPI: the routes, errors,
                 disconnect handling, the n-choice fan-out over the engine
    protocol.py  pydantic request / response bodies of the OpenAI API, OpenAI error bodies,
                 server-sent event chunks
    metrics.py   Prometheus series on a private registry; cluster gauges read at scrape time
    static/      index.html: the live page (memory per instance, debts between instances)
    client.py    EngineClient: AsyncEngine's interface in the API process, over a core process
    core.py      run_engine_core: the engine-core process (build the engine, apply, step, send)
    messages.py  the msgspec messages between the two over ZeroMQ; output deltas and merging

`infinillm serve` (cli.py) starts an EngineClient (or, with --no-engine-process, an
AsyncEngine on a thread) and runs uvicorn.
"""

from infinillm.server.app import create_app

__all__ = ["create_app"]
