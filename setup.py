"""prompt_tuning_jax: prompt tuning of frozen T5 models in JAX/Flax.

The top-level folders `tasks/` and `gin_configs/` are reached inside the package through the symlinks
`prompt_tuning_jax/tasks` and `prompt_tuning_jax/gin_configs`, so they work from a checkout and from a
wheel alike (a wheel holds copies of the linked files).
"""
import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "jaxlib>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12,<0.13",
    "seqio==0.0.20",
    "tensorflow>=2.21,<2.22",
    "tensorflow-text>=2.21,<2.22",
    "tensorflow-datasets>=4.9,<4.10",
    "gin-config>=0.5,<0.6",
    "sentencepiece>=0.2,<0.3",
    "tensorstore>=0.1.60",
    "msgpack>=1.0",
    "safetensors>=0.4",
    "numpy",
    "scikit-learn",
    "scipy",
    "tensorboard>=2.21,<2.22",
    "tqdm",
    "matplotlib",
]

EXTRAS_REQUIRE = {
    # Reference implementations the tests compare against. torch is pinned to the CPU build on disk.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5,<6", "peft>=0.21",
             "nbclient", "nbformat", "ipykernel"],
    "gpu": ["jax[cuda12]>=0.10,<0.11"],
    "tpu": ["jax[tpu]>=0.10,<0.11"],
}

setuptools.setup(
    name="prompt_tuning_jax",
    version="0.1.0",
    description="Prompt tuning (Lester et al., 2021) of frozen T5 models in JAX/Flax, T5X-compatible.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["prompt_tuning_jax", "prompt_tuning_jax.*"]),
    package_data={
        # `**/.zarray`: glob's `*` skips dot files, and zarr metadata is one.
        "prompt_tuning_jax": ["assets/*", "gin_configs/**/*.gin", "demo_data/**/*",
                              "demo_data/**/.zarray"],
    },
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": [
        "prompt-tuning-train=prompt_tuning_jax.train:main",
        "prompt-tuning-eval=prompt_tuning_jax.eval:main",
        "prompt-tuning-infer=prompt_tuning_jax.infer:main",
        "prompt-tuning-ensemble-eval=prompt_tuning_jax.ensemble:main",
        "prompt-tuning-serve=prompt_tuning_jax.serve:main",
        "prompt-tuning-demo=prompt_tuning_jax.demo:main",
        "prompt-tuning-inspect=prompt_tuning_jax.inspect:main",
        "prompt-tuning-plan=prompt_tuning_jax.plan:main",
        "prompt-tuning-report=prompt_tuning_jax.report:main",
        "prompt-tuning-extract-variable=prompt_tuning_jax.extract_variable:main",
        "prompt-tuning-spot=prompt_tuning_jax.spot:main",
    ]},
)
