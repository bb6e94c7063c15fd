# ruff: noqa: B023
"""The loss compiled against eager prefetched, 8192 x 896 and x 4096: kernel time by name (torch.profiler, 3
calls), to see what the compiled backward adds (the dW scale pass: a read and write of [V, H])."""

import torch

from chronipatch import ops

dev = "cuda"
for n, h, v in [(8192, 896, 151936), (8192, 4096, 128256)]:
    g = torch.Generator(device=dev).manual_seed(0)
    hid = torch.randn(n, h, device=dev, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(v, h, device=dev, generator=g) * h**-0.5).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    check = ops.prefetch_label_check(y, v, -100, shift=False)
    compiled = torch.compile(lambda a, b, c: ops.linear_cross_entropy(a, b, c, shift=False), fullgraph=True)
    variants = {
        "prefetched": lambda: ops.linear_cross_entropy(hid, w, y, shift=False, label_check=check),
        "compiled": lambda: compiled(hid, w, y),
    }
    for name, fn in variants.items():

        def step(fn=fn):
            hid.grad = w.grad = None
            fn().backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        by = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                by[e.name[:70]] = by.get(e.name[:70], 0) + e.device_time_total / 3
        print(f"== {n}x{h} {name}: kernels {sum(by.values()) / 1e3:.3f} ms", flush=True)
        for k, us in sorted(by.items(), key=lambda kv: -kv[1])[:16]:
            print(f"   {us:9.1f} us  {k}")
