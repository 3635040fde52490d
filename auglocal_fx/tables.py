"""Plain-text tables for FLOPs, partitions, budgets and cost reports (formatting only).

Counting lives in ``auglocal_fx.flops`` and ``auglocal_fx.costs``; this module only turns
their results into strings, so the CLI and notebooks print the same thing. Every table that shows
FLOPs says the convention: one fused multiply-add counts as one FLOP, forward of one example.
"""

from __future__ import annotations

from typing import List, Sequence

from .units import format_bytes, format_count, format_flops

__all__ = [
    "FLOPS_NOTE",
    "format_flops",
    "format_count",
    "format_bytes",
    "abbreviate_names",
    "format_table",
    "flops_table",
    "blocks_table",
    "cost_table",
    "analysis_table",
]

FLOPS_NOTE = "FLOPs: fvcore convention, 1 multiply-add = 1 FLOP, forward pass of one example"


def abbreviate_names(names: Sequence[str], width: int = 24) -> str:
    """Shorten a block's module names: per top-level module, the names' common dotted prefix.

    ``["s4.b12.conv1.conv", "s4.b12.conv2.conv", "final_conv"] -> "s4.b12+final_conv"``.
    """
    groups: dict = {}
    for name in names:
        if name:
            groups.setdefault(name.split(".")[0], []).append(name.split("."))
    if not groups:
        return "-"
    parts = []
    for members in groups.values():
        common: List[str] = []
        for level in zip(*members):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        parts.append(".".join(common))
    text = "+".join(parts)
    return text if len(text) <= width else text[: width - 2] + ".."


def _shape(shape) -> str:
    """``CxHxW``; a tuple of shapes (a boundary carrying several tensors) as ``(A, B)``."""
    shape = tuple(shape)
    if shape and isinstance(shape[0], (tuple, list)):
        return "(" + ", ".join(_shape(s) for s in shape) + ")"
    return "x".join(str(int(s)) for s in shape)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]],
                 right: Sequence[bool] = ()) -> str:
    """A fixed-width table; ``right[i]`` right-aligns column ``i`` (numbers)."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = list(right) + [False] * (len(headers) - len(right))

    def line(row):
        return "  ".join(c.rjust(w) if a else c.ljust(w)
                         for c, w, a in zip(row, widths, align)).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def _selected(selected: Sequence[int], reductions: Sequence[int]) -> str:
    return ",".join(f"{k}/{r}" if r > 1 else str(k) for k, r in zip(selected, reductions))


def _reduction_note(aux) -> str:
    """What the ``k/r`` marks mean: halving only, or larger reductions too (pooled copies)."""
    if all(r <= 2 for a in aux for r in a.reductions):
        return "'k/2' = the copy of block k halves the resolution"
    return "'k/r' = the copy of block k divides the resolution by r (pooling and strides)"


def flops_table(flops) -> str:
    """The ``convert`` table: one row per primary block with its auxiliary network, then totals.

    Args:
        flops: a ``LocalFlops``.
    """
    aux = {a.block: a for a in flops.aux}
    rows = []
    for b in flops.blocks:
        a = aux.get(b.index)
        rows.append([
            b.index, abbreviate_names(b.names), _shape(b.output_shape), format_count(b.params),
            format_flops(b.flops),
            a.depth if a else "out", _selected(a.selected, a.reductions) if a else "-",
            format_flops(a.flops) if a else "-", format_count(a.params) if a else "-",
        ])
    h = flops.head
    rows.append(["head", "pool+classifier", _shape(h.output_shape), format_count(h.params),
                 format_flops(h.flops), "out", "-", "-", "-"])
    table = format_table(
        ["#", "modules", "output", "params", "FLOPs", "aux d", "aux copies", "aux FLOPs",
         "aux params"],
        rows, right=[True, False, False, True, True, True, False, True, True])
    local = flops.local
    k = getattr(local, "num_local", len(flops.aux) + 1)
    lines = [
        table,
        "",
        f"blocks {len(flops.blocks)}, auxiliary networks {len(flops.aux)} (blocks 0..{k - 2}); "
        f"'out' = trained by the output loss; {_reduction_note(flops.aux)}",
        format_table(
            ["", "FLOPs", "params"],
            [["primary (BP forward)", format_flops(flops.primary),
              format_count(flops.params_primary)],
             ["auxiliary networks", format_flops(flops.aux_total), format_count(flops.params_aux)],
             ["total (AugLocal forward)", format_flops(flops.total),
              format_count(flops.params_primary + flops.params_aux)],
             ["ratio total / primary", f"{flops.ratio:.2f}x", ""]],
            right=[False, True, True]),
        f"{FLOPS_NOTE} ({_shape(local.input_size)}).",
    ]
    lines.append(_unsupported_line(flops.unsupported_ops()))
    return "\n".join(lines)


def _unsupported_line(unsupported) -> str:
    if not unsupported:
        return "fvcore counted every operator."
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(unsupported.items()))
    return f"not counted by fvcore (no FLOP formula; 0 FLOPs as in the paper): {ops}"


def blocks_table(flops) -> str:
    """The ``blocks`` table: the partition, one row per block, with what each aux net copies."""
    aux = {a.block: a for a in flops.aux}
    rows = []
    for b in flops.blocks:
        a = aux.get(b.index)
        rows.append([b.index, abbreviate_names(b.names, 40),
                     _shape(b.input_shape), _shape(b.output_shape), format_count(b.params),
                     _selected(a.selected, a.reductions) if a else "output module"])
    h = flops.head
    rows.append(["head", "pool+classifier", _shape(h.input_shape), _shape(h.output_shape),
                 format_count(h.params), "output module"])
    table = format_table(["#", "modules", "input", "output", "params", "aux copies"], rows,
                         right=[True, False, False, False, True, False])
    local = flops.local
    desc = local.conversion.describe()
    return (f"{table}\n\n{len(flops.blocks)} blocks + head; {len(flops.aux)} auxiliary networks "
            f"({desc}); {_reduction_note(flops.aux)}")


def cost_table(report) -> str:
    """The ``report`` table (the paper's Table 7 for any model).

    Args:
        report: a ``CostReport``.
    """
    has_mem = any(r.memory is not None for r in report.rows)
    has_whole = any(getattr(r, "whole", None) is not None for r in report.rows)
    has_rss = any(r.rss is not None for r in report.rows)
    has_time = any(r.step_time is not None for r in report.rows)
    headers = ["method", "forward FLOPs", "x BP", "params (training)"]
    if has_mem:
        headers.append("CUDA peak" if report.device.startswith("cuda") else "saved for backward")
    if has_whole:
        headers.append("whole peak")
    if has_rss:
        headers.append("peak RSS")
    if has_time:
        headers.append("time/step")
    bp = report.rows[0].flops
    rows = []
    for r in report.rows:
        row = [r.method, format_flops(r.flops), f"{r.flops / bp:.2f}", format_count(r.params)]
        if has_mem:
            row.append(format_bytes(r.memory))
        if has_whole:
            row.append(format_bytes(r.whole))
        if has_rss:
            row.append(format_bytes(r.rss))
        if has_time:
            row.append("-" if r.step_time is None else f"{r.step_time * 1000:.0f} ms")
        rows.append(row)
    lines = [format_table(headers, rows, right=[False] + [True] * (len(headers) - 1)),
             f"{FLOPS_NOTE} ({_shape(report.input_size)}); GC = gradient checkpointing"
             + ("; +recompute = each primary block recomputed in backward on its own "
                "(aux_checkpoint)."
                if any(getattr(r, "aux_checkpoint", False) for r in report.rows) else ".")]
    if any(getattr(r, "second_loss", False) for r in report.rows):
        lines.append("Local rules: primary + auxiliary classifier networks, as the paper's Table 7 "
                     "counts them; the decoders of PredSim's and InfoPro's second losses are not "
                     "counted (their parameters are).")
    if has_mem:
        lines += [f"memory: {how}" for how in report.memory_how]
    elif report.memory_note:
        lines.append(f"memory: {report.memory_note}")
    if has_time:
        lines.append(f"time/step: {report.time_how}")
    return "\n".join(lines)


def analysis_table(comparison) -> str:
    """The per-block table of ``auglocal-fx analyze``: modules, output shape, CKA, probes.

    Args:
        comparison: a ``Comparison``.
    """
    cka, pa, pb = comparison.cka, comparison.probe_a, comparison.probe_b
    headers = ["block", "modules", "output", "CKA(A,B)"]
    if pa is not None and pb is not None:
        headers += ["probe A (%)", "probe B (%)"]
    rows = []
    for j, name in enumerate(cka.names):
        row = [j, name, _shape(cka.shapes[j]), f"{cka.values[j]:.4f}"]
        if pa is not None and pb is not None:
            row += [f"{pa.accuracy[j]:.2f}", f"{pb.accuracy[j]:.2f}"]
        rows.append(row)
    lines = [f"A: {comparison.names[0]} ({comparison.descriptions[0]})",
             f"B: {comparison.names[1]} ({comparison.descriptions[1]})",
             f"{comparison.dataset} test images at {_shape(comparison.input_size)}: linear CKA of the flattened "
             f"block outputs, minibatch unbiased HSIC, {cka.examples} images in {cka.batches} batches of "
             f"{cka.batch_size}",
             "", format_table(headers, rows, right=[True, False, False, True, True, True]), "",
             f"average CKA over {len(cka.values)} blocks: {cka.mean:.4f}"]
    if pa is not None and pb is not None:
        lines.append(f"probes: logistic regression on pooled features, {pa.train_examples} training / "
                     f"{pa.test_examples} test images; last block A {pa.accuracy[-1]:.2f}%, "
                     f"B {pb.accuracy[-1]:.2f}%")
    return "\n".join(lines)
