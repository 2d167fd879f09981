"""partition -> to_executorch hand-off: lowered programs saved with their delegate weights
as raw side files (not base64 inside exir serde's JSON) and without the pre-lowering
weight copies, loaded back to the same .pte bytes."""

import pytest
import torch
from torch import nn

from llava_pipeline.base.methods import METHODS
from llava_pipeline.export import export


class _Net(nn.Module):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1, self.fc2 = nn.Linear(128, 256), nn.Linear(256, 64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def lowered():
    nets = {name: _Net(i).eval() for i, name in enumerate(METHODS)}
    programs = {name: torch.export.export(net, (torch.randn(2, 128),)) for name, net in nets.items()}
    return nets, export.lower(programs, dynamic_quant=(), constants={"get_max_seq_len": 8})


def _pte_bytes(edge, folder) -> bytes:
    """The program as the to_executorch stage writes it."""
    folder.mkdir(exist_ok=True)
    export.write_executorch(edge, folder / "p.pte")
    return (folder / "p.pte").read_bytes()


def test_roundtrip_gives_the_same_program(lowered, tmp_path):
    nets, edge = lowered
    export.save_edge(edge, tmp_path)
    again = export.load_edge(tmp_path, {"get_max_seq_len": 8})
    assert _pte_bytes(again, tmp_path / "a") == _pte_bytes(edge, tmp_path / "b")


def test_weights_live_in_the_blob_file_once(lowered, tmp_path):
    nets, edge = lowered
    export.save_edge(edge, tmp_path)
    raw = nets["text_decoder"].fc1.weight.detach().numpy().tobytes()
    assert raw in (tmp_path / "text_decoder.blobs").read_bytes()
    pt2 = (tmp_path / "text_decoder.pt2").read_bytes()
    assert raw not in pt2 and raw[:4096] not in pt2
    assert len(pt2) < len(raw)  # neither base64 payloads nor the original program's weights
    # The in-memory program is left as it was (buffers and original weights restored).
    again = export.load_edge(tmp_path, {"get_max_seq_len": 8})
    assert _pte_bytes(edge, tmp_path / "a") == _pte_bytes(again, tmp_path / "b")


def test_truncated_blob_file_is_named(lowered, tmp_path):
    _, edge = lowered
    export.save_edge(edge, tmp_path)
    blobs = tmp_path / "vision_encoder.blobs"
    blobs.write_bytes(blobs.read_bytes()[:-100])
    with pytest.raises(ValueError, match="vision_encoder.blobs"):
        export.load_edge(tmp_path, {"get_max_seq_len": 8})


def test_saved_bytes_are_deterministic(lowered, tmp_path):
    _, edge = lowered
    (tmp_path / "a").mkdir()
    export.save_edge(edge, tmp_path / "a")
    (tmp_path / "b").mkdir()
    export.save_edge(edge, tmp_path / "b")
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
