"""infinillm's benchmarks: a small library (`bench.lib`) and one script per question.

Run a script from the repository root as a module, `python -m bench.NAME` (bench/README.md lists
them). This file imports nothing: the vLLM-side scripts import this package inside .venv-vllm,
where infinillm and its dependencies are not installed.
"""
