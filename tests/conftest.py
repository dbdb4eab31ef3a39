"""Session-wide test setup.

On a machine without CUDA (CI), the Triton kernels can only run under Triton's interpreter, and the interpreter
must be switched on before anything imports triton (``import mmattn`` does). Doing it here, before any test
module is imported, lets the kernel parity tests run in-process. CPU code paths are unaffected: mmattn sends
CPU tensors to the exact PyTorch path whatever TRITON_INTERPRET says.
"""

import os
import sys

if "triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
