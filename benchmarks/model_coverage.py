"""Which timm model families convert: the smallest model of every timm module, converted.

    python benchmarks/model_coverage.py                       # every timm module, d=2
    python benchmarks/model_coverage.py --modules vision_transformer swin_transformer --d 3
    python benchmarks/model_coverage.py --json docs/coverage.json --jobs 2

For each timm module (``timm.list_modules()``) the model with the fewest parameters (counted
on the meta device, nothing allocated) is created with random weights at its own default input
size and converted by ``to_local`` in a fresh subprocess. A row says: converted or the one-line
error; eval output ``torch.equal`` to the original's; the number of blocks ``L``; auxiliary /
primary parameters; how many copies in the auxiliary networks take an input adapter (docs/method.md, rule 11);
the wall time of the conversion; the largest block's share of the primary parameters.
``--merge`` updates the given rows of an existing ``--json`` file. Nothing is downloaded.
"""

import argparse
import json
import multiprocessing as mp
import sys
import time
import warnings


def smallest_models(modules=None, skip=()):
    """``{module: model name}``: each module's model with the fewest parameters."""
    import timm
    import torch

    chosen = {}
    for module in modules or timm.list_modules():
        best = None
        for name in timm.list_models(module=module):
            if name in skip:
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name, pretrained=False)
                count = sum(p.numel() for p in model.parameters())
            except Exception:  # models that cannot be built on the meta device are skipped
                continue
            if best is None or count < best[1]:
                best = (name, count)
        if best is not None:
            chosen[module] = best[0]
    return chosen


def convert_one(name, d, queue):
    import torch

    from auglocal_fx import AugLocalError, resolve_model, to_local

    torch.set_num_threads(1)
    row = {"model": name}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resolved = resolve_model(f"timm:{name}", num_classes=10)
            start = time.perf_counter()
            local = to_local(resolved.model, d=d, input_size=resolved.input_size)
            row["seconds"] = round(time.perf_counter() - start, 2)
        x = torch.randn(2, *resolved.input_size)
        resolved.model.eval()
        local.eval()
        with torch.no_grad():
            row["exact"] = bool(torch.equal(local(x), resolved.model(x)))
        primary = sum(p.numel() for p in resolved.model.parameters())
        largest = max(sum(p.numel() for p in b.parameters()) for b in local.blocks)
        row.update(status="ok", input=resolved.input_size[1], blocks=len(local.blocks),
                   largest_block=round(largest / primary, 2),
                   aux_ratio=round(sum(p.numel() for a in local.aux for p in a.parameters())
                                   / primary, 2),
                   adapted=sum(1 for aux in local.aux for m in aux.modules()
                               if type(m).__name__ == "ShapeAdapter"))
    except AugLocalError as exc:
        row.update(status="error", error=str(exc).splitlines()[0][:200])
    except Exception as exc:  # a crash is a bug of ours: reported as such
        row.update(status="crash", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:180]}")
    queue.put(row)


def run(name, d, timeout):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=convert_one, args=(name, d, queue))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        return {"model": name, "status": "timeout", "error": f"over {timeout} s"}
    return queue.get() if not queue.empty() else {"model": name, "status": "crash",
                                                  "error": f"exit code {proc.exitcode}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="*", default=None, help="timm modules (default: all)")
    parser.add_argument("--choice", default=None,
                        help="a JSON file {module: model} to convert instead of choosing the smallest "
                             "(choosing creates every timm model on the meta device: minutes)")
    parser.add_argument("--d", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the rows to this file")
    parser.add_argument("--merge", action="store_true",
                        help="replace only these modules' rows in the --json file")
    args = parser.parse_args()

    if args.choice:
        with open(args.choice) as handle:
            chosen = {m: n for m, n in json.load(handle).items()
                      if not args.modules or m in args.modules}
    else:
        chosen = smallest_models(args.modules)
    print(f"{len(chosen)} timm modules; converting the smallest model of each at d={args.d}",
          flush=True)
    rows = []
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {module: pool.submit(run, name, args.d, args.timeout)
                   for module, name in sorted(chosen.items())}
        for module, future in futures.items():
            row = {"module": module, **future.result()}
            rows.append(row)
            detail = (f"L={row['blocks']} largest={row['largest_block']} exact={row['exact']} "
                      f"aux/primary={row['aux_ratio']} "
                      f"adapters={row['adapted']} {row['seconds']}s @{row['input']}px"
                      if row["status"] == "ok" else row["error"])
            print(f"{row['status']:7} {module:28} {row['model']:36} {detail}", flush=True)
    ok = [r for r in rows if r["status"] == "ok" and r["exact"]]
    print(f"\n{len(ok)} of {len(rows)} timm modules convert with exact eval outputs "
          f"({', '.join(r['module'] for r in ok)})")
    failed = [r for r in rows if r not in ok]
    if failed:
        print(f"not converted: {', '.join(r['module'] for r in failed)}")
    if args.json:
        if args.merge:
            with open(args.json) as handle:
                kept = json.load(handle)
            if kept.get("d") != args.d:
                raise SystemExit(f"{args.json} holds rows at d={kept.get('d')}, not d={args.d}")
            new = {r["module"]: r for r in rows}
            rows = [new.pop(r["module"], r) for r in kept["rows"]] + list(new.values())
        with open(args.json, "w") as handle:
            json.dump({"d": args.d, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
