"""Train the debug model with expert parallelism: 2 driver ranks + 3 expert shards on a local Ray.

Run:  python examples/train_ep.py            (on a cluster: ray job submit --working-dir . -- python examples/train_ep.py)
"""

from dsray.data import TextBatches, default_corpus_path
from dsray.runtime import Engine

batches = TextBatches(default_corpus_path(), seq_len=64, batch_size=8, seed=0)

with Engine.from_config("debug", num_drivers=2, num_shards=3, gamma=1e-2, lr=3e-3, name="example") as eng:
    for step in range(100):
        out = eng.train_step(batches.next_batch())
        if step % 20 == 0 or step == 99:
            print(f"step {out['step']:3d}  loss {out['loss']:.3f}  mtp {out['mtp_loss']:.3f}  "
                  f"MaxVio/layer {[round(float(v), 2) for v in out['maxvio_batch']]}  "
                  f"{out['tokens_per_s']:.0f} tok/s")
    eng.save("runs/example/checkpoint", overwrite=True)
    print("saved runs/example/checkpoint")
