"""pmf-fast: a PyTorch trainer for Pixel MeanFlow (pMF, arXiv 2601.22158)."""
