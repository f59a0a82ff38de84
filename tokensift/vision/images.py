"""Real images that ship inside installed wheels, and ViT preprocessing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokensift.errors import TokensiftError

IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_PHOTOS = {
    "skimage": ["data/astronaut.png", "data/chelsea.png", "data/coffee.png", "data/rocket.jpg",
                "data/motorcycle_left.png", "data/hubble_deep_field.jpg", "data/retina.jpg",
                "data/ihc.png", "data/camera.png", "data/coins.png", "data/grass.png",
                "data/gravel.png", "data/brick.png", "data/moon.png", "data/page.png"],
    "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
    "matplotlib": ["mpl-data/sample_data/grace_hopper.jpg"],
}


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def photo_paths() -> list[Path]:
    """Paths of the real photos shipped in scikit-image, scikit-learn and matplotlib."""
    paths = []
    for package, files in _PHOTOS.items():
        root = _package_dir(package)
        if root is not None:
            paths += [root / f for f in files if (root / f).exists()]
    if not paths:
        raise TokensiftError("no sample photos found: install scikit-image (see requirements-vision.txt)")
    return paths


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with a one-line error when it cannot be read."""
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as exc:
        raise TokensiftError(f"cannot read image {path}: {exc}; give a PNG or JPEG file") from None


def to_pixels(image: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Resize the short side to ``size``, center-crop, normalize: ``[3, size, size]`` float32."""
    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def photos(size: int = IMAGE_SIZE) -> tuple[list[str], torch.Tensor]:
    """Names and a ``[n, 3, size, size]`` batch of the shipped photos."""
    paths = photo_paths()
    return [p.stem for p in paths], torch.stack([to_pixels(load_image(p), size) for p in paths])


def digits(n_per_class: int | None = None, size: int = IMAGE_SIZE, seed: int = 0):
    """scikit-learn's labelled 8x8 digits, upscaled to RGB ViT inputs: ``(pixels, labels)``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    idx = np.arange(len(data.target))
    if n_per_class is not None:
        rng = np.random.default_rng(seed)
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(data.target == c))[:n_per_class] for c in range(10)]))
    pixels = []
    for i in idx:
        gray = (data.images[i] / 16.0 * 255).astype(np.uint8)
        pixels.append(to_pixels(Image.fromarray(gray).convert("RGB"), size))
    return torch.stack(pixels), torch.from_numpy(data.target[idx])
