"""Scale expert shards and replicate hot experts while training; training continues exactly.

Run:  python examples/scale_experts.py
"""

from dsray.data import TextBatches, default_corpus_path
from dsray.runtime import Engine

batches = TextBatches(default_corpus_path(), seq_len=64, batch_size=8, seed=0)


def train(eng, steps):
    for _ in range(steps):
        out = eng.train_step(batches.next_batch())
    print(f"  step {out['step']}: loss {out['loss']:.3f}, shards {eng.S}, "
          f"experts per shard {eng.placement.experts_per_rank()[eng.D:]}")


with Engine.from_config("debug", num_drivers=1, num_shards=2, name="scaling") as eng:
    train(eng, 20)
    p = eng.rebalance(4)  # the 4 hottest experts (by the Router's load) get a second copy
    print(f"placement v{p.version}: replicated {[e for e in range(16) if len(p.replicas(e)) > 1]}")
    train(eng, 20)
    eng.scale(4)  # two more shard actors join; experts and their AdamW state are redistributed
    print("scaled to 4 shards")
    train(eng, 20)
    eng.scale(2)
    print("back to 2 shards")
    train(eng, 20)
