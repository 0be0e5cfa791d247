from setuptools import find_packages, setup

setup(
    name="pmf-fast",
    version="0.1.0",
    description="Fast PyTorch trainer for Pixel MeanFlow (pMF), one-step latent-free image generation",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # One installed name, pmf_fast: kernels/ (top level in the repository) installs as pmf_fast.kernels,
    # since `kernels` is also a PyPI package (Hugging Face's kernel hub). train.py and sample.py are the
    # repository's entry scripts (`torchrun train.py`), not installed modules.
    packages=find_packages(include=["pmf_fast", "pmf_fast.*"]) + ["pmf_fast.kernels"],
    package_dir={"pmf_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "scipy",
        "pillow",
        "tqdm",
        "scikit-learn",      # the embedded digits dataset and its judge
        "lpips",             # LPIPS-VGG perceptual loss (VGG16 trunk weights from a local file)
        "timm",              # ConvNeXt-V2 perceptual loss
        "safetensors",
        "torch-fidelity",    # Inception-v3 (2015-12-05 graph) port and FID / IS / precision-recall
    ],
    extras_require={
        # transformers: the ConvNeXt-V2 key-map test; tensorboard: optional logging, tested when present; ruff: lint
        "dev": ["pytest", "pytest-benchmark", "transformers", "tensorboard", "ruff==0.17.6"],
        "tensorboard": ["tensorboard"],
        "dali": ["nvidia-dali-cuda120"],
    },
)
