import pytest

from iwm_fast.masks import MultiBlockMaskCollator


def test_an_empty_batch_or_size_is_a_clear_error():
    with pytest.raises(ValueError, match="must both have 2 or 3 sides"):
        MultiBlockMaskCollator([])
    collator = MultiBlockMaskCollator(32, 4, min_keep=1)
    with pytest.raises(ValueError, match="empty batch"):
        collator([])
