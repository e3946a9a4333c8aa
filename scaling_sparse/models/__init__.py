"""The models, one file each, and `build_model`, which picks one by config.model.arch:
  decoder_lm.py          DecoderLM: the decoder-only LM (model.arch="decoder")
  encdec.py              EncoderDecoderLM: the paper's encoder-decoder (model.arch="encdec")
  terraformer_encdec.py  TerraformerEncDecLM: the reversible Terraformer enc-dec (encdec + model.reversible)
Dense and sparse share all three: the config picks each layer's variant through layers/factory.py."""

from __future__ import annotations

from flax import nnx

from scaling_sparse.config import ModelConfig
from scaling_sparse.models.decoder_lm import DecoderLM
from scaling_sparse.models.encdec import EncoderDecoderLM
from scaling_sparse.models.terraformer_encdec import TerraformerEncDecLM
from scaling_sparse.quantize import quantize_model

__all__ = ["DecoderLM", "EncoderDecoderLM", "TerraformerEncDecLM", "build_model"]


def build_model(m, *, rngs: nnx.Rngs) -> nnx.Module:
    """The model of a config.model / ModelConfig (model.arch, model.reversible; model.weights="int8": its
    weights quantised, quantize.py)."""
    m = ModelConfig.from_config(m)
    if m.arch == "encdec" and m.reversible:
        model = TerraformerEncDecLM(m, rngs=rngs)
    elif m.arch == "encdec":
        model = EncoderDecoderLM(m, rngs=rngs)
    else:
        model = DecoderLM(m, rngs=rngs)
    return quantize_model(model) if m.weights == "int8" else model
