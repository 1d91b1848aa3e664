"""Cross-process KV import over CUDA IPC + NVLink, against a plain peer copy, in one run.

    python benchmarks/transport_bench.py [--layers 32 --pages 1024 --page-kib 64 --reps 20]

An exporter process on GPU0 fills a Llama-3-8B-shaped KV cache (32 layers, 64 KiB pages:
a 16k-token prefix is 32 x 1024 pages, 2 GiB) and exports it with kvmkt's cuda_ipc
transport. An importer process on GPU1 imports ``--pages`` random, scattered source
blocks into random, scattered destination blocks with ``CudaIpcImporter`` (the code the
connector runs), checks every copied page against the exporter's checksums, and times:
  kernel      the page-copy kernel on a prepared plan (CUDA events, median of reps)
  load()      the whole import as the connector does it (plan with numpy + H2D + kernel)
  batch-memcpy  cuMemcpyBatchAsync over the same pages, lists built in Python (reference)
beside a 1 GiB torch peer copy GPU0 -> GPU1 measured in the same process.
A second importer sees only GPU1 (CUDA_VISIBLE_DEVICES=1) to show that IPC handles open
without the exporter's GPU being visible. Prints a table last.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _caches(num_blocks: int, layers: int, page_elems: int, device: str, seed: int | None):
    import torch

    caches = {}
    for i in range(layers):
        t = torch.empty(num_blocks, page_elems, dtype=torch.bfloat16, device=device)
        if seed is None:
            t.zero_()
        else:
            g = torch.Generator(device=device).manual_seed(seed + i)
            t.copy_(torch.randn(num_blocks, page_elems, generator=g, device=device))
        caches[f"model.layers.{i}.self_attn"] = t
    return caches


def _checksums(caches) -> list:
    """Per page: the sum of its bytes read as int64 (exact, wraps on overflow)."""
    import torch

    return [t.view(t.shape[0], -1).view(torch.int64).sum(dim=1).cpu().numpy()
            for t in caches.values()]


def exporter(conn, args) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # the exporter's GPU is GPU0 in every mode
    try:
        import msgspec
        import torch

        from kvmkt_connector.transport.cuda_ipc import describe_exports
        from kvmkt_connector.transport.layout import KVPageLayout

        page_elems = args.page_kib * 1024 // 2
        caches = _caches(args.src_blocks, args.layers, page_elems, "cuda:0", seed=7)
        torch.cuda.synchronize()
        layout = KVPageLayout(caches, args.src_blocks)
        desc = describe_exports(layout)
        conn.send(("ok", msgspec.msgpack.encode(desc), _checksums(caches)))
        conn.recv()  # keep the memory alive until the importers are done
    except BaseException:
        conn.send(("error", traceback.format_exc(), None))


def importer(conn, args, desc_blob, checksums, visible: str, full: bool) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    try:
        import msgspec
        import numpy as np
        import torch

        from kvmkt_connector.transport.cuda_ipc import CudaIpcImporter
        from kvmkt_connector.transport.descriptors import CudaIpcDescriptor
        from kvmkt_connector.transport.layout import KVPageLayout

        desc = msgspec.msgpack.decode(desc_blob, type=CudaIpcDescriptor)
        dev = "cuda:0"
        page_elems = args.page_kib * 1024 // 2
        caches = _caches(args.dst_blocks, args.layers, page_elems, dev, seed=None)
        layout = KVPageLayout(caches, args.dst_blocks)
        imp = CudaIpcImporter(layout)
        rng = np.random.default_rng(0)
        src = rng.choice(args.src_blocks, size=args.pages, replace=False).tolist()
        dst = rng.choice(args.dst_blocks, size=args.pages, replace=False).tolist()
        nbytes = args.layers * args.pages * args.page_kib * 1024

        # correctness: every copied page equals its source page
        ev = imp.load(desc, src, dst)
        ev.synchronize()
        got = _checksums(caches)
        bad = sum(
            int((got[layer][dst] != checksums[layer][src]).sum()) for layer in range(args.layers)
        )
        untouched = sorted(set(range(args.dst_blocks)) - set(dst))[:64]
        dirty = sum(int((got[layer][untouched] != 0).sum()) for layer in range(args.layers))
        result = {"visible": visible, "pages": args.layers * args.pages, "bad_pages": bad,
                  "dirty_untouched": dirty}
        if not full:
            conn.send(("ok", result))
            return

        def timed(fn, reps):
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)

        plan = imp.plan(desc, src, dst)
        timed(lambda: imp.execute(plan, desc.handles), 3)
        result["kernel_s"] = timed(lambda: imp.execute(plan, desc.handles), args.reps)

        def full_load():
            t0 = time.perf_counter()
            e = imp.load(desc, src, dst)
            e.synchronize()
            return time.perf_counter() - t0

        full_load()
        result["load_s"] = statistics.median(full_load() for _ in range(args.reps))
        result["batch_memcpy_s"] = _batch_memcpy(plan, args.reps)

        # baseline: 1 GiB torch copy from the exporter's GPU to ours (peer copy GPU0 -> GPU1
        # on a pair; a device-to-device copy when both processes share one GPU)
        if torch.cuda.device_count() > 1 or args.same_gpu:
            a = torch.empty(1 << 30, dtype=torch.uint8,
                            device="cuda:0" if args.same_gpu else "cuda:1").random_()
            b = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
            timed(lambda: b.copy_(a, non_blocking=True), 3)
            result["peer_1gib_s"] = timed(lambda: b.copy_(a, non_blocking=True), args.reps)
            result["peer_ok"] = bool(torch.equal(a.to("cuda:0"), b))
        result["bytes"] = nbytes
        imp.close()
        conn.send(("ok", result))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _batch_memcpy(plan, reps: int) -> float | None:
    """Wall time of cuMemcpyBatchAsync over the plan's pages (list building included)."""
    import torch

    try:
        from cuda.bindings import driver

        stream = torch.cuda.current_stream().cuda_stream
        attr = driver.CUmemcpyAttributes()
        attr.srcAccessOrder = driver.CUmemcpySrcAccessOrder.CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            dsts = [driver.CUdeviceptr(int(x)) for x in plan.dst]
            srcs = [driver.CUdeviceptr(int(x)) for x in plan.src]
            sizes = [plan.page_bytes] * plan.num_pages
            res = driver.cuMemcpyBatchAsync(dsts, srcs, sizes, plan.num_pages, [attr], [0], 1, stream)
            if int(res[0]) != 0:
                return None
            torch.cuda.current_stream().synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:])
    except Exception as e:  # not available in this cuda-python / driver
        print(f"batch memcpy unavailable: {e}", flush=True)
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--pages", type=int, default=1024, help="pages per layer to import")
    ap.add_argument("--page-kib", type=int, default=64)
    ap.add_argument("--src-blocks", type=int, default=4096)
    ap.add_argument("--dst-blocks", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    import torch

    args.same_gpu = torch.cuda.device_count() < 2  # one GPU: both processes share it
    ctx = mp.get_context("spawn")
    exp_conn, child = ctx.Pipe()
    exp = ctx.Process(target=exporter, args=(child, args))
    exp.start()
    status, desc_blob, sums = exp_conn.recv()
    if status != "ok":
        print(desc_blob)
        return 1
    rows = []
    modes = (("0", True),) if args.same_gpu else (("1,0", True), ("1", False))
    for visible, full in modes:
        conn, child = ctx.Pipe()
        p = ctx.Process(target=importer, args=(child, args, desc_blob, sums, visible, full))
        p.start()
        status, result = conn.recv()
        p.join()
        if status != "ok":
            print(result)
            return 1
        rows.append(result)
    exp_conn.send("done")
    exp.join()
    full, iso = rows[0], rows[-1]
    gb = full["bytes"] / 1e9
    peak = 1.0737 / full["peer_1gib_s"] if full.get("peer_1gib_s") else None
    where = ("both processes on GPU0 (one GPU: no NVLink involved)" if args.same_gpu
             else "GPU0 -> GPU1 over NVLink")
    print(f"\n== kvmkt transport bench: cross-process import over CUDA IPC, {where} ==")
    print(f"KV: {args.layers} layers x {args.pages} pages x {args.page_kib} KiB = {gb:.2f} GB, "
          f"random scattered src/dst blocks")
    print(f"correctness: bad pages {full['bad_pages']}/{full['pages']}, untouched dst pages "
          f"written {full['dirty_untouched']}" + ("" if args.same_gpu else
          f"; importer with CUDA_VISIBLE_DEVICES=1 only: bad pages {iso['bad_pages']}/{iso['pages']}"))
    print(f"{'path':<34}{'time (ms)':>12}{'GB/s':>10}{'x peak':>9}")
    base_name = "torch D2D copy 1 GiB (peak)" if args.same_gpu else "torch peer copy 1 GiB (peak)"
    for name, key, size in ((base_name, "peer_1gib_s", 1.0737),
                            ("kvmkt kernel (prepared plan)", "kernel_s", gb),
                            ("kvmkt load() end to end", "load_s", gb),
                            ("cuMemcpyBatchAsync (lists)", "batch_memcpy_s", gb)):
        t = full.get(key)
        if t:
            rate = size / t
            ratio = f"{rate / peak:.3f}" if peak else "-"
            print(f"{name:<34}{t * 1e3:>12.3f}{rate:>10.1f}{ratio:>9}")
        else:
            print(f"{name:<34}{'n/a':>12}")
    ok = full["bad_pages"] == 0 and iso["bad_pages"] == 0 and full["dirty_untouched"] == 0
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
