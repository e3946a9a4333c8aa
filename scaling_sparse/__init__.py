"""scaling-sparse: sparse Scaling Transformers and the Terraformer decoder in JAX/Flax NNX."""

__version__ = "0.1.0"
