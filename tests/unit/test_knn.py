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
