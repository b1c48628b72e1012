import os

import torch

# Without a GPU, Triton kernels run on the CPU under the interpreter, which must be switched on before triton
# is imported. On a GPU machine the kernels run for real (bf16 included), so the variable is left alone there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
