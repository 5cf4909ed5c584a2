"""The built-in dlrm model: shapes, what it needs of the dataset, and the interaction it computes."""

import pytest
import torch

from shardps.proto.tables import RowInit
from shardps.worker import filedataset
from shardps.worker.embedding import Embedding
from shardps.worker.models import build_model


def test_dlrm_maps_a_click_batch_to_one_logit_per_row():
    torch.manual_seed(0)
    model = build_model("dlrm", {"buckets": 16, "dim": 4, "bottom": [8], "top": [8]}, dict(filedataset.CTR_INFO))
    dense = torch.randint(0, 1000, (5, 13)).float()
    cat = torch.randint(-2**62, 2**62, (5, 26))
    out = model(dense, cat)
    assert out.shape == (5,)
    # 26 tables of 16 x 4, a bottom 13 -> 8 -> 4, a top over 4 + 27 * 26 / 2 inputs -> 8 -> 1.
    tables = 26 * 16 * 4
    bottom = 13 * 8 + 8 + 8 * 4 + 4
    top = (4 + 351) * 8 + 8 + 8 + 1
    assert sum(p.numel() for p in model.parameters()) == tables + bottom + top
    # Only the rows the batch's ids hash to get a gradient.
    out.sum().backward()
    touched = model.tables[3].weight.grad.abs().sum(dim=1).nonzero().flatten()
    assert set(touched.tolist()) <= set(torch.remainder(cat[:, 3], 16).tolist())


def test_dlrm_interaction_is_the_dot_products_of_the_vectors():
    torch.manual_seed(1)
    model = build_model("dlrm", {"buckets": 8, "dim": 3, "bottom": [], "top": []}, dict(filedataset.CTR_INFO))
    dense, cat = torch.rand(2, 13), torch.randint(0, 100, (2, 26))
    bottom = model.bottom(torch.log1p(dense))
    vectors = [bottom] + [model.tables[f].weight[cat[:, f] % 8] for f in range(26)]
    pairs = torch.stack([(vectors[i] * vectors[j]).sum(1) for i in range(27) for j in range(i + 1, 27)], 1)
    expected = model.top(torch.cat([bottom, pairs], 1)).squeeze(1)
    torch.testing.assert_close(model(dense, cat), expected)


def test_dlrm_needs_a_click_log():
    with pytest.raises(ValueError, match="model 'dlrm' needs a dataset with info\\['num_dense'\\]"):
        build_model("dlrm", {}, {"num_features": 64, "num_classes": 10})
    with pytest.raises(ValueError, match="dlrm needs buckets >= 1"):
        build_model("dlrm", {"buckets": 0}, dict(filedataset.CTR_INFO))


def test_dlrm_with_server_tables_computes_the_dense_models_function():
    """tables: server holds feature f's `buckets` rows at f * buckets + id mod buckets of one
    shardps Embedding: with those rows, the same logits as the per-feature EmbeddingBags."""
    info = dict(filedataset.CTR_INFO)
    kwargs = {"buckets": 16, "dim": 4, "bottom": [8], "top": [8]}
    torch.manual_seed(0)
    dense = build_model("dlrm", kwargs, info)
    served = build_model("dlrm", {**kwargs, "tables": "server"}, info)
    assert isinstance(served.table, Embedding) and not served.tables
    state = {k: v for k, v in dense.state_dict().items() if not k.startswith("tables.")}
    state["table.weight"] = torch.cat([bag.weight.detach() for bag in dense.tables])
    served.load_state_dict(state, strict=True)
    x, cat = torch.randint(0, 1000, (6, 13)).float(), torch.randint(-2**62, 2**62, (6, 26))
    torch.testing.assert_close(served(x, cat), dense(x, cat))


def test_dlrm_with_a_dynamic_table_keys_rows_by_feature_and_raw_id():
    model = build_model("dlrm", {"tables": "dynamic", "dim": 4}, dict(filedataset.CTR_INFO))
    assert model.table.dynamic and model.table.embedding_dim == 4
    assert model.table.init == RowInit("normal", 0.0, 0.05)
    assert not [p for n, p in model.named_parameters() if n.startswith("table")]  # rows: servers'
    cat = torch.full((1, 26), 12345, dtype=torch.int64)
    ids = torch.bitwise_xor(cat, model.keys)
    assert ids.unique().numel() == 26  # one id, 26 features: 26 rows
    with pytest.raises(RuntimeError, match="attach a row source first"):
        model(torch.zeros(1, 13), cat)


def test_dlrm_refuses_an_unknown_table_place():
    with pytest.raises(ValueError, match="dlrm tables must be one of dense, server, dynamic, got 'gpu'"):
        build_model("dlrm", {"tables": "gpu"}, dict(filedataset.CTR_INFO))
