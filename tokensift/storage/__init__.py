"""Storage variants of the selecting layer: compact between forwards, expanded during one.

- :mod:`tokensift.storage.compact` — the base: pack after each forward, unpack on update.
- :mod:`tokensift.storage.varlen` — per-head variable lengths (AdaKV).
- :mod:`tokensift.storage.quantized` — mixed-precision packed integers (ZipCache).
"""
