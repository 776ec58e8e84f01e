"""Worker for tests/test_distributed_nccl.py, run as ``mpiexec -n 2 python
tests/mpi_nccl_worker.py MODE``: a CUDA model's DataParallel set-up when
NCCL cannot run.  NCCL's state is simulated by patching ``cupy.cuda.nccl``
(as a CuPy wheel without libnccl leaves it: ``available = False``, nothing
else), so the modes run the same on the host emulator and on a GPU.

missing    no libnccl on any rank: every rank raises the same error
uid        rank 0 cannot make the unique id: every rank raises the same error
comm       rank 1's communicator set-up fails while rank 0 waits inside
           NCCL's initialisation: the job is aborted
"""
import sys
import time

import numpy as np


def patch_nccl(mode, rank):
    from cupy.cuda import nccl
    if mode == "missing":
        nccl.available = False
        return
    nccl.available = True
    nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64, nccl.NCCL_SUM = 7, 8, 0

    def get_unique_id():
        if mode == "uid":
            raise RuntimeError("NCCL_ERROR_SYSTEM_ERROR (simulated)")
        return (1,) * 128

    class NcclCommunicator:
        def __init__(self, ndev, uid, rank_):
            if rank_ == 1:
                raise RuntimeError("NCCL_ERROR_INVALID_USAGE (simulated)")
            while True:                 # as NCCL's init waiting for the other ranks
                time.sleep(0.1)
    nccl.get_unique_id, nccl.NcclCommunicator = get_unique_id, NcclCommunicator


def main(mode):
    import fastgrad as fg
    from fastgrad import distributed as dist
    rank, _ = dist.init()
    patch_nccl(mode, rank)
    model = fg.MLP([4, 8, 3], dtype="float32", seed=0, device="cuda")
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model))
    try:
        dist.DataParallel(step)
    except RuntimeError as exc:
        print(f"RANK {rank} ERROR: {exc}", flush=True)
        return
    print(f"RANK {rank} no error", flush=True)
    np.zeros(1)


if __name__ == "__main__":
    main(sys.argv[1])
