"""Shared test set-up. 8 fake CPU devices must be configured before jax initializes its backends."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
