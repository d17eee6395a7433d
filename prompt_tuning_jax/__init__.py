"""prompt_tuning_jax: prompt tuning (Lester et al., 2021) of frozen T5 models in JAX/Flax."""
