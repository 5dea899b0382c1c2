"""Bench family ``best_of_n``: adaptive best-of-N, entropy-adaptive switching and null-expert MoE
routing, each against its baseline measured in the same run.

    python bench/run.py best_of_n [--model smollm2] [--threads 2] [--n 4,8] [--max-new-tokens 48]
        [--sections bon,switch,moe] [--quick]

Sections
  bon     SmolLM2 chat prompts with a numeric answer. Per prompt and N: ``independent`` = N
          sequential ``generate`` runs (seeds s..s+N-1, each prefilling the prompt); ``batched`` =
          :func:`best_of_n` with the same seeds (one prefill, N forks decoded as one batch,
          prefix-shared attention; the same tokens); ``batched-plain`` = the same without
          prefix-shared attention; ``adaptive`` = batched + pruning every 8 steps + the
          Best-of-Majority early stop on the extracted number. speedup = independent seconds /
          mode seconds (target: batched >= 3x); sample_tokens shows what the adaptive stops save.
  switch  greedy decoding with the stored Q4_1 model (``full``), each cheap variant alone
          (``cheap``: RTN int-B re-quantization, or the model with blocks dropped), and entropy
          switching per variant and threshold pair: decode tok/s, speed-up over full, greedy
          agreement with full (position by position), fraction of tokens on the cheap variant.
  moe     NullExpertMoE (SmolLM2-sized SwiGLU experts: H 576, F 1536, E 8 real + 8 null, top-2,
          int4 experts) for T tokens while a router bias sends a growing fraction of choices to
          the null experts: time against the 0%-null layer (null experts cost nothing: time
          should fall in proportion) and against a torch loop over dense fp32 experts.
"""
from __future__ import annotations

import argparse
import time
from typing import List

import torch

from . import results

COLUMNS = ["section", "mode", "setting", "N", "prompt", "sample_tokens", "seconds", "tokens_per_s",
           "speedup", "agree", "cheap_frac", "null_frac", "median_us", "command"]

PROMPTS = [
    "What is 7 times 8? Answer with just the number.",
    "Tom has 12 apples and gives away 5. How many apples does he have left? Give the number.",
    "What is 15 plus 27? Reply with the number only.",
    "Write a Python function that returns the square of a number.",
]
ANSWER_REGEX = r"(-?\d+)"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench best_of_n", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", default="4,8", help="comma list of sample counts")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--prompts", type=int, default=3, help="how many of the built-in prompts")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--switch-variants", default="int3;drop-odd:10",
                   help="semicolon list of cheap variants: intB (RTN re-quantization) or a block spec "
                        "(L, a,b,c, drop-odd:S; see decoding.switching.parse_layers)")
    p.add_argument("--switch-tokens", type=int, default=64)
    p.add_argument("--switch-thresholds", default="0.3,1.0;0.7,2.0",
                   help="semicolon list of LO,HI pairs (nats)")
    p.add_argument("--moe-tokens", default="1,32", help="comma list of T for the MoE rows")
    p.add_argument("--moe-min-time", type=float, default=0.3)
    p.add_argument("--sections", default="bon,switch,moe")
    p.add_argument("--quick", action="store_true", help="one prompt, small sizes (smoke test)")
    p.add_argument("--out", default=None)
    p.add_argument("--no-write", action="store_true")
    return p


def _cmd(args, extra: str) -> str:
    return f"python bench/run.py best_of_n --threads {args.threads} {extra}".strip()


def _chat_ids(model, prompt: str) -> List[int]:
    tk = model.tokenizer
    return tk.encode(tk.apply_chat_template(prompt))


def bench_bon(model, args, prompts) -> list:
    from ..decoding.best_of_n import best_of_n, regex_answer
    from ..models import generate

    rows = []
    extract = regex_answer(ANSWER_REGEX)
    for pi, prompt in enumerate(prompts):
        ids = _chat_ids(model, prompt)
        for n in (int(v) for v in args.n.split(",")):
            kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
            t = time.perf_counter()
            indep = [generate(model, model.tokenizer, ids, seed=args.seed + i, **kw) for i in range(n)]
            t_ind = time.perf_counter() - t
            ind_tokens = sum(len(r.tokens) for r in indep)
            modes = [("independent", None, t_ind, ind_tokens, None)]
            for mode, opts in (("batched", dict(prefix_shared=True)), ("batched-plain", dict(prefix_shared=False)),
                               ("adaptive", dict(prefix_shared=True, answer_fn=extract, prune_every=8))):
                r = best_of_n(model, model.tokenizer, ids, n=n, seed=args.seed, **kw, **opts)
                same = sum(s["tokens"] == g.tokens for s, g in zip(r.samples, indep)) / n
                modes.append((mode, r, r.total_s, r.sample_tokens, same))
            for mode, r, secs, ntok, same in modes:
                setting = ""
                if r is not None and mode == "adaptive":
                    setting = (f"pruned {r.pruned}, early stop {r.stopped_early}, votes {r.votes}, "
                               f"answer {r.answer!r}")
                rows.append({
                    "section": "bon", "mode": mode, "setting": setting, "N": n, "prompt": pi,
                    "sample_tokens": ntok, "seconds": secs, "tokens_per_s": ntok / secs,
                    "speedup": t_ind / secs, "agree": same,
                    "command": _cmd(args, f"--sections bon --n {n} --max-new-tokens {args.max_new_tokens}"),
                })
                print(f"bon p{pi} N={n} {mode:>14}: {ntok:4d} tokens {secs:6.2f} s  {ntok / secs:6.1f} tok/s  "
                      f"x{t_ind / secs:.2f}" + (f"  same tokens {same:.2f}" if same is not None else "")
                      + (f"  [{setting}]" if setting else ""), flush=True)
    return rows


def bench_switch(model, args, prompts) -> list:
    from ..decoding.switching import make_cheap_variant, parse_layers, switch_generate
    from ..models import generate

    rows = []
    pairs = [tuple(float(v) for v in s.split(",")) for s in args.switch_thresholds.split(";") if s]
    n = args.switch_tokens
    variants = []
    for spec in (v for v in args.switch_variants.split(";") if v):
        t = time.perf_counter()
        if spec.startswith("int"):
            cheap = make_cheap_variant(model, bits=int(spec[3:]))
        else:
            cheap = make_cheap_variant(model, bits=None, layers=parse_layers(spec, len(model.layers)))
        print(f"switch: variant {spec} ({len(cheap.layers)} blocks) built in {time.perf_counter() - t:.1f} s",
              flush=True)
        variants.append((spec, cheap))
    for pi, prompt in enumerate(prompts):
        ids = _chat_ids(model, prompt)
        full = generate(model, model.tokenizer, ids, max_new_tokens=n, stop_at_eos=False)
        agree = lambda toks: sum(a == b for a, b in zip(toks, full.tokens)) / len(full.tokens)  # noqa: E731
        base = full.decode_tokens_per_s
        entries = [("full", "stored Q4_1, 30 blocks", base, 1.0, 0.0)]
        for spec, cheap in variants:
            only = generate(cheap, model.tokenizer, ids, max_new_tokens=n, stop_at_eos=False)
            entries.append(("cheap", spec, only.decode_tokens_per_s, agree(only.tokens), 1.0))
            for lo, hi in pairs:
                r = switch_generate(model, cheap, model.tokenizer, ids, max_new_tokens=n, lo=lo, hi=hi,
                                    stop_at_eos=False)
                entries.append(("switch", f"{spec} lo={lo} hi={hi} ({r.switches} switches, {r.catchup_tokens} "
                                "catch-up)", r.decode_tokens_per_s, agree(r.tokens), r.cheap_fraction))
        for mode, setting, tps, ag, frac in entries:
            rows.append({"section": "switch", "mode": mode, "setting": setting, "prompt": pi, "sample_tokens": n,
                         "tokens_per_s": tps, "speedup": tps / base, "agree": ag, "cheap_frac": frac,
                         "command": _cmd(args, f"--sections switch --switch-variants '{args.switch_variants}' "
                                               f"--switch-tokens {n}")})
            print(f"switch p{pi} {mode:>6} {setting:48} {tps:6.1f} tok/s x{tps / base:.2f} agree {ag:.2f} "
                  f"cheap {frac:.2f}", flush=True)
    return rows


def bench_moe(args) -> list:
    from ..moe import NullExpertMoE
    from ..ops.moe import moe_route
    from . import timer

    H, F, E, NN, K = 576, 1536, 8, 8, 2
    if args.quick:
        H, F = 64, 128
    g = torch.Generator().manual_seed(0)
    router = torch.randn(E + NN, H, generator=g) * 0.05
    wg, wu = torch.randn(E, F, H, generator=g) * 0.05, torch.randn(E, F, H, generator=g) * 0.05
    wd = torch.randn(E, H, F, generator=g) * 0.05
    m = NullExpertMoE.from_float(router, wg, wu, wd, num_null=NN, top_k=K, fmt="int4", group_size=64)
    dense_gu = [torch.cat([wg[e], wu[e]], 0) for e in range(E)]

    def torch_moe(x, routing):  # what a user writes: a loop over dense fp32 experts
        ids, offs, rw, tid, rows_ = routing
        y = torch.zeros_like(x)
        for e in range(E):
            sel = (tid == e).nonzero()
            if sel.numel() == 0:
                continue
            t_idx = sel[:, 0]
            h = torch.nn.functional.linear(x[t_idx], dense_gu[e])
            a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
            y.index_add_(0, t_idx, torch.nn.functional.linear(a, wd[e]) * rw[rows_[sel[:, 0], sel[:, 1]].long()][:, None])
        return y

    rows = []
    for T in (int(v) for v in args.moe_tokens.split(",")):
        x = torch.randn(T * 8, H, generator=g)  # 8 token sets, rotated
        base_us = None
        xs = [x[i * T:(i + 1) * T] for i in range(8)]

        def routed(xx, b):  # a router bias on the null experts sets the null fraction
            logits = xx @ m.router.T
            logits[:, E:] += b
            return moe_route(logits, K, NN)

        def null_frac(b):
            return float(torch.cat([(routed(xx, b)[4] < 0).float().reshape(-1) for xx in xs]).mean())

        for target in (0.0, 0.25, 0.5, 0.75, 1.0):
            lo_b, hi_b = -30.0, 30.0  # bisection on the bias for the target null fraction
            for _ in range(30):
                mid = (lo_b + hi_b) / 2
                lo_b, hi_b = (mid, hi_b) if null_frac(mid) < target else (lo_b, mid)
            bias = hi_b if target > 0 else -30.0
            routings = [routed(xx, bias) for xx in xs]
            null = null_frac(bias)
            inputs = list(zip(xs, routings))
            t_ours = timer.time_fn(lambda xx, rr: m(xx, rr), inputs, min_time_s=args.moe_min_time)
            t_torch = timer.time_fn(lambda xx, rr: torch_moe(xx, rr), inputs, min_time_s=args.moe_min_time)
            if base_us is None:
                base_us = t_ours.median_us
            for mode, t in (("NullExpertMoE int4", t_ours), ("torch loop fp32", t_torch)):
                rows.append({"section": "moe", "mode": mode, "setting": f"H {H} F {F} E {E}+{NN} null top-{K}",
                             "N": T, "null_frac": null, "median_us": t.median_us,
                             "speedup": (base_us / t.median_us) if mode.startswith("Null") else
                             t.median_us / t_ours.median_us,
                             "command": _cmd(args, f"--sections moe --moe-tokens {T}")})
            print(f"moe T={T:3d} null {null:.2f}: ours {t_ours.median_us:9.1f} us (x{base_us / t_ours.median_us:.2f} "
                  f"vs 0% null)  torch fp32 loop {t_torch.median_us:9.1f} us", flush=True)
    return rows


def run(args: argparse.Namespace) -> dict:
    from ..models import load

    torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    prompts = PROMPTS[:1 if args.quick else max(1, args.prompts)]
    if args.quick:
        args.n, args.max_new_tokens, args.switch_tokens = "2", min(args.max_new_tokens, 6), min(args.switch_tokens, 8)
        args.moe_tokens, args.moe_min_time = "1", min(args.moe_min_time, 0.01)
        args.switch_thresholds = args.switch_thresholds.split(";")[0]
        args.switch_variants = args.switch_variants.split(";")[0]
    rows = []
    model = None
    if sections & {"bon", "switch"}:
        model = load(args.model, threads=args.threads, max_ctx=1024)
        generate_warm = model.tokenizer.encode("Hello")
        model.prefill(generate_warm)  # warm-up (first-call allocations)
    if "bon" in sections:
        rows += bench_bon(model, args, prompts)
    if "switch" in sections:
        rows += bench_switch(model, args, prompts)
    if "moe" in sections:
        rows += bench_moe(args)
    paths, png = None, None
    if not args.no_write:
        dev = torch.device("cpu")
        meta = {"command": results.command_line("best_of_n", getattr(args, "argv", [])), **results.environment(dev),
                "notes": ["bon speedup = independent seconds / mode seconds (same seeds, same run)",
                          "switch speedup = decode tok/s / full model decode tok/s (same run)",
                          "moe speedup: ours = time at 0% null / time; torch = torch time / ours"]}
        paths = results.write_results("best_of_n", rows, COLUMNS, out_root=args.out, device=dev, meta=meta)
        png = _plot(rows, paths[0].parent / "best_of_n")
        print("wrote", *paths, *png)
    return {"rows": rows, "paths": paths, "png": png}


def _plot(rows, stem):
    """PNG plots where a trade-off shows: switching speed vs agreement; MoE time vs null share."""
    from .plot import scatter_png

    out = []
    sw = [r for r in rows if r["section"] == "switch" and r["mode"] != "full"]
    if sw:
        series = {}
        for r in sw:  # one series per cheap variant and mode, points over prompts and thresholds
            series.setdefault(f"{r['mode']} {r['setting'].split()[0]}", []).append((r["agree"], r["speedup"]))
        series = {k: sorted(v) for k, v in series.items()}
        out.append(scatter_png(f"{stem}-switch.png", series, "greedy agreement with the full model",
                               "decode speed-up vs full", title="entropy switching: speed vs agreement",
                               baseline=(1.0, 1.0)))
    moe = [r for r in rows if r["section"] == "moe"]
    if moe:
        series = {}
        for r in moe:
            series.setdefault(f"{r['mode']} T={r['N']}", []).append((r["null_frac"], r["median_us"]))
        series = {k: sorted(v) for k, v in series.items()}
        out.append(scatter_png(f"{stem}-moe.png", series, "fraction of choices routed to null experts",
                               "median us", title="NullExpertMoE: time vs null-routed fraction"))
    return out
