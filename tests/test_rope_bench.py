"""The rotary rows of the attention benchmark: on the CPU they check our path against the V-JEPA 2-style one."""
import pytest
import torch

from iwm_fast.bench import rope_rows
from iwm_fast.ops import grid_positions


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rows check correctness; on a GPU the rows are timed")
def test_rope_rows_agree_with_the_vjepa2_style_path():
    rows = list(rope_rows.run_rope("cpu", torch.float32, {}))
    errs = {(r["shape"].split(":")[0], r["provider"]): r["median"] for r in rows
            if r["metric"] == "max_rel_err_vs_vjepa2"}
    assert set(errs) == {(s, p) for s in ("tiny_rope_d40", "tiny_ac_d24") for p in ("triton", "triton_rope+sdpa")}
    assert all(e <= 1e-5 for e in errs.values()), errs


def test_ac_positions_put_action_tokens_at_their_frame():
    pos = rope_rows._ac_positions((2, 2, 3), 2, "cpu")[0]
    assert pos.shape == (2 * (2 + 6), 3)
    assert pos[:2].tolist() == [[0, 0, 0], [0, 0, 0]] and pos[8:10].tolist() == [[1, 0, 0], [1, 0, 0]]
    assert torch.equal(pos[2:8], grid_positions(torch.arange(6), (2, 2, 3)).reshape(6, 3))
    assert torch.equal(pos[10:16], grid_positions(torch.arange(6, 12), (2, 2, 3)))
