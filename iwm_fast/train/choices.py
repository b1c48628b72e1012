"""The trainer's named choices: ``train.precision`` and ``train.device``.

Plain Python, so that the run config checks its values without importing torch.
"""
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # auto: bf16 on a GPU, fp32 on the CPU
DEVICES = ("auto", "cpu", "cuda")              # auto: cuda where a GPU is visible
