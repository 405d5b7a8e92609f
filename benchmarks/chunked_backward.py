"""Chunked log-prob forward+backward of dpokit at two commits, interleaved on the same tensors: how the
backward of ChunkedLinearLogps changed (the index_add_ one-hot terms vs p - onehot formed in the tile).

    git worktree add /tmp/frozen 03875ca
    python benchmarks/chunked_backward.py /tmp/frozen/src/dpokit/packing/chunked.py src/dpokit/packing/chunked.py
"""

import importlib.util
import sys
import time

import torch


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


old = load(sys.argv[1], "old_chunked")
new = load(sys.argv[2], "new_chunked")
torch.manual_seed(0)
N, H, V = 4096, 256, 49152
h = torch.randn(N, H, requires_grad=True)
W = (torch.randn(V, H) * 0.02).requires_grad_()
t = torch.randint(0, V, (N,))
g = torch.randn(N)
res = {}
for _ in range(6):
    for name, mod in (("old", old), ("new", new)):
        h.grad = W.grad = None
        s = time.perf_counter()
        out = mod.ChunkedLinearLogps.apply(h, W, None, t, 1024)
        out.backward(g)
        res.setdefault(name, []).append(time.perf_counter() - s)
        res[name + "_grads"] = (h.grad.clone(), W.grad.clone())
print({k: [round(x, 3) for x in v] for k, v in res.items() if not k.endswith("grads")})
print("min old", min(res["old"]), "min new", min(res["new"]))
print(
    "max diff h",
    (res["old_grads"][0] - res["new_grads"][0]).abs().max().item(),
    "W",
    (res["old_grads"][1] - res["new_grads"][1]).abs().max().item(),
)
