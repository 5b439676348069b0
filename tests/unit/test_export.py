import pytest
import torch
from transformers import AutoModel

from sslscale.config import load_config
from sslscale.export import ExportError, check_encoder_state, save_encoder
from sslscale.objectives import build_objective

from ..conftest import TINY


@pytest.fixture
def encoder():
    cfg = load_config(None, [*TINY, "model.image_size=28", "model.num_channels=1", "data.mean=[0.3]",
                             "data.std=[0.35]"])
    return build_objective(cfg).encoder()


def test_round_trip_through_auto_model(encoder, tmp_path):
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    save_encoder(encoder, state, tmp_path / "enc")
    loaded = AutoModel.from_pretrained(tmp_path / "enc")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_empty_zero3_style_and_misshapen_exports_are_errors(encoder):
    state = encoder.state_dict()
    with pytest.raises(ExportError, match="all zeros"):
        check_encoder_state(encoder, {k: torch.zeros_like(v) for k, v in state.items()})
    with pytest.raises(ExportError, match="misshapen"):
        check_encoder_state(encoder, {k: torch.empty(0) for k, v in state.items()})  # partitioned
    with pytest.raises(ExportError, match="lacks"):
        check_encoder_state(encoder, dict(list(state.items())[1:]))
