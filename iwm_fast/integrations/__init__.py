"""iwm-fast's fused layers inside other libraries' models: Hugging Face transformers (``integrations.hf``) and timm
(``integrations.timm``). Neither library is a dependency: each module imports its library only when used, and
``iwm_fast.patch.patch_model`` consults a library's recognisers only when that library is already imported."""
