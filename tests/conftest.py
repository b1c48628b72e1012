import os

import torch

# Without a GPU, Triton kernels run on the CPU under the interpreter, which must be switched on before triton
# is imported. On a GPU machine the kernels run for real (bf16 included), so the variable is left alone there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# IWM_FAST_TEST_THREADS=1 when the machine is shared: oversubscribed OpenMP threads spin and slow every test.
torch.set_num_threads(int(os.environ.get("IWM_FAST_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))
