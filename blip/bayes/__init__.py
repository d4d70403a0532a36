"""The BLIP core: noisy layers, noise context, inference network, KL, wrap(). Backbone-agnostic."""

from .inference import InferenceNet, kl_divergence
from .layers import NoisyLinear
from .noise import NoiseContext, NoiseState
from .wrap import wrap

__all__ = ["InferenceNet", "kl_divergence", "NoisyLinear", "NoiseContext", "NoiseState",
           "wrap"]
