import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_rannc import CaptureError
from lightning_rannc.capture.export import capture_training_step

from helpers.models import GPT


class _Step(L.LightningModule):
    """A module whose training_step is swapped per test."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()


def _capture_step(step, batch=None):
    module = _Step()
    module.training_step = step.__get__(module)  # bound method replaces the class's
    return capture_training_step(module, torch.randn(2, 4) if batch is None else batch)


def _gpt_batch(size: int = 2) -> dict[str, torch.Tensor]:
    tokens = torch.randint(0, 256, (size, 16))
    return {"tokens": tokens, "targets": tokens.roll(1, dims=1)}


def test_logged_values_become_outputs_and_keep_their_options() -> None:
    def step(self, batch, batch_idx):
        loss = self.layer(batch).pow(2).mean()
        self.log("loss", loss, prog_bar=True)
        self.log_dict({"a": loss * 2, "b": 3.0}, on_epoch=True)
        return {"loss": loss, "extra": loss + 1}

    captured = _capture_step(step)
    names = [(v.name, v.output_index, v.constant) for v in captured.logged]
    assert names == [("loss", 1, None), ("a", 2, None), ("b", None, 3.0)]
    assert captured.logged[0].kwargs == {"prog_bar": True}
    assert captured.logged[1].kwargs["on_epoch"] is True
    assert captured.returns_dict and captured.extra_keys == ["extra"]
    outputs = [n for n in captured.program.graph.nodes if n.op == "output"][0].args[0]
    assert len(outputs) == 1 + 2 + 1


def test_parameters_keep_their_module_names_and_objects() -> None:
    model = GPT(layers=2, dim=16, seq_len=16)
    captured = capture_training_step(model, _gpt_batch())
    params = dict(model.named_parameters())
    for name, tensor in captured.tensors.items():
        if name in params:
            assert tensor is params[name]
    assert captured.aliases["head.weight"] == "tok_emb.weight"  # tied weights share one name
    assert set(captured.placeholder_names.values()) <= set(captured.tensors)
    assert captured.state_dict_keys == list(model.state_dict())


@pytest.mark.parametrize(
    ("step", "match"),
    [
        (lambda self, b, i: None, "returned None"),
        (lambda self, b, i: {"loss_value": self.layer(b).sum()}, "dict without a 'loss' key"),
        (lambda self, b, i: self.layer(b), r"loss of shape \(2, 4\)"),
        (lambda self, b, i: 1.5, "returned a float"),
    ],
)
def test_bad_step_outputs_are_refused_naming_the_step(step, match: str) -> None:
    with pytest.raises(CaptureError, match=match) as info:
        _capture_step(step)
    assert "test_capture.py" in str(info.value)


def test_data_dependent_control_flow_gets_a_readable_error() -> None:
    def step(self, batch, batch_idx):
        out = self.layer(batch)
        if out.sum() > 0:  # branch on a tensor value: not capturable
            return out.mean()
        return -out.mean()

    with pytest.raises(CaptureError, match=r"Could not capture `_Step.training_step` \(.*test_capture.py:\d+\)"):
        _capture_step(step)


def test_non_tensor_batch_leaves_pass_through_when_unused() -> None:
    batch = {"x": torch.randn(2, 4), "names": ["a.png", "b.png"], "lengths": [3, 4], "tag": None}
    captured = _capture_step(lambda self, b, i: self.layer(b["x"]).sum() + 0 * len(b), batch=batch)
    assert captured.program is not None
    user_inputs = [s for s in captured.program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert len(user_inputs) == 1  # the tensor only
    assert captured.batch_spec.unflatten([torch.ones(2, 4)])["names"] == ["a.png", "b.png"]


@pytest.mark.parametrize(
    ("use", "kind"),
    [
        (lambda b: len(b["names"][0]), "str"),  # the step computes with a string
        (lambda b: b["lengths"][0] * 2, "int"),  # or with a number the graph would bake in
        (lambda b: sum(b["lengths"]), "int"),
    ],
)
def test_non_tensor_batch_leaves_the_step_uses_are_refused_with_advice(use, kind: str) -> None:
    batch = {"x": torch.randn(2, 4), "names": ["a.png", "b.png"], "lengths": [3, 4]}
    step = lambda self, b, i: self.layer(b["x"]).sum() * use(b)  # noqa: E731
    with pytest.raises(CaptureError, match=rf"`training_step` \(.*\) uses a {kind} leaf of its batch.*collate_fn"):
        _capture_step(step, batch=batch)


def test_logging_a_non_scalar_is_refused() -> None:
    def step(self, batch, batch_idx):
        out = self.layer(batch)
        self.log("out", out)
        return out.sum()

    with pytest.raises(CaptureError, match=r"logs a tensor of shape \(2, 4\)"):
        _capture_step(step)


def test_buffers_updated_in_place_are_recorded_and_parameters_refused() -> None:
    class WithBatchNorm(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(4)

        def training_step(self, batch, batch_idx):
            return F.relu(self.norm(batch)).sum()

    captured = capture_training_step(WithBatchNorm(), torch.randn(4, 4))
    assert set(captured.written_buffers) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}

    def step(self, batch, batch_idx):
        self.layer.bias.mul_(0.5)  # a frozen parameter (see below) changed in place
        return self.layer(batch).sum()

    module = _Step()
    module.layer.bias.requires_grad_(False)
    module.training_step = step.__get__(module)
    with pytest.raises(CaptureError, match="changes the parameter `layer.bias` in place"):
        capture_training_step(module, torch.randn(2, 4))


@pytest.mark.parametrize(
    "step",
    [
        lambda self, b, i: self.layer(b).sum() * float(b.sum().item()),  # a Python number from a tensor
        lambda self, b, i: self.layer(b).sum() * float(b.sum().numpy()),  # numpy on a tensor
    ],
    ids=["item", "numpy"],
)
def test_values_taken_out_of_the_graph_are_refused_naming_the_step(step) -> None:
    with pytest.raises(CaptureError, match=r"Could not capture `_Step.training_step` \(.*test_capture.py:\d+\)"):
        _capture_step(step)
