"""prompt_tuning_jax: prompt tuning (Lester et al., 2021) of frozen T5 models in JAX/Flax."""
from prompt_tuning_jax import xla_cpu

xla_cpu.prepare_tool_process()
xla_cpu.xla_cpu_flags()
