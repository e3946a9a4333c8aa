"""scaling-sparse: sparse Scaling Transformers and the Terraformer decoder in JAX/Flax NNX."""

from setuptools import find_packages, setup

# Ranges admit the newest releases and the GPU image (jax 0.11.2, flax 0.12.10, optax 0.2.8,
# orbax-checkpoint 0.12.4, Python 3.12).
CORE = [
    "jax>=0.5.0",
    "flax>=0.10.4",
    "optax>=0.2.4",
    "orbax-checkpoint>=0.11.0",
    "chex>=0.1.87",
    "ml-collections>=0.1.1",
    "absl-py>=1.4",
    "sentencepiece>=0.2.0",
    "numpy>=1.26",
    "tqdm>=4.60",
    "matplotlib>=3.7",
    "tensorboardX>=2.6",
]
# The C4 pipeline only: TensorFlow stays out of the model, decoding and training imports. Grain reads
# TFDS's ArrayRecord files by index (config.data.tfds_reader=grain).
C4 = ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9.4", "grain>=0.2.10", "array-record>=0.5"]
# pytest 9.2 keeps a test's id in Node._id, where pytest-xdist (3.8) does not put the xdist_group name, so
# `--dist loadgroup` scheduled every grouped test on its own (a model's sharded-equivalence subprocess ran
# once per worker that drew one of its tests). tests/conftest.py refuses to run in that state.
# TRIME: kNN-LM / TRIME_ext datastores (scaling_sparse/datastore.py) and BM25 batches (data/bm25_batches.py).
TRIME = ["faiss-cpu>=1.7.4", "bm25s>=0.2"]
# Work directories on Google Cloud Storage (gs://, scaling_sparse/storage.py): etils.epath and the workdir
# lease go through fsspec's gcsfs; orbax writes the checkpoints itself.
CLOUD = ["gcsfs>=2024.2"]
# importlib_resources: tfds's store_as_tfds_dataset (the tests' small ArrayRecord datasets) imports it.
# gcp-storage-emulator: the GCS server the object-store tests start on loopback (tests/gcs_server.py).
TEST = C4 + TRIME + CLOUD + ["pytest>=7.4,<9.2", "pytest-xdist>=3.5", "importlib_resources>=5",
                             "gcp-storage-emulator>=2024.8"]

setup(
    name="scaling-sparse",
    version="0.1.0",
    description="Sparse Scaling Transformers and Terraformer in JAX/Flax NNX",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["scaling_sparse", "scaling_sparse.*"]),
    # The CPU decode kernels' sources, compiled on the user's machine (`python -m scaling_sparse.kernels.build`).
    package_data={"scaling_sparse.kernels": ["*.cc", "*.h"]},
    install_requires=CORE,
    extras_require={"c4": C4, "trime": TRIME, "cloud": CLOUD, "test": TEST},
    entry_points={"console_scripts": ["scaling-sparse=scaling_sparse.cli:run"]},
)
