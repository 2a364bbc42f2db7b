r"""dhp-deploy: Differentiable Hebbian Plasticity for continual learning, trained, exported, served.

The names below load on first use: importing a submodule (a command-line tool, say) loads only
what that submodule needs.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DHPSoftmax": "dhp_deploy.layer",
    "dhp_logits": "dhp_deploy.layer",
    "hebbian_update": "dhp_deploy.layer",
    "DHPNet": "dhp_deploy.network",
    "task_logits": "dhp_deploy.network",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dhp_deploy' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
