"""MetaMAE: modality-agnostic self-supervised learning with a meta-learned masked auto-encoder."""
__version__ = "0.1.0"
