import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
# torch reads CUDA_HOME at import; the nvcc on PATH here is a wrapper that misleads its guess
if "CUDA_HOME" not in os.environ and os.path.isfile("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # nothing to query without a GPU
# the venv's tools (ninja) for the extension build, even when its bin/ is not on PATH
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

import pytest  # noqa: E402
import torch  # noqa: E402
from open_clip.transformer import VisionTransformer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# small open_clip ViTs: (name, constructor kwargs)
SMALL_CONFIGS = {
    "w64h4p8": dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=48),
    "w96h6p4": dict(image_size=24, patch_size=4, width=96, layers=3, heads=6, mlp_ratio=4.0, output_dim=80),
    "layerscale": dict(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=2.0, output_dim=40,
                       ls_init_value=0.5),
    "meanpool": dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=48,
                     pool_type="avg", final_ln_after_pool=True),
    "custom_attn": dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=48,
                        qk_norm=True, scale_heads=True, scale_fc=True),
}


def randomize(visual: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every bias, norm and layer scale non-trivial values so no term of the math hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in visual.named_parameters():
            if name.endswith("bias") or "ln" in name or "gamma" in name or "head_scale" in name:
                base = 1.0 if ("weight" in name or "gamma" in name or "head_scale" in name) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return visual.eval()


def small_visual(name: str = "w64h4p8", seed: int = 0, dtype=torch.float32) -> VisionTransformer:
    torch.manual_seed(seed)
    v = VisionTransformer(**SMALL_CONFIGS[name])
    return randomize(v, seed).to(dtype)


def images_for(visual, n: int, seed: int = 0, dtype=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    h, w = visual.image_size
    dtype = dtype or next(visual.parameters()).dtype
    return torch.randn(n, 3, h, w, generator=g).to(dtype)


@pytest.fixture(scope="session")
def small():
    return small_visual()


@pytest.fixture(scope="session")
def calib(small):
    return images_for(small, 96, seed=1)


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory):
    """A small random HF CLIP saved as a local folder: ``hf:PATH --pretrained`` loads it offline."""
    import transformers as tf

    path = tmp_path_factory.mktemp("models") / "tiny-clip"
    torch.manual_seed(0)
    cfg = tf.CLIPConfig(text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, max_position_embeddings=77, vocab_size=49408),
                        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=16),
                        projection_dim=32)
    tf.CLIPModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fitted():
    """A small ViT and its head + MLP bases; one per test module (tests may change the model's flags)."""
    from residual_fast import fit_bases

    v = small_visual("w64h4p8")
    return v, fit_bases(v, [images_for(v, 64, seed=1)], units=("head", "mlp"), progress=False)
