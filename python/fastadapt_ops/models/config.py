"""ModelConfig: the decoder's hyper-parameters, read from a GGUF file's metadata."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES"]

# GGUF ``general.architecture`` values this runner executes.
SUPPORTED_ARCHITECTURES = ("llama",)


@dataclasses.dataclass
class ModelConfig:
    arch: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[str] = None  # None | "linear"
    rope_scale: float = 1.0  # linear scaling factor (positions are divided by it)
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    context_length: int = 2048
    chat_template: Optional[str] = None
    name: str = ""

    @property
    def n_groups(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if d.get("chat_template"):
            d["chat_template"] = d["chat_template"][:80] + "..."
        return d

    @classmethod
    def from_gguf_fields(cls, fields: Dict[str, Any], *, vocab_fallback: Optional[int] = None,
                         tie_embeddings: bool = True) -> "ModelConfig":
        """Build from a dict of GGUF metadata (``key -> python value``)."""
        arch = fields.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"fastadapt_ops.models: unsupported architecture {arch!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

        def get(key, default=None, required=False):
            full = f"{arch}.{key}"
            if full in fields:
                return fields[full]
            if required:
                raise ValueError(f"fastadapt_ops.models: GGUF metadata lacks {full!r}")
            return default

        hidden = int(get("embedding_length", required=True))
        n_heads = int(get("attention.head_count", required=True))
        n_kv = int(get("attention.head_count_kv", n_heads))
        head_dim = int(get("attention.key_length", hidden // n_heads))
        rope_dim = int(get("rope.dimension_count", head_dim))
        if rope_dim != head_dim:
            raise ValueError(f"fastadapt_ops.models: partial RoPE (rope.dimension_count={rope_dim}, "
                             f"head_dim={head_dim}) is not supported")
        if n_heads % n_kv:
            raise ValueError(f"fastadapt_ops.models: head_count {n_heads} is not a multiple of "
                             f"head_count_kv {n_kv}")
        scaling = get("rope.scaling.type")
        scale = 1.0
        if scaling in (None, "none"):
            scaling = None
        elif scaling == "linear":
            scale = float(get("rope.scaling.factor", 1.0))
        else:
            raise ValueError(f"fastadapt_ops.models: unsupported rope scaling type {scaling!r} "
                             "(supported: none, linear)")
        vocab = get("vocab_size")
        if vocab is None:
            tokens = fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if tokens is not None else vocab_fallback
        if vocab is None:
            raise ValueError("fastadapt_ops.models: cannot determine the vocabulary size")

        def opt_int(k):
            v = fields.get(k)
            return None if v is None else int(v)

        return cls(
            arch=arch,
            n_layers=int(get("block_count", required=True)),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn=int(get("feed_forward_length", required=True)),
            vocab=int(vocab),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rope_scale=scale,
            rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings=tie_embeddings,
            bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
            eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
            context_length=int(get("context_length", 2048)),
            chat_template=fields.get("tokenizer.chat_template"),
            name=str(fields.get("general.name", "")),
        )
