from .pixelcnn import GatedPixelCNN  # noqa: F401
from .sampling import per_sample_seeds, sample_naive  # noqa: F401
from .vqvae import VQVAE, Decoder, Encoder, ResidualStack  # noqa: F401
from .quantizer import QuantizerOutput, VectorQuantizer  # noqa: F401
from .forward import chi2, convolve_psf  # noqa: F401
