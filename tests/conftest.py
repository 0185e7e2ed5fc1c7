import os
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _clean_process_state(monkeypatch: pytest.MonkeyPatch):
    """Each test starts without a process group and with Lightning's rank bookkeeping reset."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    rank_zero_only.rank = 0
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "PL_GLOBAL_SEED"):
        os.environ.pop(key, None)
