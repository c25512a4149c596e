"""Parameter-efficient fine-tuning by path rules on any NNX model (see `efficient.peft.core`)."""
from efficient.peft.core import (ADAPTABLE_TYPES, AdaptedLinear, AdapterConfig, Geometry, add_adapters,
                                 adapter_state, adapters, count_adapter_parameters, geometry)
from efficient.nn import Adapter

__all__ = ["ADAPTABLE_TYPES", "Adapter", "AdaptedLinear", "AdapterConfig", "Geometry", "add_adapters",
           "adapter_state", "adapters", "count_adapter_parameters", "geometry"]
