"""kvpress side of ``bench kv_quality``, run in a Python that has kvpress (it pins
transformers < 5.3, so it usually lives in its own venv). Standalone: imports no fastadapt_ops.

stdin: one JSON job ``{gguf, context, continuation, budgets, greedy, threads}`` (token ids);
stdout (last line): ``{version, transformers, full: {...}, rows: [{press, budget, ...}]}``.
Protocol as in kv_quality: compress at prefill of the context (the press's hook), then the
continuation's logits with the compressed cache, then a greedy continuation from the context.
KV bytes are the cache tensors' bytes (presses that mask keys instead of dropping them hold
the full size).
"""
import json
import math
import os
import sys
import time


def main() -> None:
    job = json.loads(sys.stdin.read())
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.utils import logging as hf_logging

    import kvpress

    hf_logging.set_verbosity_error()
    torch.set_num_threads(int(job.get("threads") or torch.get_num_threads()))
    path = job["gguf"]
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 dtype=torch.float32, attn_implementation="eager").eval()
    ctx = torch.tensor([job["context"]])
    cont = job["continuation"]
    n_ctx = ctx.shape[1]
    n_greedy = int(job["greedy"])

    def cache_bytes(cache) -> int:
        total = 0
        for layer in getattr(cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total

    def prefill(press):
        """The context through the model, compressed by ``press`` (its hook acts at prefill)."""
        cache = DynamicCache()
        if press is None:
            return cache, model(ctx, past_key_values=cache, use_cache=True)
        with press(model):
            return cache, model(ctx, past_key_values=cache, use_cache=True)

    @torch.inference_mode()
    def protocol(press):
        t0 = time.perf_counter()
        cache, out = prefill(press)
        peak = cache_bytes(cache)
        logits = [out.logits[0, -1:]]
        for c in range(0, len(cont) - 1, 32):
            piece = cont[c:min(c + 32, len(cont) - 1)]
            # logical positions, as kvpress's own pipeline passes them: after compression the
            # cache is shorter than the text, and HF would otherwise derive RoPE positions from it
            o = model(torch.tensor([piece]), past_key_values=cache, use_cache=True,
                      position_ids=torch.arange(n_ctx + c, n_ctx + c + len(piece))[None])
            logits.append(o.logits[0])
            peak = max(peak, cache_bytes(cache))
        lp = torch.log_softmax(torch.cat(logits).double(), -1)
        nll = -float(lp.gather(1, torch.tensor(cont)[:, None]).sum())
        end = cache_bytes(cache)
        cache, out = prefill(press)
        greedy = []
        tok = out.logits[0, -1].argmax()
        for i in range(n_greedy):
            greedy.append(int(tok))
            out = model(tok.view(1, 1), past_key_values=cache, use_cache=True,
                        position_ids=torch.tensor([[n_ctx + i]]))
            tok = out.logits[0, -1].argmax()
        return {"ppl": math.exp(nll / len(cont)), "preds": lp.argmax(-1).tolist(), "greedy": greedy,
                "kv_bytes_end": end, "kv_bytes_peak": peak, "seconds": time.perf_counter() - t0}

    presses = {
        "StreamingLLMPress": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "SnapKVPress": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "TOVAPress": lambda r: kvpress.TOVAPress(compression_ratio=r),
        "KnormPress": lambda r: kvpress.KnormPress(compression_ratio=r),
        "ObservedAttentionPress": lambda r: kvpress.ObservedAttentionPress(compression_ratio=r),
        "AdaSnapKVPress": lambda r: kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=r)),
    }
    from importlib.metadata import version

    result = {"version": version("kvpress"), "transformers": transformers.__version__,
              "full": protocol(None), "rows": []}
    for name, make in presses.items():
        for b in job["budgets"]:
            try:
                r = protocol(make(1.0 - float(b)))
            except Exception as e:  # noqa: BLE001  (a press that does not run here is reported)
                result.setdefault("failed", []).append(f"{name} @ {b}: {type(e).__name__}: {e}")
                continue
            result["rows"].append({"press": name, "budget": b, **r})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
