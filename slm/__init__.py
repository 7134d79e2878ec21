"""slm: speech+text language models with parallel generation, in JAX."""

from slm.errors import SlmError

__version__ = "0.1.0"
__all__ = ["SlmError", "__version__"]
