"""Generate from a checkpoint with experts on shards (here: the one examples/train_ep.py saved).

Run:  python examples/train_ep.py && python examples/generate.py [CHECKPOINT]
"""

import sys

import torch

from dsray.data import ByteTokenizer
from dsray.runtime import Engine

ckpt = sys.argv[1] if len(sys.argv) > 1 else "runs/example/checkpoint"
tok = ByteTokenizer()
prompts = ["ROMEO:\n", "JULIET:\n", "KING LEAR:\n"]  # any lengths: the drivers batch equal lengths
ids = [torch.tensor(tok.encode(p)) for p in prompts]

with Engine.from_pretrained(ckpt, num_drivers=2, num_shards=2, name="example-gen") as eng:
    greedy = eng.generate(ids, max_new_tokens=60)
    sampled = eng.generate(ids, max_new_tokens=60, temperature=0.8, top_k=40, seed=0)
    for p, i, g, s in zip(prompts, ids, greedy, sampled):
        print("greedy :", repr(p + tok.decode(g[len(i):].tolist())))
        print("sampled:", repr(p + tok.decode(s[len(i):].tolist())))
