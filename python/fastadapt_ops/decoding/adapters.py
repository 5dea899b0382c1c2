"""Exit adapters: a small head per exit layer mapping its hidden state toward the final layer's.

Each adapter is RMSNorm (no weight) + one linear map ``H -> H`` (+ bias), fitted in closed form
by ridge regression of the final layer's normalised hidden state on the exit layer's, over the
hidden states of a text (by default Python standard-library source, which every machine has).
One forward pass collects the states; the solve is an ``H x H`` system per exit layer, so a
fit takes seconds to a minute on two cores, not the hours of Sorted-LLaMA / LayerSkip training.
The final RMSNorm and the LM head read the adapter's output unchanged (``ExitHead``).

Saved beside the model (``<model file>.exit-adapters.pt``) or anywhere with ``save(path)``;
``ExitAdapters.load(path)`` checks the hidden size and layer count.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence

import torch

__all__ = ["ExitAdapters", "fit_exit_adapters", "default_path", "stdlib_text"]


def default_path(model) -> str:
    """``<model file>.exit-adapters.pt`` when the model's directory is writable, else under
    ``~/.cache/fastadapt``."""
    path = getattr(model, "path", None)
    if path:
        base = path.rstrip("/")
        if os.access(os.path.dirname(base) or ".", os.W_OK):
            return base + ".exit-adapters.pt"
        name = os.path.basename(base)
    else:
        name = (model.config.name or "model").replace("/", "_")
    return os.path.join(os.path.expanduser("~/.cache/fastadapt"), name + ".exit-adapters.pt")


def stdlib_text(max_chars: int = 60000, modules: Sequence[str] = ("textwrap", "argparse", "json.decoder",
                                                                   "functools", "shutil")) -> str:
    """Python standard-library source text (distillation and calibration data)."""
    import importlib
    import inspect

    parts, n = [], 0
    for name in modules:
        try:
            src = inspect.getsource(importlib.import_module(name))
        except (OSError, TypeError, ImportError):
            continue
        parts.append(src)
        n += len(src)
        if n >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


class _Adapter:
    __slots__ = ("w", "b", "eps")

    def __init__(self, w: torch.Tensor, b: torch.Tensor, eps: float):
        self.w, self.b, self.eps = w.contiguous(), b.contiguous(), eps

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        hn = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.addmm(self.b, hn, self.w)


class ExitAdapters:
    """Per-exit-layer adapters: ``adapters.get(layer)`` is a callable ``[T, H] -> [T, H]`` (or None)."""

    def __init__(self, weights: Dict[int, "tuple[torch.Tensor, torch.Tensor]"], hidden: int, n_layers: int,
                 eps: float = 1e-6, meta: Optional[dict] = None):
        self.hidden, self.n_layers, self.eps = int(hidden), int(n_layers), float(eps)
        self.meta = dict(meta or {})
        self._a = {}
        for li, (w, b) in weights.items():
            if tuple(w.shape) != (hidden, hidden) or tuple(b.shape) != (hidden,):
                raise ValueError(f"ExitAdapters: layer {li} weight must be [{hidden}, {hidden}] and bias "
                                 f"[{hidden}], got {tuple(w.shape)} and {tuple(b.shape)}")
            if not 0 < int(li) < n_layers:
                raise ValueError(f"ExitAdapters: exit layer {li} must be in [1, {n_layers})")
            self._a[int(li)] = _Adapter(w.float(), b.float(), eps)

    @property
    def layers(self) -> List[int]:
        return sorted(self._a)

    def get(self, layer: int):
        return self._a.get(int(layer))

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({"format": "fastadapt-exit-adapters-1", "hidden": self.hidden, "n_layers": self.n_layers,
                    "eps": self.eps, "meta": self.meta,
                    "layers": {li: (a.w, a.b) for li, a in self._a.items()}}, path)
        return path

    @classmethod
    def load(cls, path: str, model=None) -> "ExitAdapters":
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != "fastadapt-exit-adapters-1":
            raise ValueError(f"ExitAdapters.load: {path} is not an exit-adapter file")
        a = cls(d["layers"], d["hidden"], d["n_layers"], d["eps"], d.get("meta"))
        if model is not None and (a.hidden != model.config.hidden or a.n_layers != model.config.n_layers):
            raise ValueError(f"ExitAdapters.load: {path} was fitted for hidden {a.hidden} / {a.n_layers} layers; "
                             f"the model has {model.config.hidden} / {model.config.n_layers}")
        return a


@torch.inference_mode()
def collect_hidden(model, ids: Sequence[int], layers: Iterable[int], ctx: int = 256,
                   max_tokens: int = 4096) -> Dict[int, torch.Tensor]:
    """Hidden states ``[N, H]`` after each of ``layers`` (layer count done; ``n_layers`` = final),
    teacher-forced over ``ids`` in windows of ``ctx`` tokens."""
    layers = sorted(set(int(l) for l in layers))
    n = model.config.n_layers
    out: Dict[int, List[torch.Tensor]] = {l: [] for l in layers}
    ids = list(ids)[:max_tokens]
    for s in range(0, len(ids), ctx):
        w = torch.as_tensor(ids[s:s + ctx], dtype=torch.long)
        model.reset()
        x, delta = model._embed(w), None
        pos = torch.arange(w.numel())
        for li in range(n):
            x, delta = model.layer(li, x, delta, pos)
            if li + 1 in out:
                out[li + 1].append((x + delta).float().clone())
        model.pos = w.numel()
    model.reset()
    return {l: torch.cat(v) for l, v in out.items()}


@torch.inference_mode()
def fit_exit_adapters(model, layers: Sequence[int], text=None, max_tokens: int = 4096,
                      ctx: int = 256, ridge: float = 1e-3, path: Optional[str] = None) -> ExitAdapters:
    """Fit one adapter per exit layer in ``layers`` on ``text`` (a string, or token ids; default:
    stdlib source) and save
    it (``path``, default :func:`default_path`; ``path=""`` skips saving)."""
    n, H = model.config.n_layers, model.config.hidden
    layers = sorted(set(int(l) for l in layers))
    if not layers or any(not 0 < l < n for l in layers):
        raise ValueError(f"fit_exit_adapters: exit layers must be in [1, {n}), got {layers}")
    text = stdlib_text() if text is None else text
    ids = model.tokenizer.encode(text) if isinstance(text, str) else [int(i) for i in text]
    hs = collect_hidden(model, ids, layers + [n], ctx=ctx, max_tokens=max_tokens)
    eps = model.config.rms_eps
    rn = lambda h: (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).double()  # noqa: E731
    y = rn(hs[n])
    weights = {}
    for l in layers:
        x = rn(hs[l])
        xm, ym = x.mean(0), y.mean(0)
        xc, yc = x - xm, y - ym
        # ridge on centred data: (Xc^T Xc + lambda N I) W = Xc^T Yc; bias from the means
        a = xc.T @ xc + ridge * x.shape[0] * torch.eye(H, dtype=torch.float64)
        w = torch.linalg.solve(a, xc.T @ yc)
        weights[l] = (w.float(), (ym - xm @ w).float())
    ad = ExitAdapters(weights, H, n, eps, meta={"tokens": int(y.shape[0]), "ridge": ridge})
    if path != "":
        ad.save(path or default_path(model))
    return ad
