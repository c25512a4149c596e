"""The attention core and the token mixers (see the README's "Design" section).

- `core`: the `AttentionFn` contract, masks (causal, window, segment ids / padding), GQA logits, RoPE,
  reference softmax attention, `MixerSpec` (what a mixer needs of its model).
- `softmax_attention_fn` (kernel-backed default: flash attention where queries and keys are the same tokens,
  the positional reference otherwise), `flash_attention_fn` (flash only), `Attention` (q/k/v/o + RoPE + a KV
  cache behind `efficient.attention.cache`'s interface), `WindowAttention`.
- `cache`: one KV-cache interface (`update_and_attend`) with storage codecs behind it ('float' here; 'int8' and
  'int4' registered by `efficient.quant.kv_cache`).
- `mixers`: the registry `kind -> Mixer(make, init_cache, state_bytes)`: softmax, window, linear, based.
- `LinearAttention`, `Based`: linear-attention mixers; `FNetMixer`: FFT mixing, non-causal (encoder use only).
"""
from efficient.attention import cache, core, mixers
from efficient.attention.based import Based, BasedConfig, causal_depthwise_conv
from efficient.attention.core import (EMPTY_POSITION, AttentionFn, MixerSpec, attention_mask, rope,
                                      softmax_attention)
from efficient.attention.flash import flash_attention_fn
from efficient.attention.fnet import FNetMixer, fnet_mixing
from efficient.attention.linear import LinearAttention, LinearAttentionConfig
from efficient.attention.paged import PagedKV
from efficient.attention.mixers import (Mixer, every_kth_softmax, layer_state_bytes, mixer_kinds,
                                        register_mixer)
from efficient.attention.softmax import (Attention, WindowAttention, reference_attention_fn,
                                         softmax_attention_fn)

__all__ = ["EMPTY_POSITION", "Attention", "AttentionFn", "Based", "BasedConfig", "FNetMixer", "LinearAttention",
           "LinearAttentionConfig", "Mixer", "MixerSpec", "WindowAttention", "attention_mask", "cache",
           "causal_depthwise_conv", "core", "every_kth_softmax", "flash_attention_fn", "fnet_mixing",
           "layer_state_bytes", "mixer_kinds", "mixers", "reference_attention_fn", "register_mixer", "rope",
           "softmax_attention", "softmax_attention_fn"]
