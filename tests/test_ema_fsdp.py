"""EMA on FSDP2 (fully_shard) DTensor parameters: 2 gloo processes on the CPU, updating local shards.

Each rank holds uneven shards (7 rows over 2 ranks, and an empty shard for a 1-row weight). After the
update the gathered full tensors must equal I-JEPA's loop run on unsharded copies, bitwise (fp32).
Both the Triton kernel (interpreter) and the PyTorch fallback run in each process.
"""
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _models():
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7),  # noqa: E731
                                       torch.nn.Linear(7, 1), torch.nn.Linear(1, 4099))
    return make(), make()


def _worker(rank, world, init_file, result_dir):
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        from iwm_fast.ops import ema_update_

        online, target = _models()
        ref = [p.detach().clone() for p in target.parameters()]
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(online, mesh=mesh)
        fully_shard(target, mesh=mesh)
        assert all(isinstance(p, DTensor) for p in target.parameters())
        online_full = [p.full_tensor() for p in online.parameters()]
        for backend, m in [("triton", 0.99), ("auto", 0.9), ("triton", torch.tensor(0.95))]:
            # kernel, then the PyTorch path, then kernel + tensor m
            ema_update_(target, online, m, backend=backend)
            for k, q in zip(ref, online_full):
                k.mul_(m).add_((1 - m) * q)
        ok = all(torch.equal(p.full_tensor(), r) for p, r in zip(target.parameters(), ref))
        with open(os.path.join(result_dir, f"rank{rank}"), "w") as f:
            f.write("ok" if ok else "mismatch")
        # Tear down together: a rank destroying its gloo group while the peer is still in a collective has
        # aborted once ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ema_on_fsdp2_local_shards():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        results = [open(os.path.join(tmp, f"rank{r}")).read() for r in range(2)]
    assert results == ["ok", "ok"], results


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
