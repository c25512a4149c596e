"""Models: the Llama architecture (`llama`), the BERT encoder (`bert`), GGUF and Hugging Face folder loading
(`gguf`, `hf`), tokenizers and the named-model zoo.

`efficient.models.load(name_or_path)` is the entry point (see `zoo.load`): a name of `KNOWN_MODELS`
('smollm2-135m', 'all-minilm-l6-v2', 'tiny', 'small'), a `.gguf` file or a Hugging Face folder. It is resolved
lazily so that `import efficient.models` stays cheap: no jax/flax import, no download, until a model is asked for.
"""
_ZOO_EXPORTS = ("load", "LoadedModel", "LoadedEncoder", "KNOWN_MODELS", "ChecksumError", "cache_dir")

__all__ = list(_ZOO_EXPORTS)


def __getattr__(name):
  if name in _ZOO_EXPORTS:
    from efficient.models import zoo
    return getattr(zoo, name)
  raise AttributeError(f"module 'efficient.models' has no attribute {name!r}")
