"""tokensift: decide which tokens matter during transformer inference, training-free."""

from tokensift.errors import TokensiftError

__version__ = "0.1.0"

__all__ = ["TokensiftError", "__version__"]
