"""suti: subject-driven text-to-image generation by apprenticeship learning (JAX/Flax)."""
import setuptools

# Pins are bounded ranges that were installed and tested together on CPU (see README).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "jaxlib>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "etils[epath]>=1.15,<2",  # paths on local disks and buckets (evaluate's checkpoint mtimes)
    "ml-collections>=1.1,<1.2",
    "tensorflow-datasets>=4.9.10,<4.10",
    "importlib_resources>=6",
    "grain>=0.2.18,<0.3",
    "array-record>=0.8.6,<0.9",
    "msgpack>=1",
    "transformers>=4.57.6,<5",
    "pillow>=10",
    "numpy>=1.26,<3",
    "absl-py>=2",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
]

setuptools.setup(
    name="suti",
    version="0.1.0",
    description="SuTI: subject-driven text-to-image generation via apprenticeship learning, in JAX/Flax.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["suti", "suti.*", "experts", "experts.*",
                                               "apprentice", "apprentice.*"]),
    # The shipped models of the embedded world (suti/assets/NAME/: asset.json, and a base's
    # checkpoint or a world CLIP's / DINO's Hugging Face files).
    package_data={"suti": ["assets/*/*", "assets/*/*/*", "assets/*/*/*/*",
                           "assets/*/*/*/*/*", "assets/*/*/*/*/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3.5"]},
)
