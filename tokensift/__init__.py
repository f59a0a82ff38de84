"""tokensift: decide which tokens matter during transformer inference, training-free.

The main entry points are importable from the package (loaded lazily, so ``import tokensift``
stays cheap): ``load_model``, ``build_policy``, ``make_cache``, ``apply`` (a context manager
around ``model.generate``) and ``TokensiftPipeline`` (the ``"tokensift-generation"`` pipeline,
registered when ``tokensift.integration`` is imported). (``tokensift.generate`` is the module;
its function is ``tokensift.generate.generate``.)
"""

from importlib import import_module

from tokensift.errors import TokensiftError

__version__ = "0.1.0"

_LAZY = {
    "load_model": "tokensift.models",
    "build_policy": "tokensift.policies",
    "make_cache": "tokensift.engine",
    "apply": "tokensift.integration",
    "TokensiftPipeline": "tokensift.integration",
}

__all__ = ["TokensiftError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokensift' has no attribute {name!r}")
