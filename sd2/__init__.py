"""sd2: make and measure draft models for speculative decoding (SD², arXiv 2504.08838)."""

__version__ = "0.1.0"
