"""Installs cm_jax: few-step generative models (consistency models and friends) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="cm_jax",
    version="0.1.0",
    description="Consistency models and few-step distillation on an EDM teacher, in JAX/Flax Linen.",
    packages=find_packages(include=["cm_jax", "cm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6,<0.11",
        "flax>=0.10.4,<0.13",
        "optax>=0.2.4,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "tensorflow-datasets>=4.9.7,<5",
        # Grain + array_record read TFDS data without TensorFlow at training time.
        "grain>=0.2.10,<0.3",
        "array_record>=0.7,<0.9",
        "ml-collections>=1.0,<2",
        "numpy>=1.26,<3",
        # The embedded default data set (8x8 digits) ships with scikit-learn.
        "scikit-learn>=1.4,<2",
        # PNG grids and image-folder data.
        "pillow>=10,<14",
        # Progress bars on training, sampling and evaluation.
        "tqdm>=4.66,<5",
        # FID's matrix square root (scipy.linalg.sqrtm, as the reference evaluators use).
        "scipy>=1.11,<2",
        # Stable Diffusion folders: CLIP's BPE tokenizer (transformers' CLIPTokenizer, backed
        # by the tokenizers library; no torch) and the .safetensors weights, read with
        # safetensors' numpy API. Writing our own BPE or safetensors reader would only
        # re-implement what these maintained libraries do.
        "transformers>=4.46,<6",
        "safetensors>=0.4,<1",
    ],
    extras_require={
        # Import of released PyTorch checkpoints, export to safetensors / diffusers,
        # and the one-off Inception / LPIPS weight converters.
        # peft: diffusers' load_lora_weights needs it (LoRA files; the LoRA parity test).
        "interop": ["torch>=2.1,<3", "diffusers>=0.27,<1", "safetensors>=0.4,<1",
                    "peft>=0.13,<1"],
        # The interop tests compare against torch and diffusers, so tests need them too.
        # pytest-xdist: the suite runs on 2 workers (-n 2), so two XLA compilations, which
        # dominate its time on 2 cores, run at once (about 30% less wall time).
        # filelock: session fixtures built once and shared by the xdist workers.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4", "filelock>=3.12,<5",
                 "torch>=2.1,<3", "diffusers>=0.27,<1", "safetensors>=0.4,<1",
                 # diffusers' load_lora_weights needs peft (the LoRA parity test).
                 "peft>=0.13,<1"],
    },
)
