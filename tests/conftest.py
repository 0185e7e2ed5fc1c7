import os

import pytest
import torch
import torch.distributed as dist


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tests marked ``cuda`` where torch sees no CUDA device (asked only if one is collected)."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked cuda: needs a CUDA device, and torch.cuda.is_available() is False")
    for item in marked:
        item.add_marker(skip)


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
