"""MT30 offline data: per-task store (``store``), window samplers (``sampler``), chunk generator
(``generate``), synthetic stores (``synthetic``) and a benchmark (``python -m fmbpo_jax.data.bench``).

Names are re-exported lazily so that ``import fmbpo_jax.data`` imports neither JAX nor dm_control.
"""

_EXPORTS = {
    "Store": "store", "StoreError": "store", "StoreWriter": "store", "open_store": "store",
    "DeviceSampler": "sampler", "HostSampler": "sampler", "WindowData": "sampler", "load_device_data": "sampler",
    "make_sampler": "sampler", "sample_windows": "sampler", "sample_chunk": "sampler", "select_episodes": "sampler",
    "REFERENCE_CAPACITY_STEPS": "sampler",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
