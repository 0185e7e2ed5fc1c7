import torch

from lightning_rannc.runtime.pipeline import SeededStage


def _dropout_stage(stage_index: int = 0, replica: int = 0) -> SeededStage:
    return SeededStage(torch.nn.Dropout(0.5), stage_index, replica, torch.device("cpu"))


def test_each_micro_batch_draws_its_own_stream_reproducibly_without_touching_training_rng() -> None:
    stage, x = _dropout_stage(), torch.ones(64)
    before = torch.get_rng_state()
    stage.start_step(seed=7, step=1)
    first = [stage(x) for _ in range(4)]
    assert all(not torch.equal(first[i], first[j]) for i in range(4) for j in range(i))
    stage.start_step(seed=7, step=1)
    assert all(torch.equal(a, stage(x)) for a in first)
    stage.start_step(seed=7, step=2)
    assert not torch.equal(first[0], stage(x))
    assert torch.equal(torch.get_rng_state(), before)


def test_stages_and_replicas_draw_different_streams() -> None:
    x = torch.ones(64)
    outputs = []
    for stage in (_dropout_stage(0, 0), _dropout_stage(1, 0), _dropout_stage(0, 1)):
        stage.start_step(seed=7, step=1)
        outputs.append(stage(x))
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
