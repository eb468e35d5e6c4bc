"""``from trainer.api import AdaptiveSubset``: the client for your own training loop, kept at this path for users.

The code is in ``trainer.client.api``.
"""

from trainer.client.api import AdaptiveSubset, ConfigError, DatasetError, build_config

__all__ = ["AdaptiveSubset", "ConfigError", "DatasetError", "build_config"]
