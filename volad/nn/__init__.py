"""Network blocks written once for any ``spatial_dims`` (MONAI layer factories)."""

from volad.nn.autoencoder import ConvDecoder, ConvEncoder

__all__ = ["ConvDecoder", "ConvEncoder"]
