"""Block-sparse prefill for the model runner, and the offline per-head pattern search.

Config (JSON)::

    {"version": 1, "block": 64, "min_len": 2048, "target_recall": 0.95, "tuned_tokens": 8192,
     "model": "...", "layers": [[{"pattern": "vertical_slash", "n_vertical": 256, "n_slash": 64,
                                  "recall": 0.97, "cost": 0.06}, ... one per q head], ... per layer]}

Patterns and budgets are those of :func:`fastadapt_ops.attention.block_sparse.build_head_layout`
(budgets as counts: blocks for ``a_shape``/``block_topk``, keys for ``vertical_slash``).

Runner: :func:`enable_sparse_prefill` sets ``model.prefill_attention``; a prefill of one sequence
that starts at position 0 with at least ``min_len`` tokens then estimates every head's layout
from its Q/K (the dynamic patterns) and runs ``fastadapt::block_sparse_attention``; K/V still go to
the paged cache, so decoding is unchanged. Shorter prompts, continuations, batches and runs with
a KV eviction policy (which reads attention scores of the dense kernel) use the dense path.

Search (:func:`tune_sparse`, ``fastadapt tune-sparse``): one dense prefill of a text with a hook
that, per layer, takes the softmax rows of a sample of query blocks (64 x T_k at a time, never
T x T) and measures for every candidate pattern/budget the attention mass it keeps (recall);
each head gets the cheapest candidate whose mean recall reaches the target, else dense.
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Optional, Sequence

import torch

from ..ops.block_sparse import BLOCK, block_pool_scores, vertical_slash_scores
from .block_sparse import (
    a_shape_block_mask,
    block_topk_mask,
    build_head_layout,
    vertical_slash_extras,
)

__all__ = ["SparsePrefill", "enable_sparse_prefill", "disable_sparse_prefill", "uniform_config",
           "load_config", "save_config", "tune_sparse", "recall_table", "select_config", "CANDIDATES",
           "add_sparse_prefill_args", "apply_sparse_prefill", "add_tune_sparse_subcommand"]

# candidate patterns of the search, cheapest first within a pattern
CANDIDATES: List[dict] = (
    [{"pattern": "a_shape", "sink": 1, "local": n} for n in (1, 2, 4, 8, 16, 32)]
    + [{"pattern": "block_topk", "topk": n} for n in (2, 4, 8, 12, 16, 24, 32, 48)]
    + [{"pattern": "vertical_slash", "n_vertical": v, "n_slash": s}
       for v, s in ((64, 16), (128, 32), (256, 64), (512, 128), (1024, 256), (2048, 512))]
)
DIAG_COST = 2.0  # a diagonal key costs about two blocked keys (gathered, one per query)


def head_cost(cfg: dict, T: int) -> float:
    """Keys per query a head computes at prompt length T, as a fraction of dense causal (T / 2)."""
    dense = (T + 1) / 2
    p = cfg["pattern"]
    if p == "a_shape":
        keys = (cfg.get("sink", 1) + cfg.get("local", 4)) * BLOCK
    elif p == "block_topk":
        keys = cfg.get("topk", 8) * BLOCK
    elif p == "vertical_slash":
        keys = 2 * BLOCK + cfg.get("n_vertical", 256) + DIAG_COST * cfg.get("n_slash", 256)
    else:
        keys = dense
    return min(1.0, keys / dense)


def uniform_config(n_layers: int, n_heads: int, head: dict, min_len: int = 2048) -> dict:
    """One pattern for every head of every layer."""
    return {"version": 1, "block": BLOCK, "min_len": int(min_len),
            "layers": [[dict(head) for _ in range(n_heads)] for _ in range(n_layers)]}


def load_config(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("block", BLOCK) != BLOCK or "layers" not in cfg:
        raise ValueError(f"{path}: not a sparse-prefill config (needs 'layers' and block {BLOCK})")
    return cfg


def save_config(cfg: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)


class SparsePrefill:
    """``model.prefill_attention`` hook running the config's per-head sparse layouts."""

    def __init__(self, config: dict, min_len: Optional[int] = None):
        self.config = config
        self.min_len = int(config.get("min_len", 2048) if min_len is None else min_len)
        self.calls = 0  # layers run sparse (for tests and reports)
        self.density_sum = 0.0

    def __call__(self, model, li, q, k, v, positions, seqs):
        T = q.shape[0]
        if len(seqs) != 1 or T < self.min_len or model.kv_policy is not None or int(positions[0]) != 0:
            return None
        layers = self.config["layers"]
        if li >= len(layers) or len(layers[li]) != q.shape[1]:
            raise ValueError(f"sparse prefill config has no entry for layer {li} with {q.shape[1]} heads")
        layout = build_head_layout(q, k, layers[li]).to(q.device)
        out, _ = layout.run(q, k, v, q.shape[-1] ** -0.5)
        self.calls += 1
        return out


def enable_sparse_prefill(model, config, min_len: Optional[int] = None) -> SparsePrefill:
    """Use ``config`` (a dict or a JSON path) for the model's long prefills; returns the hook."""
    cfg = load_config(config) if isinstance(config, str) else config
    c = model.config
    if len(cfg["layers"]) != c.n_layers or any(len(h) != c.n_heads for h in cfg["layers"]):
        raise ValueError(f"sparse prefill config is for {len(cfg['layers'])} layers; the model has "
                         f"{c.n_layers} layers x {c.n_heads} heads")
    hook = SparsePrefill(cfg, min_len)
    model.prefill_attention = hook
    return hook


def disable_sparse_prefill(model) -> None:
    model.prefill_attention = None


# ---- pattern search ----------------------------------------------------------------------------

def _sample_blocks(nqb: int, n: int) -> List[int]:
    if nqb <= n:
        return list(range(nqb))
    return sorted({int(round(x)) for x in torch.linspace(0, nqb - 1, n).tolist()})


class _Recall:
    """Per-layer hook: candidates' recall of the attention mass per q head (returns None: dense)."""

    def __init__(self, candidates: Sequence[dict], sample_blocks: int):
        self.candidates = list(candidates)
        self.sample_blocks = sample_blocks
        self.recall: Dict[int, torch.Tensor] = {}  # layer -> [H, n_candidates]

    def __call__(self, model, li, q, k, v, positions, seqs):
        if len(seqs) != 1 or int(positions[0]) != 0:
            return None
        self.recall[li] = self.layer_recall(q, k)
        return None

    @torch.no_grad()
    def layer_recall(self, q, k):
        """[H, n_candidates] mean attention mass each candidate keeps, over sampled query blocks.
        Batched over heads and candidates (few large tensor ops: the search also runs on busy
        machines, where every small threaded op waits for its threads)."""
        T, H, D = q.shape
        Tk, Hkv = k.shape[0], k.shape[1]
        G = H // Hkv
        scale = D ** -0.5
        nqb, nkb = -(-T // BLOCK), -(-Tk // BLOCK)
        rows = _sample_blocks(nqb, self.sample_blocks)
        cands = self.candidates
        vert = slash = pooled = None
        if any(c["pattern"] == "vertical_slash" for c in cands):
            vert, slash = (t.float().cpu() for t in vertical_slash_scores(q, k))
        if any(c["pattern"] == "block_topk" for c in cands):
            pooled = block_pool_scores(q, k).cpu()
        blk_idx, blk_masks, vs_idx, vs_extras = [], [], [], []
        for ci, c in enumerate(cands):
            if c["pattern"] == "a_shape":
                blk_idx.append(ci)
                blk_masks.append(a_shape_block_mask(T, Tk, c["sink"], c["local"])[None].expand(H, -1, -1))
            elif c["pattern"] == "block_topk":
                blk_idx.append(ci)
                blk_masks.append(block_topk_mask(pooled, [c["topk"]] * H, T, Tk))
            elif c["pattern"] == "vertical_slash":
                cols, diags = vertical_slash_extras(vert, slash, [c["n_vertical"]] * H, [c["n_slash"]] * H)
                vs_idx.append(ci)
                vs_extras.append((torch.stack(cols).long(), torch.stack(diags).long()))
        bm = torch.stack(blk_masks).float() if blk_masks else None  # [Cb, H, nqb, nkb]
        local = a_shape_block_mask(T, Tk, 0, 2)  # the vertical-slash blocks [nqb, nkb]
        rec = torch.zeros(H, len(cands), dtype=torch.float64)
        nq = 0
        kx = k.float().repeat_interleave(G, 1).permute(1, 2, 0)  # [H, D, Tk]
        pad = nkb * BLOCK - Tk
        hh = torch.arange(H)[:, None]
        for r in rows:
            i0, i1 = r * BLOCK, min(T, (r + 1) * BLOCK)
            m = i1 - i0
            pos = torch.arange(Tk - T + i0, Tk - T + i1)
            logits = torch.bmm(q[i0:i1].float().transpose(0, 1), kx) * scale  # [H, m, Tk]
            logits.masked_fill_(torch.arange(Tk)[None, None, :] > pos[None, :, None], float("-inf"))
            P = torch.softmax(logits, -1)  # 64 rows of the attention at a time, never T x T
            if bm is not None:
                Pb = torch.nn.functional.pad(P, (0, pad)).view(H, m, nkb, BLOCK).sum(-1)  # [H, m, nkb]
                mass = torch.einsum("hmk,chk->chm", Pb, bm[:, :, r])  # [Cb, H, m]
                rec[:, blk_idx] += mass.clamp(max=1.0).sum(-1).T.double()
            if vs_idx:
                inblk = local[r]  # [nkb]
                Pl = torch.nn.functional.pad(P, (0, pad)).view(H, m, nkb, BLOCK)[:, :, inblk].sum((-1, -2))
                for ci, (cols, diags) in zip(vs_idx, vs_extras):
                    cv = ~inblk[cols // BLOCK]  # [H, nv] columns outside the local blocks
                    mc = (P.gather(2, cols[:, None, :].expand(H, m, -1)) * cv[:, None, :]).sum(-1)
                    if diags.shape[1]:
                        cset = torch.zeros(H, Tk, dtype=torch.bool)
                        cset[hh.expand_as(cols)[cv], cols[cv]] = True
                        keys = pos[None, :, None] - diags[:, None, :]  # [H, m, ns]
                        kc = keys.clamp(min=0)
                        ok = (keys >= 0) & ~inblk[kc // BLOCK] & ~cset.gather(1, kc.view(H, -1)).view_as(kc)
                        mc = mc + (P.gather(2, kc) * ok).sum(-1)
                    rec[:, ci] += (Pl + mc).clamp(max=1.0).sum(-1).double()
            nq += m
        return rec / max(nq, 1)


def recall_table(model, ids: Sequence[int], sample_blocks: int = 16,
                 candidates: Optional[Sequence[dict]] = None) -> dict:
    """One dense prefill of ``ids`` measuring every candidate's recall per (layer, head):
    ``{"recall": [n_layers] of [H, n_candidates] tensors, "candidates", "tokens", "seconds"}``."""
    ids = list(ids)[: model.max_ctx]
    hook = _Recall(candidates or CANDIDATES, sample_blocks)
    old = model.prefill_attention
    model.prefill_attention = hook
    t0 = time.perf_counter()
    try:
        model.prefill(ids)
    finally:
        model.prefill_attention = old
    return {"recall": [hook.recall[li] for li in range(model.config.n_layers)], "candidates": hook.candidates,
            "tokens": len(ids), "sample_blocks": sample_blocks, "seconds": time.perf_counter() - t0}


def select_config(table: dict, target_recall: float, min_len: int = 2048) -> dict:
    """Each head's cheapest candidate whose recall reaches ``target_recall`` (else dense)."""
    T = table["tokens"]
    layers, costs = [], []
    for rec in table["recall"]:
        heads = []
        for h in range(rec.shape[0]):
            best = {"pattern": "dense", "recall": 1.0, "cost": 1.0}
            for ci, cand in enumerate(table["candidates"]):
                cost = head_cost(cand, T)
                r = float(rec[h, ci])
                if r >= target_recall and cost < best["cost"] * 0.999:
                    best = {**cand, "recall": round(r, 4), "cost": round(cost, 4)}
            heads.append(best)
            costs.append(best["cost"])
        layers.append(heads)
    return {"version": 1, "block": BLOCK, "min_len": int(min_len), "target_recall": target_recall,
            "tuned_tokens": T, "sample_blocks": table["sample_blocks"], "mean_cost": sum(costs) / len(costs),
            "seconds": round(table["seconds"], 1), "layers": layers}


def tune_sparse(model, ids: Sequence[int], target_recall: float = 0.95, sample_blocks: int = 16,
                candidates: Optional[Sequence[dict]] = None, min_len: int = 2048) -> dict:
    """Per-head pattern search on one text (token ids, prefilled densely once)."""
    return select_config(recall_table(model, ids, sample_blocks, candidates), target_recall, min_len)


# ---- CLI ----------------------------------------------------------------------------------------

def add_sparse_prefill_args(parser) -> None:
    parser.add_argument("--sparse-prefill", default=None, metavar="CFG",
                        help="JSON config from `fastadapt tune-sparse`: block-sparse attention for long prefills")
    parser.add_argument("--sparse-min-len", type=int, default=None,
                        help="prompt length from which the sparse prefill is used (default: the config's)")


def apply_sparse_prefill(model, args) -> None:
    if getattr(args, "sparse_prefill", None):
        enable_sparse_prefill(model, args.sparse_prefill, getattr(args, "sparse_min_len", None))


def cmd_tune_sparse(args) -> int:
    from ..models import load

    if args.threads:
        torch.set_num_threads(int(args.threads))
    model = load(args.model, threads=args.threads, max_ctx=max(args.tokens, 16))
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    ids = model.tokenizer.encode(text)[: args.tokens]
    if len(ids) < 2 * BLOCK:
        raise SystemExit(f"fastadapt tune-sparse: {args.file} has only {len(ids)} tokens")
    cfg = tune_sparse(model, ids, args.target_recall, args.sample_blocks, min_len=args.min_len)
    cfg["model"] = args.model
    cfg["file"] = args.file
    save_config(cfg, args.out)
    pats: Dict[str, int] = {}
    for layer in cfg["layers"]:
        for h in layer:
            pats[h["pattern"]] = pats.get(h["pattern"], 0) + 1
    print(json.dumps({"out": args.out, "tokens": len(ids), "mean_cost": round(cfg["mean_cost"], 4),
                      "patterns": pats, "seconds": cfg["seconds"]}))
    return 0


def add_tune_sparse_subcommand(subparsers) -> None:
    t = subparsers.add_parser("tune-sparse", help="per-head sparse prefill pattern search -> JSON config")
    t.add_argument("--model", default="smollm2")
    t.add_argument("--file", required=True, help="text to tune on (long: several thousand tokens)")
    t.add_argument("--out", required=True, help="JSON config to write")
    t.add_argument("--tokens", type=int, default=8192, help="tokens of the file to use")
    t.add_argument("--target-recall", type=float, default=0.95,
                   help="attention mass each head's pattern must keep (mean over sampled queries)")
    t.add_argument("--sample-blocks", type=int, default=16, help="query blocks of 64 sampled per layer")
    t.add_argument("--min-len", type=int, default=2048, help="prompt length from which the config applies")
    t.add_argument("--threads", type=int, default=None)
    t.set_defaults(func=cmd_tune_sparse)
