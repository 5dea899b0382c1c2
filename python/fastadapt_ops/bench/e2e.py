"""Bench family ``e2e``: a whole model, end to end, against what a user would otherwise run on the
same GGUF file, in the same process: HF transformers fp32 (``from_pretrained(gguf_file=...)``)
and llama.cpp (``llama-cpp-python``, used when installed; the table says so when it is not).

    python bench/run.py e2e [--model smollm2] [--threads 1,2] [--prompt-tokens 512]
                            [--decode-tokens 128]
                            [--engines fastadapt,fastadapt-q8,fastadapt-pyloop,hf,llama.cpp]
                            [--no-split]

Engines: ``fastadapt`` (exact: fp32 activations and KV cache), ``fastadapt-q8`` (llama.cpp's
numerics: decode activations quantized to int8 per token, KV cache in float16),
``fastadapt-pyloop`` (the exact engine with each decode step's layers issued from Python, one op
at a time, instead of one ``DecodeStack`` call: what the C++ step buys), ``hf`` (HF transformers
fp32), ``llama.cpp``.

Every engine runs the same token ids: a prefill of ``--prompt-tokens`` tokens of ordinary text,
then ``--decode-tokens`` single-token steps feeding the tokens our greedy decode produced (the
work per step does not depend on which token is fed). Each step computes the last position's
logits. tokens/s are medians over ``--repeats`` runs, the engines taking turns within each.
For fastadapt the decode time is split into
matmuls (``fastadapt::qlinear``), attention and the rest (torch profiler self times over a
profiled decode, scaled to the unprofiled wall time), and the bytes one decode step must read
(weights + KV cache at the mean context) are set against the machine's measured read bandwidth.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import results, timer

COLUMNS = ["engine", "threads", "prefill_tokens", "prefill_tok_s", "decode_tokens", "decode_tok_s",
           "prefill_vs_llama_cpp", "decode_vs_llama_cpp", "decode_vs_hf", "decode_gbps",
           "decode_frac_of_bw", "command"]

# Ordinary English prose (public-domain style, written for this bench), repeated to length.
_TEXT = (
    "The river left the hills in a hurry, as if it had somewhere to be, and by the time it reached "
    "the town it had slowed to a walk. People built their houses along its banks because the soil "
    "there was dark and soft, and because in summer the water kept the air cool. Every spring the "
    "old bridge was inspected by a committee of three, who walked across it twice, looked "
    "underneath it once, and declared it sound. Children fished from its railings with string and "
    "bent pins, catching nothing and caring less. In the evenings the baker sat on the bench by "
    "the mill and told anyone who would listen about the winter the river froze solid, when the "
    "whole town skated to the next village and back before the ice began to sing and crack. ")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' or a path to a .gguf file")
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--engines", default="fastadapt,fastadapt-q8,fastadapt-pyloop,hf,llama.cpp")
    p.add_argument("--repeats", type=int, default=3, help="runs per engine and thread count (median)")
    p.add_argument("--no-split", action="store_true", help="skip the decode time split")
    p.add_argument("--bw-mib", type=int, default=1024, help="size of the bandwidth probe")
    p.add_argument("--out", default=None, help="results root (default bench/results)")
    p.add_argument("--no-write", action="store_true")
    return p


def prompt_ids(tokenizer, n: int) -> List[int]:
    """``n`` token ids of ordinary text (the bench text repeated and cut)."""
    ids: List[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(_TEXT)
    return ids[:n]


# ---- engines: each returns (prefill_s, decode_s) for one run ---------------------------------
def _run_fastadapt(model, ids: Sequence[int], feed: Sequence[int], q8: bool = False, pyloop: bool = False):
    # the configuration is set per run: the fastadapt engines share one loaded model
    model.act_quant = "int8" if q8 else "none"
    model.fused_decode = not pyloop
    model.configure_kv(None, kv_dtype=torch.float16 if q8 else None)
    t0 = time.perf_counter()
    model.prefill(ids)
    t1 = time.perf_counter()
    for tok in feed:
        model.decode_one(tok)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _greedy_feed(model, ids: Sequence[int], n: int) -> List[int]:
    logits = model.prefill(ids)
    out = []
    for _ in range(n):
        tok = int(torch.argmax(logits))
        out.append(tok)
        logits = model.decode_one(tok)
    return out


class _HF:
    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                      dtype=torch.float32).eval()

    @torch.inference_mode()
    def run(self, ids, feed):
        t0 = time.perf_counter()
        out = self.m(torch.tensor([list(ids)]), use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        t1 = time.perf_counter()
        for tok in feed:
            out = self.m(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            out.logits[:, -1].argmax(-1)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


class _LlamaCpp:
    def __init__(self, path: str, n_ctx: int, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

    def run(self, ids, feed):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(list(ids))
        t1 = time.perf_counter()
        for tok in feed:
            llm.eval([tok])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def _llama_cpp_status() -> Optional[str]:
    """None when llama-cpp-python imports, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed (pip install llama-cpp-python): {e}"
    return None


# ---- decode time split -----------------------------------------------------------------------
_MATMUL_OPS = ("fastadapt::qlinear", "aten::linear")  # top-level ops: totals include children
_ATTENTION_OPS = ("aten::scaled_dot_product_attention", "fastadapt::paged_decode_attention",
                  "fastadapt::paged_prefix_attention", "fastadapt::merge_attention_states")


def decode_split(model, ids: Sequence[int], feed: Sequence[int], decode_s: float) -> Dict[str, float]:
    """Fractions of the unprofiled decode time spent in matmuls, attention and the rest."""
    from torch.profiler import ProfilerActivity, profile

    model.prefill(ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for tok in feed:
            model.decode_one(tok)
    mm = att = 0.0
    for ev in prof.key_averages():
        # CPU total of the op (its kernel and any children) in us
        if ev.key in _MATMUL_OPS:
            mm += ev.cpu_time_total
        elif ev.key in _ATTENTION_OPS:
            att += ev.cpu_time_total
    per_tok_us = decode_s / len(feed) * 1e6
    mm_t, att_t = mm / len(feed), att / len(feed)
    rest = max(per_tok_us - mm_t - att_t, 0.0)
    return {"per_token_us": per_tok_us, "matmul_us": mm_t, "attention_us": att_t, "rest_us": rest,
            "matmul_frac": mm_t / per_tok_us, "attention_frac": att_t / per_tok_us,
            "rest_frac": rest / per_tok_us}


def decode_bytes_per_token(model, mean_ctx: float, kv_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Bytes one decode step must read: every block matrix and the LM head once, one embedding
    row, the norms, and K and V of every layer at ``mean_ctx`` tokens (pages of ``kv_dtype``,
    default the model's dtype)."""
    from ..quant import QuantizedWeight

    def nbytes(w):
        if isinstance(w, QuantizedWeight):
            return w.qdata.numel() * w.qdata.element_size()
        if isinstance(w, list):
            return sum(nbytes(p) for p in w)
        return w.numel() * w.element_size()

    weights = sum(nbytes(getattr(L, n)) for L in model.layers for n in ("wqkv", "wo", "wgu", "wdown"))
    weights += nbytes(model.lm_head)
    weights += sum(L.attn_norm.numel() * 4 + L.ffn_norm.numel() * 4 for L in model.layers)
    c = model.config
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * mean_ctx * torch.empty((), dtype=kv_dtype or model.dtype).element_size()
    return {"weight_bytes": float(weights), "kv_bytes": float(kv), "total_bytes": float(weights + kv)}


def run(args: argparse.Namespace) -> dict:
    from ..models import load, resolve

    path = resolve(args.model)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    threads_list = [int(t) for t in args.threads.split(",")]
    P, N = args.prompt_tokens, args.decode_tokens
    notes: List[str] = []

    model = load(path, max_ctx=P + N + 8)
    ids = prompt_ids(model.tokenizer, P)
    torch.set_num_threads(max(threads_list))
    feed = _greedy_feed(model, ids, N)
    bw = timer.measure_read_bandwidth(nbytes=args.bw_mib << 20)
    mean_ctx = P + N / 2
    bytes_tok = decode_bytes_per_token(model, mean_ctx)
    bytes_tok_q8 = decode_bytes_per_token(model, mean_ctx, torch.float16)
    print(f"e2e: {os.path.basename(path)}, prompt {P} tokens, decode {N} tokens; measured read "
          f"bandwidth {bw:.1f} GB/s; one decode step reads {bytes_tok['total_bytes'] / 1e6:.1f} MB "
          f"(weights {bytes_tok['weight_bytes'] / 1e6:.1f} MB, KV {bytes_tok['kv_bytes'] / 1e6:.1f} MB)")

    hf = llama_status = None
    if "hf" in engines:
        try:
            hf = _HF(path)
        except Exception as e:  # noqa: BLE001  (transformers/accelerate/gguf missing)
            notes.append(f"HF transformers not run: {e}")
            print(notes[-1])
    if "llama.cpp" in engines:
        llama_status = _llama_cpp_status()
        if llama_status:
            notes.append(llama_status)
            print(llama_status)

    rows: List[dict] = []
    split = None
    for t in threads_list:
        torch.set_num_threads(t)
        runners = {}
        if "fastadapt" in engines:
            runners["fastadapt"] = lambda a, b: _run_fastadapt(model, a, b)
        if "fastadapt-q8" in engines:
            runners["fastadapt-q8"] = lambda a, b: _run_fastadapt(model, a, b, q8=True)
        if "fastadapt-pyloop" in engines:
            runners["fastadapt-pyloop"] = lambda a, b: _run_fastadapt(model, a, b, pyloop=True)
        if hf is not None:
            runners["hf-fp32"] = hf.run
        if "llama.cpp" in engines and llama_status is None:
            lc = _LlamaCpp(path, P + N + 8, t)
            runners["llama.cpp"] = lc.run
        for fn in runners.values():
            fn(ids[:32], feed[:4])  # warm-up
        # engines take turns within every repeat, so a slow stretch of this shared machine
        # falls on all of them alike instead of on whichever engine ran then
        times = {name: ([], []) for name in runners}
        for _ in range(args.repeats):
            for name, fn in runners.items():
                a, b = fn(ids, feed)
                times[name][0].append(a)
                times[name][1].append(b)
        res = {name: (statistics.median(pre), statistics.median(dec)) for name, (pre, dec) in times.items()}
        for name, (a, b) in res.items():
            row = {"engine": name, "threads": t, "prefill_tokens": P, "prefill_tok_s": P / a,
                   "decode_tokens": N, "decode_tok_s": N / b,
                   "command": f"python bench/run.py e2e --threads {t} --prompt-tokens {P} "
                              f"--decode-tokens {N} --engines {args.engines}"}
            if "llama.cpp" in res:
                row["prefill_vs_llama_cpp"] = res["llama.cpp"][0] / a
                row["decode_vs_llama_cpp"] = res["llama.cpp"][1] / b
            if "hf-fp32" in res:
                row["decode_vs_hf"] = res["hf-fp32"][1] / b
            if name.startswith("fastadapt"):
                step = bytes_tok_q8 if name == "fastadapt-q8" else bytes_tok
                gbps = step["total_bytes"] * N / b / 1e9
                row["decode_gbps"] = gbps
                row["decode_frac_of_bw"] = gbps / bw
            rows.append(row)
            print(f"{name:>10} {t}t: prefill {P / a:8.1f} tok/s   decode {N / b:7.1f} tok/s"
                  + (f"   decode x{row['decode_vs_llama_cpp']:.2f} vs llama.cpp" if "decode_vs_llama_cpp" in row else "")
                  + (f"   x{row['decode_vs_hf']:.2f} vs HF" if "decode_vs_hf" in row else ""))
        if "fastadapt" in res and not args.no_split and t == max(threads_list):
            model.act_quant = "none"  # the split is of the exact engine
            model.fused_decode = True
            model.configure_kv(None)
            split = decode_split(model, ids, feed, res["fastadapt"][1])
            print(f"fastadapt decode split at {t} threads: {split['per_token_us']:.0f} us/token = matmuls "
                  f"{100 * split['matmul_frac']:.0f}%, attention {100 * split['attention_frac']:.0f}%, "
                  f"rest {100 * split['rest_frac']:.0f}%")
    paths = None
    if not args.no_write:
        torch.set_num_threads(max(threads_list))
        meta = {"command": results.command_line("e2e", getattr(args, "argv", [])),
                **results.environment("cpu"), "model": os.path.basename(path),
                "read_bandwidth_gbps": bw, "decode_bytes_per_token": bytes_tok,
                "decode_split": split, "notes": notes}
        paths = results.write_results("e2e", rows, COLUMNS, out_root=args.out, device="cpu", meta=meta)
        print("wrote", *paths)
    return {"rows": rows, "split": split, "bytes_per_token": bytes_tok, "notes": notes, "paths": paths}
