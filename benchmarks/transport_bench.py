"""Cross-process KV import over CUDA IPC + NVLink, against a plain peer copy, in one run.

    python benchmarks/transport_bench.py [--layers 32 --pages 1024 --page-kib 64 --reps 20]

An exporter process on GPU0 fills a Llama-3-8B-shaped KV cache (32 layers, 64 KiB pages:
a 16k-token prefix is 32 x 1024 pages, 2 GiB) and exports it with kvmkt's cuda_ipc
transport. An importer process on GPU1 imports ``--pages`` random, scattered source
blocks into random, scattered destination blocks with ``CudaIpcImporter`` (the code the
connector runs), checks every copied page against the exporter's checksums, and times:
  kernel      the page-copy kernel on a prepared plan (CUDA events, median of reps; it
              computes page addresses from block ids on the GPU). Kernel and peak copy are
              GPU time: a GPU sleep queued first keeps the launch itself out of the window
  page-address kernel  the same copy with every page address built on the host and sent
              (the previous design, kept as a baseline)
  load()      the whole import as the connector does it (plan + kernel, ids in its parameter),
              wall clock from the call until its event completes
  batch-memcpy  cuMemcpyBatchAsync over the same pages, lists built in Python (reference)
beside a 1 GiB torch peer copy GPU0 -> GPU1 measured in the same process.
A second importer sees only GPU1 (CUDA_VISIBLE_DEVICES=1) to show that IPC handles open
without the exporter's GPU being visible. Prints a table last.
"""

from __future__ import annotations

import argparse
import itertools
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
        # as the connector passes them: source ids decoded into an array, vLLM's list of
        # destination ids
        src = rng.choice(args.src_blocks, size=args.pages, replace=False).astype(np.int64)
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

        def timed(fn, reps, gpu_only=True):
            """Median GPU time of ``fn``'s work. ``gpu_only``: a GPU sleep queued first lets
            the host enqueue the work before the start event fires, so launch overheads
            (ours and torch's alike) stay outside the window."""
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                if gpu_only:
                    torch.cuda._sleep(2_000_000)  # about 1 ms at H200 clocks
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            return statistics.median(times)

        plan = imp.plan(desc, src, dst)
        timed(lambda: imp.launch_only(plan), 20)  # warm-up: clocks settle first
        result["kernel_s"] = timed(lambda: imp.launch_only(plan), args.reps)
        # (its time includes building the list and its H2D)
        timed(lambda: imp.execute_addresses(plan), 3, gpu_only=False)
        result["addr_kernel_s"] = timed(lambda: imp.execute_addresses(plan), args.reps, gpu_only=False)

        host = []

        def full_load():
            imp.sweep()  # as the connector does every step: finished copies let go
            t0 = time.perf_counter()
            e = imp.load(desc, src, dst)
            host.append(time.perf_counter() - t0)
            e.synchronize()
            return time.perf_counter() - t0

        full_load()
        host.clear()
        result["load_s"] = statistics.median(full_load() for _ in range(args.reps))
        result["load_host_s"] = statistics.median(host)
        plans = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            imp.plan(desc, src, dst)
            plans.append(time.perf_counter() - t0)
        result["plan_s"] = statistics.median(plans)
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
        if args.sweep:
            result["sweep"] = _sweep(layout, desc, src, dst, timed, args.reps)
        result["bytes"] = nbytes
        imp.close()
        conn.send(("ok", result))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def _sweep(layout, desc, src, dst, timed, reps: int) -> list:
    """Kernel time of each launch shape (unroll x threads x blocks per SM) on the same plan."""

    from kvmkt_connector.transport.cuda_ipc import CudaIpcImporter

    rows = []
    for unroll, threads, per_sm, streaming in itertools.product((2, 4, 8), (512, 1024), (2, 8),
                                                                (False, True)):
        imp = CudaIpcImporter(layout, unroll=unroll, threads=threads, blocks_per_sm=per_sm,
                              streaming=streaming)
        plan = imp.plan(desc, src, dst)
        timed(lambda: imp.launch_only(plan), 5)  # noqa: B023
        t = timed(lambda: imp.launch_only(plan), max(5, reps // 2))  # noqa: B023
        rows.append((unroll, threads, per_sm, int(streaming), t))
        imp.close()
    return rows


def host_path(args) -> dict:
    """host_shm on a GPU: pages between a page-locked /dev/shm region and the KV cache by the
    copy kernel (what GPUs without peer access use), against pinned H2D/D2H copies of 1 GiB
    in the same process. Checks the round trip byte for byte."""
    import tempfile

    import numpy as np
    import torch

    from kvmkt_connector.transport.host_shm import HostPageRegion, HostShmExporter, HostShmImporter
    from kvmkt_connector.transport.layout import KVPageLayout

    page_elems = args.page_kib * 1024 // 2
    pages = args.host_pages
    src_caches = _caches(args.src_blocks, args.layers, page_elems, "cuda:0", seed=11)
    dst_caches = _caches(args.dst_blocks, args.layers, page_elems, "cuda:0", seed=None)
    src_layout = KVPageLayout(src_caches, args.src_blocks)
    dst_layout = KVPageLayout(dst_caches, args.dst_blocks)
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(folder, f"kvmkt-bench-{os.getpid()}")
    t0 = time.perf_counter()
    region = HostPageRegion.create(path, pages, src_layout.segment_bytes)
    exporter = HostShmExporter(src_layout, region)  # page-locks the region
    register_s = time.perf_counter() - t0
    importer = HostShmImporter(dst_layout)
    rng = np.random.default_rng(1)
    src = rng.choice(args.src_blocks, size=pages, replace=False).tolist()
    dst = rng.choice(args.dst_blocks, size=pages, replace=False).tolist()
    slots = list(range(pages))
    keys = [i.to_bytes(16, "little") for i in range(pages)]

    def wall(fn, reps):
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    try:
        save_s = wall(lambda: exporter.save(src, slots, keys), args.reps)
        load_s = wall(lambda: importer.load(region.descriptor, slots, keys, dst), args.reps)
        torch.cuda.synchronize()
        bad = sum(int((s_[src].view(torch.int64).sum(1) != d_[dst].view(torch.int64).sum(1)).sum())
                  for s_, d_ in zip(src_caches.values(), dst_caches.values(), strict=True))
        host = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(1 << 30, dtype=torch.uint8, device="cuda:0")
        h2d = wall(lambda: dev.copy_(host, non_blocking=True), args.reps)
        d2h = wall(lambda: host.copy_(dev, non_blocking=True), args.reps)
    finally:
        importer.close()
        region.close()
    return dict(bytes=args.layers * pages * args.page_kib * 1024, save_s=save_s, load_s=load_s,
                h2d_s=h2d, d2h_s=d2h, bad_pages=bad, pages=args.layers * pages,
                register_s=register_s, region_bytes=sum(src_layout.segment_bytes) * pages)


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
            src, dst = plan.addresses()
            dsts = [driver.CUdeviceptr(int(x)) for x in dst]
            srcs = [driver.CUdeviceptr(int(x)) for x in src]
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
    ap.add_argument("--sweep", action="store_true", help="time every kernel launch shape")
    ap.add_argument("--host-pages", type=int, default=512,
                    help="pages per layer for the host_shm rows (0: skip them)")
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
                            ("addresses from the host (+ list, H2D)", "addr_kernel_s", gb),
                            ("kvmkt load() end to end", "load_s", gb),
                            ("cuMemcpyBatchAsync (lists)", "batch_memcpy_s", gb)):
        t = full.get(key)
        if t:
            rate = size / t
            ratio = f"{rate / peak:.3f}" if peak else "-"
            print(f"{name:<34}{t * 1e3:>12.3f}{rate:>10.1f}{ratio:>9}")
        else:
            print(f"{name:<34}{'n/a':>12}")
    if full.get("load_host_s"):
        print(f"load() host work (call to return): {full['load_host_s'] * 1e3:.3f} ms, of which "
              f"the plan (segment table, checked ids) {full['plan_s'] * 1e3:.3f} ms")
    if args.host_pages:
        hp = host_path(args)
        hgb = hp["bytes"] / 1e9
        print(f"\n== host_shm on the GPU: page-locked /dev/shm region <-> KV cache, "
              f"{hgb:.2f} GB ({hp['pages']} pages) ==")
        print(f"region {hp['region_bytes'] / 1e9:.2f} GB page-locked in {hp['register_s']:.2f} s; "
              f"round trip: bad pages {hp['bad_pages']}/{hp['pages']}")
        print(f"{'path':<34}{'time (ms)':>12}{'GB/s':>10}{'x peak':>9}")
        for name, key, size, peak_key in (
                ("pinned H2D 1 GiB (peak)", "h2d_s", 1.0737, "h2d_s"),
                ("host_shm load (region -> GPU)", "load_s", hgb, "h2d_s"),
                ("pinned D2H 1 GiB (peak)", "d2h_s", 1.0737, "d2h_s"),
                ("host_shm save (GPU -> region)", "save_s", hgb, "d2h_s")):
            rate, ref = size / hp[key], 1.0737 / hp[peak_key]
            print(f"{name:<34}{hp[key] * 1e3:>12.3f}{rate:>10.1f}{rate / ref:>9.3f}")
        ok_host = hp["bad_pages"] == 0
    else:
        ok_host = True
    if full.get("sweep"):
        print(f"\n== kernel launch shapes ({gb:.2f} GB, median ms; x peak) ==")
        print(f"{'unroll':>7}{'threads':>8}{'blk/SM':>7}{'stream':>7}{'ms':>9}{'GB/s':>9}{'x peak':>8}")
        for unroll, threads, per_sm, streaming, t in sorted(full["sweep"], key=lambda r: r[-1]):
            ratio = f"{gb / t / peak:.3f}" if peak else "-"
            print(f"{unroll:>7}{threads:>8}{per_sm:>7}{streaming:>7}{t * 1e3:>9.3f}{gb / t:>9.1f}"
                  f"{ratio:>8}")
    ok = (full["bad_pages"] == 0 and iso["bad_pages"] == 0 and full["dirty_untouched"] == 0
          and ok_host)
    return 0 if ok else 2


if __name__ == "__main__":
    raise SystemExit(main())
