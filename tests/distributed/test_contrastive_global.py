"""Global negatives: SimCLR / MoCo v3 / SimSiam on 2 ranks (each half of the batch, features
gathered with gradient, BatchNorm over both ranks) give the loss and the gradients of one process
holding the whole batch, to 1e-6 (models in float64, gloo)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import TINY, end_spawned_rank

pytestmark = pytest.mark.distributed

HEADS = ["objective.projection_hidden_dim=64", "objective.projection_dim=16",
         "objective.predictor_hidden_dim=32", "model.image_size=28", "model.num_channels=1",
         "data.mean=[0.3]", "data.std=[0.3]"]
NAMES = ["simclr", "moco_v3", "simsiam"]
BATCH = 8


def _loss_and_grads(name: str, images, seeds, negatives: str = "global"):
    from sslscale.config import load_config
    from sslscale.objectives import build_objective

    heads = [h for h in HEADS if name != "simclr" or "predictor" not in h]  # SimCLR has none
    cfg = load_config(None, [*TINY, *heads, f"objective.name={name}", f"objective.negatives={negatives}"])
    torch.manual_seed(0)
    objective = build_objective(cfg).double()  # float64: reduction order does not blur a bug
    if name == "moco_v3":  # keys from a momentum encoder that differs from the online one
        objective._ema(0.0)
        for p in objective._momentum_params():
            p.add_(0.01 * torch.randn_like(p))
    loss = objective({"pixel_values": images, "sample_seeds": seeds}).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _rank(rank: int, world: int, rdv: str, images, seeds, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank,
                                         world_size=world)
    torch.set_num_threads(1)
    half = len(images) // world
    results = {}
    for name in NAMES:
        loss, grads = _loss_and_grads(name, images[rank * half:(rank + 1) * half],
                                      seeds[rank * half:(rank + 1) * half])
        torch.distributed.all_reduce(loss)
        for g in grads.values():  # what the engine's gradient average does
            torch.distributed.all_reduce(g)
            g.div_(world)
        results[name] = (loss / world, grads)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()  # both ranks are done with gloo
    end_spawned_rank()


@pytest.fixture(scope="module")
def two_rank_results(real_shards, tmp_path_factory):
    from sslscale.data.shards import load_manifest
    from sslscale.data.stream import ImageDecoder, eval_batches

    batch = next(eval_batches(load_manifest(real_shards["train"]), rank=0, world_size=1,
                              batch_size=BATCH, decode=ImageDecoder(28, 1)))
    images, seeds = batch["pixel_values"], torch.arange(BATCH) * 7919 + 13
    tmp = tmp_path_factory.mktemp("global")
    mp.spawn(_rank, args=(2, str(tmp / "rdv"), images, seeds, str(tmp / "out.pt")), nprocs=2)
    return images, seeds, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_equal_one_process(two_rank_results, name):
    images, seeds, results = two_rank_results
    loss, grads = results[name]
    ref_loss, ref_grads = _loss_and_grads(name, images, seeds)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for n, g in grads.items():  # the InfoNCE kernel accumulates in fp32: 1e-6 of each tensor's scale
        scale = max(ref_grads[n].abs().max().item(), 1.0)
        torch.testing.assert_close(g, ref_grads[n], atol=1e-6 * scale, rtol=0, msg=lambda m: f"{n}: {m}")


def test_local_negatives_differ_from_global(two_rank_results):
    """The check above can fail: with per-rank negatives the 2-rank loss is not the full-batch one."""
    images, seeds, _ = two_rank_results
    full, _ = _loss_and_grads("simclr", images, seeds)
    halves = [_loss_and_grads("simclr", images[i:i + BATCH // 2], seeds[i:i + BATCH // 2])[0]
              for i in (0, BATCH // 2)]
    assert abs((halves[0] + halves[1]).item() / 2 - full.item()) > 1e-3
