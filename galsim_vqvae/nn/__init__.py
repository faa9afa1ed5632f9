from .pixelcnn import GatedPixelCNN  # noqa: F401
from .sampling import per_sample_seeds, sample_naive  # noqa: F401
