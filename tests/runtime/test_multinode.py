"""256 experts over 8 shards across a simulated 4-node cluster (ray.cluster_utils.Cluster, loopback)."""

from __future__ import annotations

import pytest
import torch

from dsray.config import ModelConfig
from dsray.model import Transformer
from dsray.runtime import Engine
from helpers import assert_close

# One V3-style MoE layer (256 experts, 8 groups keep 4, top-8) on a narrow hidden size.
CFG = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=256,
                  n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, q_lora_rank=None,
                  kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                  max_position_embeddings=128, num_nextn_predict_layers=0)


@pytest.fixture(scope="module")
def four_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"ep_node0": 4}})
    for i in range(1, 4):
        cluster.add_node(num_cpus=3, resources={f"ep_node{i}": 4})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_256_experts_on_8_shards_over_4_nodes(four_nodes):
    import ray

    node_of = {n["NodeID"]: next(k for k in n["Resources"] if k.startswith("ep_node"))
               for n in ray.nodes() if n["Alive"]}
    # shard j lives on node j // 2: its placement-group bundle asks for that node's custom resource
    shard_res = [{"num_cpus": 0.25, "resources": {f"ep_node{j // 2}": 1}} for j in range(8)]
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = Transformer.from_config(CFG, seed=5).eval()
    with torch.no_grad():
        want = ref(ids)
    with Engine.from_config(CFG, seed=5, num_drivers=1, num_shards=8, metrics=False, name="nodes",
                            driver_resources={"num_cpus": 0.25, "resources": {"ep_node0": 1}},
                            shard_resources=shard_res) as eng:
        assert eng.placement.experts_per_rank()[1:] == [32] * 8
        for j in range(8):
            assert node_of[eng.nodes[1 + j]["node_id"]] == f"ep_node{j // 2}", (j, eng.nodes[1 + j])
        assert len({eng.nodes[1 + j]["node_id"] for j in range(8)}) == 4
        assert_close(eng.forward(ids), want, 1e-5, "256-expert forward over 4 nodes")
        counts = eng.stats()["last_counts"][0]
        assert sum(counts) == 2 * 9 * 8 and sum(c > 0 for c in counts) > 16
