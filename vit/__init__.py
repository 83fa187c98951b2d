"""vit: a Vision Transformer image classifier, and the same encoder on text tokens."""

from vit.attention import Attention
from vit.embed import PatchEmbed, TokenEmbed
from vit.encoder import Block, Encoder
from vit.model import VARIANTS, EncoderConfig, ImageClassifier, TextClassifier, TokenClassifier

__all__ = [
    "Attention", "Block", "Encoder", "EncoderConfig", "ImageClassifier", "PatchEmbed",
    "TextClassifier", "TokenClassifier", "TokenEmbed", "VARIANTS",
]
