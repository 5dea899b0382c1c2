"""ModelConfig: the decoder's hyper-parameters, read from a GGUF file's metadata or an HF
``config.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

__all__ = ["ModelConfig", "SUPPORTED_ARCHITECTURES", "HF_ARCHITECTURES", "ROPE_SCALINGS"]

# GGUF ``general.architecture`` values this runner executes.
SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# HF ``config.json`` ``architectures`` values this runner executes -> ModelConfig.arch
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}

# RoPE scaling types (HF ``rope_scaling.rope_type`` / GGUF ``rope.scaling.type``) this config holds
ROPE_SCALINGS = (None, "linear", "llama3")


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
    rope_scaling: Optional[str] = None  # None | "linear" | "llama3"
    rope_scale: float = 1.0  # scaling factor ("linear": positions are divided by it; "llama3": factor)
    rope_low_freq_factor: float = 1.0  # llama3 scaling: wavelengths above original_context / low are scaled
    rope_high_freq_factor: float = 4.0  # llama3 scaling: wavelengths below original_context / high are kept
    rope_original_context: int = 8192  # llama3 scaling: the pre-training context length
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    context_length: int = 2048
    chat_template: Optional[str] = None
    name: str = ""
    sliding_window: Optional[int] = None  # attention window (Mistral/Qwen2); not implemented: max_ctx must fit

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
        elif scaling in ("linear", "llama3"):
            scale = float(get("rope.scaling.factor", 1.0))
        else:
            raise ValueError(f"fastadapt_ops.models: unsupported rope scaling type {scaling!r} "
                             "(supported: none, linear, llama3)")
        rope_extra = {}
        for key, field, conv in (("rope.scaling.original_context_length", "rope_original_context", int),
                                 ("rope.scaling.low_freq_factor", "rope_low_freq_factor", float),
                                 ("rope.scaling.high_freq_factor", "rope_high_freq_factor", float)):
            v = get(key)
            if v is not None:
                rope_extra[field] = conv(v)
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
            **rope_extra,
        )

    @classmethod
    def from_hf_config(cls, cfg: Dict[str, Any], *, name: str = "") -> "ModelConfig":
        """Build from an HF ``config.json`` dict (Llama, Mistral, Qwen2 causal LMs).

        ``tie_embeddings`` comes from ``tie_word_embeddings``; bos/eos from the config (the first
        of an eos list). The tokenizer files may override bos/eos (see ``hf_loader``).
        """
        archs = cfg.get("architectures") or []
        if isinstance(archs, str):
            archs = [archs]
        hf_arch = next((a for a in archs if a in HF_ARCHITECTURES), None)
        if hf_arch is None:
            shown = archs[0] if len(archs) == 1 else (archs or cfg.get("model_type"))
            raise ValueError(f"fastadapt_ops.models: unsupported architecture {shown!r} in config.json "
                             f"(supported: {', '.join(HF_ARCHITECTURES)})")
        arch = HF_ARCHITECTURES[hf_arch]
        qc = cfg.get("quantization_config")
        if qc:
            method = qc.get("quant_method") if isinstance(qc, dict) else qc
            raise ValueError(f"fastadapt_ops.models: pre-quantized HF checkpoints (quant_method {method!r}) are "
                             "not supported; load the float checkpoint (optionally with quantize=...)")

        def req(key):
            if cfg.get(key) is None:
                raise ValueError(f"fastadapt_ops.models: config.json lacks {key!r}")
            return cfg[key]

        hidden = int(req("hidden_size"))
        n_heads = int(req("num_attention_heads"))
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        if n_heads % n_kv:
            raise ValueError(f"fastadapt_ops.models: num_attention_heads {n_heads} is not a multiple of "
                             f"num_key_value_heads {n_kv}")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"fastadapt_ops.models: hidden_act {cfg.get('hidden_act')!r} is not supported "
                             "(supported: silu)")
        if cfg.get("mlp_bias"):
            raise ValueError("fastadapt_ops.models: mlp_bias=True is not supported")
        if cfg.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("fastadapt_ops.models: partial RoPE (partial_rotary_factor "
                             f"{cfg.get('partial_rotary_factor')}) is not supported")

        # RoPE: transformers < 5 writes rope_theta + rope_scaling, >= 5 one rope_parameters dict
        rp = cfg.get("rope_parameters")
        rs = cfg.get("rope_scaling")
        if rs is None and isinstance(rp, dict):
            rs = rp
        theta = cfg.get("rope_theta")
        if theta is None and isinstance(rp, dict):
            theta = rp.get("rope_theta")
        theta = float(theta if theta is not None else 10000.0)
        scaling, scale, rope_extra = None, 1.0, {}
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind in (None, "default"):
                kind = None
            if kind not in ROPE_SCALINGS:
                raise ValueError(f"fastadapt_ops.models: unsupported rope scaling type {kind!r} "
                                 "(supported: none/default, linear, llama3)")
            scaling = kind
            if kind is not None:
                scale = float(rs.get("factor", 1.0))
            if kind == "llama3":
                for key, field, conv in (("low_freq_factor", "rope_low_freq_factor", float),
                                         ("high_freq_factor", "rope_high_freq_factor", float),
                                         ("original_max_position_embeddings", "rope_original_context", int)):
                    if rs.get(key) is not None:
                        rope_extra[field] = conv(rs[key])

        # sliding window: Mistral sets sliding_window; Qwen2 only uses it with use_sliding_window
        window = cfg.get("sliding_window")
        if arch == "qwen2":  # per layer in transformers >= 5 (layer_types), else use_sliding_window
            types = cfg.get("layer_types")
            active = ("sliding_attention" in types) if isinstance(types, list) else cfg.get("use_sliding_window", False)
            if not active:
                window = None
        if arch == "llama":
            window = None

        def first(v):
            if isinstance(v, (list, tuple)):
                v = v[0] if v else None
            return None if v is None else int(v)

        return cls(
            arch=arch,
            n_layers=int(req("num_hidden_layers")),
            hidden=hidden,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ffn=int(req("intermediate_size")),
            vocab=int(req("vocab_size")),
            rope_theta=theta,
            rope_scaling=scaling,
            rope_scale=scale,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=first(cfg.get("bos_token_id")),
            eos_token_id=first(cfg.get("eos_token_id")),
            context_length=int(cfg.get("max_position_embeddings") or 2048),
            name=name or str(cfg.get("_name_or_path") or ""),
            sliding_window=None if window is None else int(window),
            **rope_extra,
        )
