"""multimodal-moe: Hugging Face-native multimodal Mixture-of-Experts models.

`import multimodal_moe` registers every config, model and processor of the package with the transformers Auto
classes (the same happens on `import multimodal_moe.modeling`).
"""

__version__ = "0.1.0"

from . import modeling  # noqa: F401  (registers the Auto classes)
