"""Load an HF model directory: ``config.json``, ``*.safetensors`` weights, ``tokenizer.json``.

    is_hf_dir(path) -> bool
    read_safetensors(path) -> {name: torch.Tensor}               (F32 / F16 / BF16)
    read_hf_dir(path, quantize=None, group_size=128) -> HFContents
    load_hf(path, max_ctx=None, quantize=None, group_size=128) -> LlamaModel

Architectures: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` (q/k/v biases).
The safetensors format is parsed here (8-byte little-endian header length, a JSON header of
``name -> {dtype, shape, data_offsets}``, then the raw little-endian data), memory-mapped so a
tensor is read only when converted. Single files and sharded checkpoints
(``model.safetensors.index.json``) both work.

HF tensor names map onto the GGUF names :class:`LlamaModel` expects (``blk.{i}.attn_q.weight``...).
HF q/k rows are already in the rotate-half RoPE layout, so the model is built with
``qk_permuted=False`` (no GGUF row un-permutation).

``quantize="int4" | "int8"`` (or a GGUF block format ``"q4_0" | "q4_1" | "q8_0"``) quantizes the
seven block matrices of every layer once, tensor by tensor as they are read, with
:func:`fastadapt_ops.quant.quantize_weight`; norms, embeddings and the LM head stay float.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch

from ..quant import QuantizedWeight
from .config import ModelConfig

__all__ = ["HFContents", "is_hf_dir", "read_safetensors", "read_hf_dir", "load_hf", "hf_tensor_name",
           "quantize_block_matrices", "QUANTIZE_CHOICES"]

_P = "fastadapt_ops.models: "

# safetensors dtype -> (numpy dtype of the raw bytes, torch dtype after .view)
_ST_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
              "BF16": (np.int16, torch.bfloat16)}

#: quantize= values of the loaders: name -> quantize_weight keywords
QUANTIZE_CHOICES = {"int4": dict(bits=4), "int8": dict(bits=8), "q4_0": dict(fmt="q4_0"),
                    "q4_1": dict(fmt="q4_1"), "q8_0": dict(fmt="q8_0")}

_BLOCK_MATRIX = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")

_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_MAP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")  # buffers some old checkpoints saved


def hf_tensor_name(name: str) -> Optional[str]:
    """The LlamaModel (GGUF-style) name of an HF tensor; None for an ignorable buffer.

    Raises ValueError for a tensor this runner would not use (silently dropping weights such as
    MLP biases would give wrong logits)."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    if _IGNORED_RE.search(name):
        return None
    raise ValueError(f"{_P}the checkpoint has tensor {name!r}, which this Llama-family runner does not use")


# ---------------------------------------------------------------------------------------------
# safetensors
class _SafetensorsFile:
    """A memory-mapped safetensors file: ``header`` (name -> {dtype, shape, data_offsets})."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise ValueError(f"{_P}{path} is not a safetensors file (only {size} bytes)")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"{_P}{path} is not a safetensors file (header length {n}, file size {size})")
            raw = f.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{_P}{path} has a corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise ValueError(f"{_P}{path} has a corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.header: Dict[str, Dict[str, Any]] = header
        self.data_start = 8 + n
        self.data_len = size - self.data_start
        self._mm = np.memmap(path, dtype=np.uint8, mode="r") if size > self.data_start else np.zeros(0, np.uint8)

    def names(self) -> List[str]:
        return list(self.header)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype (a copy; the file stays mapped read-only)."""
        info = self.header[name]
        dt = info.get("dtype")
        if dt not in _ST_DTYPES:
            raise ValueError(f"{_P}tensor {name!r} in {os.path.basename(self.path)} has unsupported dtype "
                             f"{dt} (supported: {', '.join(_ST_DTYPES)})")
        np_dt, t_dt = _ST_DTYPES[dt]
        shape = tuple(int(s) for s in info.get("shape", ()))
        try:
            b0, b1 = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{_P}tensor {name!r} in {self.path} has no valid data_offsets") from None
        count = int(np.prod(shape, dtype=np.int64))
        if b1 - b0 != count * np.dtype(np_dt).itemsize or b0 < 0 or b1 > self.data_len:
            raise ValueError(f"{_P}tensor {name!r} in {self.path}: data_offsets [{b0}, {b1}) do not match "
                             f"shape {list(shape)} of {dt} within {self.data_len} data bytes (truncated file?)")
        arr = np.frombuffer(self._mm, dtype=np_dt, count=count, offset=self.data_start + b0)
        t = torch.from_numpy(arr.copy())
        if t_dt == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.reshape(shape)


def read_safetensors(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` file, in their stored dtypes (F32 / F16 / BF16)."""
    f = _SafetensorsFile(os.fspath(path))
    return {n: f.tensor(n) for n in f.names()}


# ---------------------------------------------------------------------------------------------
# directory
def is_hf_dir(path) -> bool:
    """A directory holding ``config.json`` (the weights are checked by :func:`weight_files`)."""
    p = os.fspath(path)
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, "config.json"))


def weight_files(path: str) -> Dict[str, Optional[List[str]]]:
    """``{shard file: [tensor names]}`` from the index, or every ``*.safetensors`` file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            wmap = json.load(f).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise ValueError(f"{_P}{index} has no weight_map")
        shards: Dict[str, List[str]] = {}
        for name, shard in wmap.items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not os.path.isfile(os.path.join(path, shard)):
                raise FileNotFoundError(f"{_P}shard {shard!r} listed in {index} is missing")
        return shards
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        others = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf")))
        hint = f" (found {others}; only safetensors weights are read from an HF directory)" if others else ""
        raise FileNotFoundError(f"{_P}{path} has config.json but no *.safetensors weights{hint}")
    return {f: None for f in files}  # None: every tensor of the file


def _read_config(path: str):
    """(config.json dict, ModelConfig)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{_P}{path} has no config.json (not an HF model directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{_P}{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{_P}{cfg_path} is not a JSON object")
    name = raw.get("_name_or_path") or os.path.basename(os.path.normpath(path))
    return raw, ModelConfig.from_hf_config(raw, name=name)


class HFContents:
    """``config`` (ModelConfig), ``tensors`` (LlamaModel names -> tensor / QuantizedWeight),
    ``tokenizer`` (Tokenizer or None), ``raw_config`` (the config.json dict)."""

    def __init__(self, path, config, tensors, tokenizer, raw_config):
        self.path = path
        self.config = config
        self.tensors = tensors
        self.tokenizer = tokenizer
        self.raw_config = raw_config


def _quantize_one(name: str, w: torch.Tensor, quantize: str, group_size) -> QuantizedWeight:
    from ..quant import quantize_weight

    try:
        return quantize_weight(w, group_size=group_size, **QUANTIZE_CHOICES[quantize])
    except ValueError as e:
        raise ValueError(f"{_P}cannot quantize {name!r} (shape {list(w.shape)}) to {quantize}: {e}") from None


def check_quantize(quantize, group_size) -> None:
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"{_P}quantize must be None or one of {', '.join(QUANTIZE_CHOICES)}; got {quantize!r}")


def quantize_block_matrices(tensors: Dict[str, Any], quantize: Optional[str], group_size=128) -> Dict[str, Any]:
    """Quantize the float block matrices (q k v o gate up down) of ``tensors`` in place; norms,
    embeddings, the LM head and already-quantized tensors are left as they are."""
    check_quantize(quantize, group_size)
    if quantize is None:
        return tensors
    for name in list(tensors):
        w = tensors[name]
        if _BLOCK_MATRIX.match(name) and isinstance(w, torch.Tensor):
            tensors[name] = _quantize_one(name, w.float(), quantize, group_size)
    return tensors


def read_hf_dir(path: Union[str, os.PathLike], quantize: Optional[str] = None, group_size=128,
                progress: Optional[Callable[[int, int, str], None]] = None,
                with_tokenizer: bool = True) -> HFContents:
    """Read config, weights (float32 torch tensors, or QuantizedWeight with ``quantize``) and
    tokenizer of an HF directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{_P}{path} is not a directory")
    check_quantize(quantize, group_size)
    raw, cfg = _read_config(path)
    shards = weight_files(path)
    jobs = []  # (file, hf name)
    for shard, names in shards.items():
        sf = _SafetensorsFile(os.path.join(path, shard))
        for n in (names if names is not None else sf.names()):
            if n not in sf.header:
                raise ValueError(f"{_P}tensor {n!r} listed in the index is missing from {shard}")
            jobs.append((sf, n))
    tensors: Dict[str, Any] = {}
    total = len(jobs)
    for i, (sf, hf_name) in enumerate(jobs):
        ours = hf_tensor_name(hf_name)
        if ours is not None and not (ours == "output.weight" and cfg.tie_embeddings):
            t = sf.tensor(hf_name).to(torch.float32)
            if quantize is not None and _BLOCK_MATRIX.match(ours):
                t = _quantize_one(ours, t, quantize, group_size)
            tensors[ours] = t
        if progress is not None:
            progress(i + 1, total, hf_name)
    required = [("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight")]
    for li in range(cfg.n_layers):
        required += [(f"model.layers.{li}.{k}", f"blk.{li}.{v}") for k, v in _LAYER_MAP.items()
                     if k.endswith(".weight")]
    for hf_name, ours in required:
        if ours not in tensors:
            raise ValueError(f"{_P}the checkpoint lacks tensor {hf_name!r}")
    if not cfg.tie_embeddings and "output.weight" not in tensors:
        raise ValueError(f"{_P}the checkpoint lacks tensor 'lm_head.weight' (config.json has "
                         "tie_word_embeddings=false)")
    tok = None
    if with_tokenizer:
        from .tokenizer import Tokenizer

        tok = Tokenizer.from_hf_dir(path, config=raw)
        if tok is not None:
            cfg.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else cfg.bos_token_id
            cfg.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else cfg.eos_token_id
            cfg.chat_template = tok.chat_template
    return HFContents(path, cfg, tensors, tok, raw)


def check_window(cfg: ModelConfig, max_ctx: int) -> None:
    """Sliding-window attention is not implemented: refuse a cache longer than the window."""
    w = cfg.sliding_window
    if w is not None and max_ctx > w:
        raise ValueError(f"{_P}{cfg.arch} uses sliding-window attention (window {w}), which this runner "
                         f"does not implement; max_ctx={max_ctx} exceeds the window, so tokens beyond it "
                         f"would attend differently: pass max_ctx <= {w}")


def read_hf_config(path) -> ModelConfig:
    """The ModelConfig of an HF directory's config.json (no weights read)."""
    return _read_config(os.fspath(path))[1]


def load_hf(path, max_ctx: Optional[int] = None, quantize: Optional[str] = None, group_size=128,
            progress=None, dtype: torch.dtype = torch.float32,
            check_config: Optional[Callable[[ModelConfig], None]] = None):
    """An HF directory as a :class:`LlamaModel` (``.tokenizer``, ``.config``, ``.path``).

    The config is checked (architecture, RoPE, sliding window against ``max_ctx``, and
    ``check_config(cfg)`` when given) before any weight is read."""
    from .llama import LlamaModel

    cfg = read_hf_config(path)
    ctx = int(max_ctx or min(cfg.context_length, 4096))
    check_window(cfg, ctx)
    if check_config is not None:
        check_config(cfg)
    h = read_hf_dir(path, quantize=quantize, group_size=group_size, progress=progress)
    model = LlamaModel(h.config, h.tensors, tokenizer=h.tokenizer, max_ctx=ctx, dtype=dtype, qk_permuted=False)
    model.path = os.fspath(path)
    return model
