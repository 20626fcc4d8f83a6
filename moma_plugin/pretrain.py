"""``python -m moma_plugin.pretrain`` (same as the ``moma-pretrain`` command); see ``--help``."""

import warnings

# megatron-core warns at import that Apex and Transformer Engine are absent: expected on CPU.
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
warnings.filterwarnings("ignore", message="full scope is deprecated")

from .training.loop import main, pretrain  # noqa: E402

__all__ = ["main", "pretrain"]

if __name__ == "__main__":
    main()
