"""Attention functions and modules for the models (see DESIGN.md, "efficient/attention")."""
from efficient.attention.flash import flash_attention_fn

__all__ = ["flash_attention_fn"]
