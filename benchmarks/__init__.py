"""Speed and accuracy benchmarks (README, "Tests and benchmarks"); results land in benchmarks/results/."""

from components.core.runtime import quiet_environment

quiet_environment()  # before Prefect, MLflow or albumentations load
