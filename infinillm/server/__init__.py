"""Server: the OpenAI-compatible HTTP API over an AsyncEngine, its metrics and the live page.

    app.py       create_app(async_engine, model_name, api_key) -> FastAPI: the routes, errors,
                 disconnect handling, the n-choice fan-out over the engine
    protocol.py  pydantic request / response bodies of the OpenAI API, OpenAI error bodies,
                 server-sent event chunks
    metrics.py   Prometheus series on a private registry; cluster gauges read at scrape time
    static/      index.html: the live page (memory per instance, debts between instances)

`infinillm serve` (cli.py) builds the engine, starts the AsyncEngine and runs uvicorn.
"""

from infinillm.server.app import create_app

__all__ = ["create_app"]
