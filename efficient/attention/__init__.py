"""Attention functions and token-mixer modules for the models (see DESIGN.md, "efficient/attention").

- `flash_attention_fn`, `softmax_attention_fn`: `AttentionFn`s for `llama.Attention` (flash kernels; reference
  softmax with an optional sliding window).
- `WindowAttention`, `LinearAttention`, `Based`: token mixers with `llama.Attention`'s call signature and
  decoding caches; chosen per layer by `LlamaConfig.attention` / `attention_schedule` (`every_kth_softmax`).
- `FNetMixer`: FFT mixing, non-causal (encoder use only).
"""
from efficient.attention.based import Based, BasedConfig, causal_depthwise_conv
from efficient.attention.flash import flash_attention_fn
from efficient.attention.fnet import FNetMixer, fnet_mixing
from efficient.attention.linear import LinearAttention, LinearAttentionConfig
from efficient.attention.mixers import every_kth_softmax, layer_state_bytes
from efficient.attention.softmax import WindowAttention, softmax_attention_fn

__all__ = ["Based", "BasedConfig", "FNetMixer", "LinearAttention", "LinearAttentionConfig", "WindowAttention",
           "causal_depthwise_conv", "every_kth_softmax", "flash_attention_fn", "fnet_mixing", "layer_state_bytes",
           "softmax_attention_fn"]
