import torch

from sslscale.evaluate import knn_predict, knn_top1


def test_known_answer_temperature_weighting():
    # One query; one very close class-0 neighbour and two farther class-1 neighbours.
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # Sharp weights (T=0.07): exp(~1/0.07) beats 2 * exp(0.6/0.07) -> class 0.
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=0.07).tolist() == [0]
    # Flat weights (T=100): a plain majority vote -> class 1.
    assert knn_predict(bank, labels, query, num_classes=2, k=3, temperature=100.0).tolist() == [1]


def test_k_one_is_nearest_neighbour_by_cosine():
    bank = torch.tensor([[10.0, 0.0], [0.0, 0.1]])  # scale must not matter (cosine)
    labels = torch.tensor([0, 1])
    queries = torch.tensor([[0.1, 1.0], [1.0, 0.1]])
    assert knn_predict(bank, labels, queries, num_classes=2, k=1).tolist() == [1, 0]


def test_separable_clusters_score_one_and_shuffled_labels_do_not():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g) * 5
    ytr, yte = torch.arange(5).repeat(40), torch.arange(5).repeat(10)
    ftr = centers[ytr] + torch.randn(200, 16, generator=g) * 0.1
    fte = centers[yte] + torch.randn(50, 16, generator=g) * 0.1
    assert knn_top1(ftr, ytr, fte, yte, k=20) == 1.0
    assert knn_top1(ftr, ytr[torch.randperm(200, generator=g)], fte, yte, k=20) < 0.6


def test_results_on_other_shards_never_replace_what_the_model_card_quotes(tmp_path):
    """``results_dir``: the run's own eval shards (or any, where the config names none) keep
    results in RUN_DIR/eval; other shards in a sub-folder per pair of shards, which the card's
    ``eval/*.json`` does not read."""
    from types import SimpleNamespace

    from sslscale.evaluate import results_dir

    cfg = SimpleNamespace(eval=SimpleNamespace(train_shards="data/demo/train", test_shards="data/demo/test"))
    own = tmp_path / "eval"
    assert results_dir(str(tmp_path), cfg, None, None) == own
    assert results_dir(str(tmp_path), cfg, "data/demo/train", "data/demo/test") == own
    other = results_dir(str(tmp_path), cfg, "data/asterisk/train", "data/asterisk/val")
    assert other.parent == own and other.name.startswith("shards-")
    assert results_dir(str(tmp_path), cfg, None, "data/asterisk/val") not in (own, other)
    assert results_dir(str(tmp_path), cfg, "data/asterisk/train", "data/asterisk/val") == other  # stable
    unset = SimpleNamespace(eval=SimpleNamespace(train_shards=None, test_shards=None))
    assert results_dir(str(tmp_path), unset, "data/asterisk/train", "data/asterisk/val") == own
