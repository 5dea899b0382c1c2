"""Tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata (gpt2-style byte-level BPE), or
from an HF directory's ``tokenizer.json`` + ``tokenizer_config.json``.

Built on the HF ``tokenizers`` library: a BPE model over the file's vocabulary and merges, a
byte-level pre-tokenizer and decoder, and the control tokens (``<|im_start|>``...) as special
tokens so they are matched whole in text. An HF ``tokenizer.json`` is used as it is.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Union

__all__ = ["Tokenizer"]

_CONTROL, _USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(self, backend, *, bos_token_id=None, eos_token_id=None, add_bos=False,
                 chat_template: Optional[str] = None, special_ids: Sequence[int] = ()):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template
        self.special_ids = set(int(i) for i in special_ids)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_gguf_metadata(cls, meta: Dict[str, Any]) -> "Tokenizer":
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"fastadapt_ops.models: unsupported tokenizer model {model!r} "
                             "(supported: gpt2-style byte-level BPE)")
        try:
            from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        except ImportError as e:
            raise ImportError("fastadapt_ops.models.Tokenizer needs the tokenizers package: "
                              "pip install tokenizers") from e
        tokens: List[str] = list(meta["tokenizer.ggml.tokens"])
        merges_raw = meta.get("tokenizer.ggml.merges") or []
        merges = []
        for m in merges_raw:
            a, _, b = m.partition(" ")
            merges.append((a, b))
        types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        tk = HFTokenizer(bpe)
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        special = [i for i, ty in enumerate(types) if ty in (_CONTROL, _USER_DEFINED)]
        if special:
            tk.add_special_tokens([AddedToken(tokens[i], special=(types[i] == _CONTROL), normalized=False)
                                   for i in special])
        opt = lambda k: None if meta.get(k) is None else int(meta[k])  # noqa: E731
        return cls(tk, bos_token_id=opt("tokenizer.ggml.bos_token_id"),
                   eos_token_id=opt("tokenizer.ggml.eos_token_id"),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                   chat_template=meta.get("tokenizer.chat_template"), special_ids=special)

    @classmethod
    def from_hf_dir(cls, path: str, config: Optional[Dict[str, Any]] = None) -> Optional["Tokenizer"]:
        """From ``tokenizer.json`` (required; None when absent) and ``tokenizer_config.json``
        (bos/eos tokens, ``add_bos_token``, ``chat_template``; also ``chat_template.jinja``).
        ``config``: the model's config.json dict, for bos/eos ids the tokenizer files lack."""
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            return None
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as e:
            raise ImportError("fastadapt_ops.models.Tokenizer needs the tokenizers package: "
                              "pip install tokenizers") from e
        tk = HFTokenizer.from_file(tj)
        tc: Dict[str, Any] = {}
        tcp = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(tcp):
            with open(tcp, encoding="utf-8") as f:
                tc = json.load(f)
        config = config or {}

        def token_id(key):
            t = tc.get(key)
            if isinstance(t, dict):
                t = t.get("content")
            tid = tk.token_to_id(t) if isinstance(t, str) else None
            if tid is None:  # fall back to the model config's id (the first of a list)
                v = config.get(key + "_id")
                if isinstance(v, (list, tuple)):
                    v = v[0] if v else None
                tid = None if v is None else int(v)
            return tid

        bos, eos = token_id("bos_token"), token_id("eos_token")
        if "add_bos_token" in tc:
            add_bos = bool(tc["add_bos_token"])
        else:  # a post-processor that prepends bos (Llama 3 style): prepend it ourselves
            with_sp = tk.encode("a", add_special_tokens=True).ids
            add_bos = bos is not None and bool(with_sp) and with_sp[0] == bos and \
                tk.encode("a", add_special_tokens=False).ids[:1] != [bos]
        tmpl = tc.get("chat_template")
        if isinstance(tmpl, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
            tmpl = named.get("default") or next(iter(named.values()), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if not tmpl and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                tmpl = f.read()
        special = [i for i, t in tk.get_added_tokens_decoder().items() if t.special] \
            if hasattr(tk, "get_added_tokens_decoder") else []
        return cls(tk, bos_token_id=bos, eos_token_id=eos, add_bos=add_bos,
                   chat_template=tmpl if isinstance(tmpl, str) else None, special_ids=special)

    # ---- text <-> ids ---------------------------------------------------------------------
    def encode(self, text: str, add_bos: Optional[bool] = None) -> List[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- chat -----------------------------------------------------------------------------
    def apply_chat_template(self, messages: Union[str, List[Dict[str, str]]],
                            add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (a string is one user message).

        Renders the file's Jinja template when ``jinja2`` is installed, else ChatML
        (``<|im_start|>role\\n...<|im_end|>\\n``), the format of SmolLM2 and Qwen2.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self.chat_template:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                return env.from_string(self.chat_template).render(
                    messages=messages, add_generation_prompt=add_generation_prompt,
                    bos_token="", eos_token="")
            except ImportError:
                pass
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        if add_generation_prompt:
            out += "<|im_start|>assistant\n"
        return out
