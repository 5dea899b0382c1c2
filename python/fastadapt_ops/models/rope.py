"""RoPE tables for :func:`fastadapt_ops.ops.rope`: ``cos_sin [max_pos, head_dim]`` float32, row
``p`` = ``cos(p * f_i)`` for the ``head_dim / 2`` frequencies, then ``sin(p * f_i)``.

Frequencies ``f_i = theta ** (-2i / head_dim)``, computed in float64 (angles too; only the table
is rounded to float32), with the scalings Llama-family checkpoints use:

- ``None``: plain RoPE;
- ``"linear"``: positions divided by ``factor`` (position interpolation);
- ``"llama3"``: Llama-3.1's frequency bands: wavelengths above ``original_context /
  low_freq_factor`` are slowed by ``factor``, those below ``original_context / high_freq_factor``
  are kept, and the band between is interpolated smoothly (as HF transformers' ``llama3`` init).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["rope_inv_freq", "rope_cos_sin", "rope_cos_sin_for", "ROPE_SCALINGS"]

ROPE_SCALINGS = (None, "linear", "llama3")


def _scaling_name(scaling: Optional[str]) -> Optional[str]:
    if scaling in (None, "none", "default"):
        return None
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"fastadapt_ops.models: unsupported rope scaling {scaling!r} "
                         "(supported: none, linear, llama3)")
    return scaling


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[str] = None, factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_context: int = 8192) -> torch.Tensor:
    """Angle per position of each rotated pair: ``[head_dim // 2]`` float64 (the effective
    inverse frequencies: for ``"linear"`` they include the ``1 / factor``)."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"fastadapt_ops.models: rope head_dim must be even and positive, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"fastadapt_ops.models: rope theta must be positive, got {theta}")
    scaling = _scaling_name(scaling)
    inv = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv
    if not factor > 0:
        raise ValueError(f"fastadapt_ops.models: rope scaling factor must be positive, got {factor}")
    if scaling == "linear":
        return inv / factor
    # llama3
    if not high_freq_factor > low_freq_factor > 0 or original_context <= 0:
        raise ValueError("fastadapt_ops.models: llama3 rope scaling needs high_freq_factor > "
                         f"low_freq_factor > 0 and original_context > 0, got {high_freq_factor}, "
                         f"{low_freq_factor}, {original_context}")
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)  # long waves slowed
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(head_dim: int, max_pos: int, theta: float, scaling: Optional[str] = None,
                 factor: float = 1.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                 original_context: int = 8192) -> torch.Tensor:
    """The table ``[max_pos, head_dim]`` float32 that :func:`fastadapt_ops.ops.rope` reads."""
    if max_pos <= 0:
        raise ValueError(f"fastadapt_ops.models: rope max_pos must be positive, got {max_pos}")
    scaling = _scaling_name(scaling)
    pos = torch.arange(max_pos, dtype=torch.float64)
    if scaling == "linear":  # position interpolation: positions / factor, base frequencies
        if not factor > 0:
            raise ValueError(f"fastadapt_ops.models: rope scaling factor must be positive, got {factor}")
        inv = rope_inv_freq(head_dim, theta)
        pos = pos / factor
    else:
        inv = rope_inv_freq(head_dim, theta, scaling, factor, low_freq_factor, high_freq_factor,
                            original_context)
    ang = torch.outer(pos, inv)  # [max_pos, head_dim / 2]
    return torch.cat([ang.cos(), ang.sin()], -1).to(torch.float32).contiguous()


def rope_cos_sin_for(config, max_pos: int) -> torch.Tensor:
    """:func:`rope_cos_sin` for a :class:`~fastadapt_ops.models.config.ModelConfig` (``rope_theta``,
    ``rope_scaling``, ``rope_scale`` as the factor, and the llama3 band fields when present)."""
    return rope_cos_sin(
        config.head_dim, max_pos, config.rope_theta, config.rope_scaling,
        factor=float(getattr(config, "rope_scale", 1.0)),
        low_freq_factor=float(getattr(config, "rope_low_freq_factor", 1.0)),
        high_freq_factor=float(getattr(config, "rope_high_freq_factor", 4.0)),
        original_context=int(getattr(config, "rope_original_context", 8192)),
    )
