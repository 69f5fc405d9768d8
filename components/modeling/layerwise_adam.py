"""`LayerwiseAdam`: Adam with a learning-rate factor per variable, finetune's discriminative rates
(`finetune.bottom_lr_factor`, components.modeling.optimization.layer_rate_factors).

Registered at import: a saved classifier can name it in a nested model's compile config (finetune's TTA model
wraps the compiled classifier), so components.modeling.backbones imports this module and every loader that
imports backbones reads such a file. It holds no code that a file chooses: only its factors, as numbers.
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="transfer_pipeline")
class LayerwiseAdam(keras.optimizers.Adam):
    """Adam whose step for each variable is scaled by `rate_factors[variable.path]` (1 for others)."""

    def __init__(self, rate_factors: dict[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rate_factors = {str(path): float(factor) for path, factor in (rate_factors or {}).items()}
        self._factor_by_index: list[float] = []

    def build(self, variables: list[Any]) -> None:
        super().build(variables)
        self._factor_by_index = [self.rate_factors.get(v.path, 1.0) for v in variables]

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        factor = self._factor_by_index[self._get_variable_index(variable)]  # the index Adam finds its moments by
        if factor != 1.0:
            learning_rate = keras.ops.multiply(learning_rate, factor)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rate_factors": self.rate_factors}
