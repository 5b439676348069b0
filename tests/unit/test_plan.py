import pytest
from hypothesis import given, settings, strategies as st

from launcher.plan import PlanError, epoch_order, shards_for


@settings(max_examples=200, deadline=None)
@given(num_shards=st.integers(1, 64), world_size=st.integers(1, 8), num_workers=st.integers(0, 4),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 1000))
def test_every_shard_read_exactly_once_per_epoch(num_shards, world_size, num_workers, seed, epoch):
    slots = [(r, w) for r in range(world_size) for w in range(max(num_workers, 1))]
    if num_shards < len(slots):
        with pytest.raises(PlanError):
            shards_for(num_shards, world_size=world_size, rank=0, num_workers=num_workers,
                       worker=0, seed=seed, epoch=epoch)
        return
    dealt = [shards_for(num_shards, world_size=world_size, rank=r, num_workers=num_workers,
                        worker=w, seed=seed, epoch=epoch) for r, w in slots]
    assert sorted(i for d in dealt for i in d) == list(range(num_shards))
    assert max(map(len, dealt)) - min(map(len, dealt)) <= 1


def test_epoch_order_is_seeded_and_changes_per_epoch():
    assert epoch_order(50, 1, 0) == epoch_order(50, 1, 0)
    assert epoch_order(50, 1, 0) != epoch_order(50, 1, 1)
    assert epoch_order(50, 1, 0) != epoch_order(50, 2, 0)
