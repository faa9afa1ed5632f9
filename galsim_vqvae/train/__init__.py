"""Training loops: the VQ-VAE through PSF and noise layers, and the Gated PixelCNN prior."""
