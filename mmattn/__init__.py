"""mmattn: training-free attention interventions for LVLMs (transformers) and video/image diffusion (diffusers).

    import mmattn
    with mmattn.patch(model, mmattn.RoleBias(image=0.5)):
        out = model.generate(**inputs)
"""

__version__ = "0.1.0"

from .edits import AttentionEdit, AttentionStats, MassTransfer, combine_edits
from .layout import Role, TokenLayout
from .lvlm import PatchHandle, patch
from .lvlm import methods as _methods
from .lvlm.methods import *  # noqa: F401,F403  (every method and Config, re-exported by the methods package)

__all__ = [
    "__version__",
    "AttentionEdit",
    "AttentionStats",
    "MassTransfer",
    "combine_edits",
    "Role",
    "TokenLayout",
    "PatchHandle",
    "patch",
    *_methods.__all__,
]
