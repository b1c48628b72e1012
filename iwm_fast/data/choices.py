"""The data's named choices: built-in ``data.dataset`` names and ``data.decode`` modes.

Plain Python, so that the run config checks its values without importing a reader; ``registry`` registers
exactly ``DATASETS`` and checks itself against them.
"""
DATASETS = ("digits", "imagefolder", "shards")
DECODES = ("cpu", "gpu")  # cpu: PIL in the loader's workers; gpu: nvJPEG via torchvision on the training device

_added = []  # names registered at run time beyond the built-in ones (``registry.register``)


def dataset_names():
    """The built-in dataset names, then any registered since."""
    return DATASETS + tuple(_added)


def add_dataset_name(name):
    if name not in dataset_names():
        _added.append(name)
