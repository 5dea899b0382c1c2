"""``fastadapt generate | perplexity | demo``: the model runner's commands.

Wire into the main parser with ``add_subcommands(subparsers)``; each sub-parser sets
``func`` (``args.func(args) -> int``). Standalone: ``python -m fastadapt_ops.models.cli ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

__all__ = ["add_subcommands", "cmd_generate", "cmd_perplexity", "cmd_demo", "main"]

DEMO_PROMPT = "What are three good reasons to learn to cook at home? Answer briefly."


def _threads(args):
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))


def _progress_printer(label: str, stream=sys.stderr):
    last = [-1]

    def cb(i, n, name):
        pct = int(100 * i / n)
        if pct != last[0] and (pct % 5 == 0 or i == n):
            last[0] = pct
            stream.write(f"\r{label}: {pct:3d}% ({i}/{n} tensors)")
            if i == n:
                stream.write("\n")
            stream.flush()

    return cb


def _budget(text: str):
    """``--kv-budget``: a ratio in (0, 1] ("0.25") or a token count ("256")."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--kv-budget must be a ratio or a token count, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"--kv-budget must be > 0, got {text!r}")
    return int(v) if v > 1 and v == int(v) else v


def _configure_runner(model, args) -> None:
    import torch

    model.act_quant = getattr(args, "act_quant", None) or "none"
    kv_dtype = getattr(torch, args.kv_dtype) if getattr(args, "kv_dtype", None) else None
    if getattr(args, "kv_policy", None):
        model.configure_kv(args.kv_policy, args.kv_budget, page_size=args.page_size, kv_dtype=kv_dtype)
    elif getattr(args, "page_size", None):
        model.configure_kv(None, page_size=args.page_size, kv_dtype=kv_dtype)


def _kv_fields(model) -> dict:
    b = model.kv_bytes()
    return {"kv_bytes_end": b["held"], "kv_bytes_peak": b["peak"],
            "kv_policy": getattr(model.kv_policy, "name", None) if model.kv_policy else None}


def _add_kv_args(p) -> None:
    from ..kv.policies import POLICIES

    p.add_argument("--kv-policy", default=None, choices=sorted(POLICIES),
                   help="KV cache eviction policy (default: keep everything)")
    p.add_argument("--kv-budget", type=_budget, default=1.0,
                   help="KV budget: a ratio of the tokens seen (0.25) or a token count per row (256)")
    p.add_argument("--page-size", type=int, default=16, help="KV cache page size in tokens")
    p.add_argument("--kv-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="KV page dtype (default: the model's, float32); float16 halves attention bytes")
    p.add_argument("--act-quant", choices=("none", "int8"), default="none",
                   help="decode activations: exact fp32, or int8 per token (llama.cpp's numerics)")


def cmd_generate(args) -> int:
    from . import generate, load

    _threads(args)
    model = load(args.model, threads=args.threads, quantize=args.quantize, group_size=args.group_size)
    _configure_runner(model, args)
    from ..attention.sparse_prefill import apply_sparse_prefill  # block-sparse long prefills
    from ..decoding import cli as dcli  # adaptive decoding loops (decoding/cli.py)

    apply_sparse_prefill(model, args)
    if getattr(args, "prune_prompt", None) not in (None, "none") and (
            dcli.wants_sampling(args) or getattr(args, "speculate", None) or getattr(args, "early_exit", False)):
        raise SystemExit("fastadapt generate: --prune-prompt runs plain decoding; it cannot be combined with "
                         "--best-of, --switch, --speculate or --early-exit")
    if dcli.wants_sampling(args):  # --best-of / --switch
        return dcli.run_sampling(model, args)
    if dcli.run_decoding(args, model):  # --early-exit / --speculate
        return 0
    from ..tokens.prompt_pruning import apply_prune_args, prune_fields

    runner = apply_prune_args(model, args)  # the model, or a PromptPruner around it
    stream = None
    if not args.json:
        stream = lambda s: (sys.stdout.write(s), sys.stdout.flush())  # noqa: E731
    r = generate(runner, model.tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                 chat=args.chat, stream=stream)
    if args.json:
        print(json.dumps({**r.to_dict(), **_kv_fields(model), **prune_fields(runner)}))
    else:
        print()
        print(f"[{r.prompt_tokens} prompt tokens: {r.prefill_tokens_per_s:.1f} tok/s prefill; "
              f"{len(r.tokens)} new tokens: {r.decode_tokens_per_s:.1f} tok/s decode]", file=sys.stderr)
    return 0


def cmd_perplexity(args) -> int:
    from . import load, perplexity

    _threads(args)
    model = load(args.model, threads=args.threads, max_ctx=max(args.ctx, 16), quantize=args.quantize,
                 group_size=args.group_size)
    _configure_runner(model, args)
    if model.tokenizer is None:
        raise SystemExit(f"fastadapt perplexity: {args.model} has no tokenizer")
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    ids = model.tokenizer.encode(text)
    t = time.perf_counter()
    res = perplexity(model, ids, ctx=args.ctx, chunk=args.chunk)
    res["seconds"] = time.perf_counter() - t
    res.update(_kv_fields(model))
    if args.json:
        print(json.dumps(res))
    else:
        print(f"perplexity {res['ppl']:.4f} over {res['tokens']} tokens (ctx {args.ctx}, {res['seconds']:.1f} s)")
    return 0


def _hf_compare(path: str, ids, new_tokens: int) -> None:
    """Prefill/decode tokens/s of HF transformers fp32 on the same GGUF file or HF directory
    (greedy, same prompt ids)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("HF transformers is not installed (pip install transformers accelerate): no comparison.")
        return
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    is_dir = os.path.isdir(path)
    print("Loading HF transformers fp32 from the same " +
          ("directory..." if is_dir else "GGUF file (dequantizes every tensor)..."), flush=True)
    t = time.perf_counter()
    try:
        if is_dir:
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            m = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32)
    except Exception as e:  # noqa: BLE001  (accelerate missing, old transformers...)
        print(f"HF transformers could not load the GGUF file: {e}")
        return
    m.eval()
    print(f"  loaded in {time.perf_counter() - t:.1f} s")
    x = torch.tensor([ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = m(x, use_cache=True)
        t1 = time.perf_counter()
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        n = 0
        t2 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = m(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            n += 1
        t3 = time.perf_counter()
    print(f"HF transformers fp32: prefill {len(ids) / (t1 - t0):.1f} tok/s, "
          f"decode {n / max(t3 - t2, 1e-9):.1f} tok/s")


def cmd_demo(args) -> int:
    import torch

    from . import generate, load

    _threads(args)
    print(f"fastadapt demo: SmolLM2-135M-Instruct (Q4_1 GGUF) on {torch.get_num_threads()} threads")
    t = time.perf_counter()
    model = load(args.model, threads=args.threads, progress=_progress_printer("Loading", sys.stdout))
    print(f"Loaded in {time.perf_counter() - t:.1f} s: {model}")
    prompt = args.prompt or DEMO_PROMPT
    print(f"\nUser: {prompt}\nAssistant: ", end="", flush=True)
    r = generate(model, model.tokenizer, prompt, max_new_tokens=args.max_new_tokens, chat=True,
                 stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    print(f"\n\nfastadapt: prefill {r.prefill_tokens_per_s:.1f} tok/s ({r.prompt_tokens} tokens), "
          f"decode {r.decode_tokens_per_s:.1f} tok/s ({len(r.tokens)} tokens)")
    if not args.no_hf:
        ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(prompt))
        _hf_compare(model.path, ids, max(2, len(r.tokens)))
    return 0


def _add_quantize_args(parser) -> None:
    from .hf_loader import QUANTIZE_CHOICES

    parser.add_argument("--quantize", default=None, choices=sorted(QUANTIZE_CHOICES),
                        help="quantize the float block matrices once at load (norms/embeddings stay float)")
    parser.add_argument("--group-size", type=int, default=128,
                        help="values per scale for --quantize int4/int8 (-1 = per channel)")


def add_subcommands(subparsers) -> None:
    """Add ``generate``, ``perplexity`` and ``demo`` to an argparse sub-parsers object."""
    g = subparsers.add_parser("generate", help="generate text with a GGUF model or an HF directory")
    g.add_argument("--model", default="smollm2",
                   help="'smollm2', a path to a .gguf file, or an HF model directory (config.json + *.safetensors)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print one JSON object")
    _add_quantize_args(g)
    _add_kv_args(g)
    from ..attention.sparse_prefill import add_sparse_prefill_args, add_tune_sparse_subcommand
    from ..decoding import cli as dcli

    add_sparse_prefill_args(g)
    dcli.add_decoding_args(g)
    dcli.add_sampling_args(g)
    from ..tokens.prompt_pruning import add_prune_args

    add_prune_args(g)
    g.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("perplexity", help="perplexity of a text file")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--file", required=True)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    _add_quantize_args(p)
    p.add_argument("--chunk", type=int, default=None,
                   help="tokens per forward within a window (default: all, or 64 with a KV policy)")
    _add_kv_args(p)
    p.set_defaults(func=cmd_perplexity)

    d = subparsers.add_parser("demo", help="chat with SmolLM2 and compare speed with HF transformers")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--prompt", default=None)
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    d.set_defaults(func=cmd_demo)

    add_tune_sparse_subcommand(subparsers)
    from .quantize_cli import add_quantize_subcommand  # fastadapt quantize (models/quantize_cli.py)
    add_quantize_subcommand(subparsers)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastadapt-models")
    sub = parser.add_subparsers(dest="command", required=True)
    add_subcommands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
