"""The work a Triton prefill call (forward, one layer) asks of the GPU besides its kernels, counted on the CPU: the
inputs live on PyTorch's ``meta`` device and the Triton kernels are replaced by no-ops, so every operator that would
run on the GPU is counted (views, which launch nothing, apart) with the function that issued it, and any read of a
device value on the host (a sync) fails loudly. The second call of each config is counted: a model's later layers
find the layouts and tile bounds the first one built.

    python benchmarks/prefill_host_ops.py --tokens 8192
"""

from __future__ import annotations

import argparse
import collections
import os
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (no GPU needed)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from sparsex_hf import SparseXConfig  # noqa: E402
from sparsex_hf.ops.attention import custom_ops as triton_ops  # noqa: E402
from sparsex_hf.ops.attention.kernels import prefill, select  # noqa: E402

VIEWS = ("slice", "view", "select.int", "unsqueeze", "expand", "permute", "alias", "detach", "_reshape_alias",
         "unflatten", "transpose", "as_strided", "squeeze")
KERNELS = ((select, "_block_topk_kernel"), (select, "_exact_topk_kernel"), (select, "_anchor_scores_kernel"),
           (prefill, "_sparsex_kernel"))


class _NoLaunch:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(self.name)


class _Count(TorchDispatchMode):
    """Operators with a ``meta`` tensor among their inputs or outputs (would run on the GPU), by issuing function."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        meta = any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tree_leaves((args, kwargs, out)))
        if meta and not any(v in str(func) for v in VIEWS):
            frame = [f for f in traceback.extract_stack() if "sparsex_hf" in f.filename][-1]
            self.ops[f"{os.path.basename(frame.filename)}:{frame.name}"] += 1
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--heads", type=int, nargs=2, default=(32, 8))
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    launches = []
    for mod, name in KERNELS:
        setattr(mod, name, _NoLaunch(name, launches))
    # the custom ops' bodies, so that the operators inside them are seen
    triton_ops.select_op = triton_ops.select_op._init_fn
    triton_ops.attend_op = triton_ops.attend_op._init_fn
    (hq, hkv), t, d = args.heads, args.tokens, args.head_dim
    q = torch.empty(1, hq, t, d, dtype=torch.bfloat16, device="meta")
    k = torch.empty(1, hkv, t, d, dtype=torch.bfloat16, device="meta")
    for name in ("default", "one-stage"):
        cfg = SparseXConfig.preset(name, dense_when_faster=False)
        for _ in range(2):
            launches.clear()
            with _Count() as count:
                triton_ops.sparsex_attention_triton(q, k, k, cfg, scale=d**-0.5)
        print(f"{name}, {t} tokens, {hq}/{hkv} heads: {sum(count.ops.values())} PyTorch operators on the GPU and "
              f"{len(launches)} Triton launches per call")
        for where, n in count.ops.most_common():
            print(f"  {n:4d}  {where}")


if __name__ == "__main__":
    main()
