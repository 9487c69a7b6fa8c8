"""The benchmarks' library: what every script in bench/ shares.

    workloads   seeded workloads (offline prompt sets, short/mixed/long Poisson, over/fair
                pool workloads, the serving workload): one `make_workload`
    metrics     per-request records, `summarize`, and the one percentile definition (nearest rank)
    report      machine info, a table for people, the final JSON line
    online      the online loop (requests at their arrival times) on a wall or parallel clock
    ours        infinillm in process: warm-up, online serving, longest context, pool checks
    vllm        the one place that starts vLLM: offline LLM, online engine, OpenAI server,
                scripts in .venv-vllm
    http_load   streamed completion calls against an OpenAI-compatible server (needs httpx)
    servers     a server under test as a subprocess (needs httpx)
    plots       the results suite's figures (needs matplotlib)
    sim_plots   sim_paper.py's figures of the simulated cluster (needs matplotlib)

Every module imports only the standard library at import time except http_load and servers
(httpx) and plots, sim_plots (matplotlib, imported when called); infinillm and vLLM are imported
inside the functions that use them. This file imports nothing, so that `python -m
bench.lib.workloads` (which writes a prompt file) runs its module once; import names from their
modules.
"""
