"""Models of the accuracy zoo that a ``timm:NAME`` spec with ``model_kwargs`` cannot express.

timm's MLP-Mixer variants fix ``patch_size`` in their registered functions (passing it again is
a ``TypeError``), so a Mixer with 8-pixel patches for 32 px images is built from timm's own
``MlpMixer`` class here and named as a file spec: ``benchmarks/zoo_models.py:mixer_32px``.
"""

from timm.models.mlp_mixer import MlpMixer


def mixer_32px(num_classes: int = 10) -> MlpMixer:
    """timm's MLP-Mixer for 32 px images: 8 px patches (16 tokens), 6 blocks, width 256."""
    return MlpMixer(num_classes=num_classes, img_size=32, patch_size=8, num_blocks=6, embed_dim=256)
