"""Where a decode step's time goes: CUPTI kernel times bucketed by kind, and the weight-slice copies
in the optimized HLO (scripts/bench_step.py --profile / --dump-hlo)."""

from __future__ import annotations

import os
import re
import time

import jax


# ----------------------------------------------------------------------------- kernel profile

BUCKETS = (  # first match wins; names as CUPTI reports them (XLA fusion names, cuBLAS / Mosaic kernels)
    # pallas_kernels: paged_decode_{mgpu,generic}_* (decode rows), paged_tile_{mgpu,generic}_* (prompt tiles)
    ("attention", re.compile(r"paged_(decode|tile)_")),
    ("other", re.compile(r"copy_blocks")),  # pallas_kernels/block_copy.py: KV block moves, not weight copies
    # tp > 1: the all-reduces. On one host XLA emits them as its own fusions (`psum_448_0_fusion`
    # on 2x H200, jax 0.11.2); NCCL's kernels where it hands them to NCCL.
    ("collectives", re.compile(r"psum|nccl|all_?reduce|all_?gather", re.I)),
    ("matmul", re.compile(r"gemm|gemv|cublas|cutlass|nvjet|xmma|wgmma|matmul|splitk|(^|_)dot(_|$)", re.I)),
    ("copies", re.compile(r"copy|slice", re.I)),  # copy / (dynamic-)slice / dynamic-update-slice fusions, memcpy
)


def bucket(name: str) -> str:
  for b, rx in BUCKETS:
    if rx.search(name):
      return b
  return "other"


def family(name: str) -> str:
  """Kernel name without XLA's instance suffixes (`loop_add_fusion_12` -> `loop_add_fusion`): the
  unrolled graph names each layer's fusion apart, a scan body names it once."""
  return re.sub(r"([._]\d+)+$", "", name)


def matmul_weight_bytes(state, cfg) -> int:
  """Bytes of the weights the matmuls read once per step: the layer projections and the LM head."""
  total = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    key = jax.tree_util.keystr(path)
    if any(f"'{n}'" in key for n in ("wqkv", "wo", "w_gate_up", "w_down", "lm_head")) or \
        (cfg.tie_embeddings and "'embed'" in key):
      total += x.size * x.dtype.itemsize
  return total


def aggregate(timings, n: int, weight_bytes: int, copy_tb_s: float | None) -> dict:
  """[(kernel, ms), ...] of n steps -> per-step breakdown by kernel, by family and by bucket."""
  per, fam = {}, {}
  for name, ms in timings:
    for d, k in ((per, name), (fam, family(name))):
      a = d.setdefault(k, [0.0, 0])
      a[0] += ms
      a[1] += 1
  rows = lambda d: sorted(({"name": k, "ms_per_step": v[0] / n, "calls_per_step": v[1] / n}  # noqa: E731
                           for k, v in d.items()), key=lambda r: -r["ms_per_step"])
  kernels = rows(per)
  total = sum(r["ms_per_step"] for r in kernels)
  buckets = {b: 0.0 for b in ("matmul", "attention", "collectives", "copies", "other")}
  calls = dict.fromkeys(buckets, 0.0)
  for r in kernels:
    buckets[bucket(r["name"])] += r["ms_per_step"]
    calls[bucket(r["name"])] += r["calls_per_step"]
  mm_tb_s = weight_bytes / (buckets["matmul"] / 1e3) / 1e12 if buckets["matmul"] > 0 else None
  return {"steps": n, "device_ms_per_step": total, "kernels": kernels, "kernel_families": rows(fam),
          "buckets_ms_per_step": buckets, "bucket_calls_per_step": calls,
          "matmul_weight_bytes": weight_bytes, "matmul_tb_s": mm_tb_s,
          "matmul_vs_copy_ceiling": mm_tb_s / copy_tb_s if mm_tb_s and copy_tb_s else None}


def print_profile(label: str, prof: dict, wall_ms: float | None) -> None:
  if "error" in prof:
    print(f"\nprofile {label}: {prof['error']}; continuing without it")
    return
  tot = prof["device_ms_per_step"]
  pct = lambda ms: 100 * ms / tot if tot else float("nan")  # noqa: E731
  print(f"\n### profile {label}: {prof['steps']} decode steps under CUPTI\n")
  print(f"device time {tot:.3f} ms/step (sum of kernels) vs wall {wall_ms or float('nan'):.3f} ms/step "
        f"(median of the timed steps; {prof['wall_ms_per_step']:.3f} ms/step while profiled); "
        f"{len(prof['kernels'])} distinct kernels, "
        f"{sum(r['calls_per_step'] for r in prof['kernels']):.0f} launches/step\n")
  print("| bucket | ms / step | % device | launches / step |\n| --- | --- | --- | --- |")
  for b, ms in prof["buckets_ms_per_step"].items():
    print(f"| {b} | {ms:.3f} | {pct(ms):.1f} | {prof['bucket_calls_per_step'][b]:.0f} |")
  mm, ceil = prof["matmul_tb_s"], prof["matmul_vs_copy_ceiling"]
  print(f"\nmatmul: {prof['matmul_weight_bytes'] / 1e9:.2f} GB of weights in "
        f"{prof['buckets_ms_per_step']['matmul']:.3f} ms -> {mm and round(mm, 2)} TB/s implied"
        + (f" ({ceil:.2f}x the copy ceiling)" if ceil else "") + "\n")
  tables = (("kernel", "kernels", 20), ("kernel family (instance suffixes dropped)", "kernel_families", 12))
  for title, key, top in tables:
    print(f"| {title} | bucket | ms / step | % device | calls / step |\n| --- | --- | --- | --- | --- |")
    for r in prof[key][:top]:
      name = r["name"] if len(r["name"]) <= 90 else r["name"][:87] + "..."
      print(f"| `{name}` | {bucket(r['name'])} | {r['ms_per_step']:.4f} | {pct(r['ms_per_step']):.1f} | "
            f"{r['calls_per_step']:g} |")
    print()


# ----------------------------------------------------------------------------- optimized HLO

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\(")
_COMP = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"^[a-z]+[0-9]*\[([0-9,]*)\]")


def _dims(shape: str) -> tuple[int, ...] | None:
  m = _SHAPE.match(shape)
  if m is None:
    return None
  return tuple(int(x) for x in m.group(1).split(",") if x and int(x) != 1)


def weight_copies(hlo: str, stacked_shapes) -> dict:
  """Instructions of an optimized HLO module whose result has a layer weight's shape (stacked_shapes
  [L, ...] without L; size-1 dims dropped) and that materialize it: dynamic-slice / slice / copy /
  transpose ops or fusions of them (a GEMM's output never has a weight's shape). Those inside a while
  body run once per layer. `stacked_copy`: copies of a whole [L, ...] stack (e.g. a layout change).
  Also counts GEMM fusions that read a weight through a fused (dynamic-)slice (no copy) and
  dynamic-slice fusions (--xla_gpu_enable_dynamic_slice_fusion: cuBLAS reads the slice in place)."""
  shapes = {tuple(d for d in s[1:] if d != 1) for s in stacked_shapes}
  stacks = {tuple(d for d in s if d != 1) for s in stacked_shapes}
  comps, instrs, bodies, cur = {}, [], [], None
  for line in hlo.splitlines():
    if " = " not in line:
      m = _COMP.match(line)
      if m and not line.lstrip().startswith("HloModule"):
        cur = m.group(1)
        comps.setdefault(cur, [])
      continue
    m = _INSTR.match(line)
    if m is None or cur is None:
      continue
    name, shape, op = m.groups()
    called = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
    for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", line):
      called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
    comps[cur].append((op, called))
    bodies += re.findall(r"body=%?([\w.\-]+)", line)
    instrs.append((cur, shape, op, called, line))

  def reach(comp, seen):  # computations reachable from comp (itself included)
    if comp in seen:
      return seen
    seen.add(comp)
    for _, called in comps.get(comp, ()):
      for c in called:
        reach(c, seen)
    return seen

  def inner_ops(called):
    out = set()
    for c in called:
      for cc in reach(c, set()):
        out |= {op for op, _ in comps.get(cc, ())}
    return out

  in_loops, fused = set(), set()
  for b in bodies:
    reach(b, in_loops)
  for _, _, op, called, _ in instrs:
    if op == "fusion":
      for c in called:
        reach(c, fused)
  counts = {"dynamic-slice": 0, "slice": 0, "copy": 0, "in_loop_bodies": 0, "stacked_copy": 0,
            "slice_fused_into_gemm": 0, "dynamic_slice_fusion": 0, "while_loops": len(bodies)}
  for comp, shape, op, called, line in instrs:
    if comp in fused:  # counted through its fusion instruction
      continue
    inner = inner_ops(called) if op == "fusion" else set()
    gemm = bool({"dot", "custom-call"} & inner)
    if gemm and {"dynamic-slice", "slice"} & inner:
      counts["slice_fused_into_gemm"] += 1
    if op == "fusion" and "address_computation" in line:
      counts["dynamic_slice_fusion"] += 1
    if _dims(shape) in stacks and (op in ("copy", "transpose") or
                                   (op == "fusion" and not gemm and {"copy", "transpose"} & inner)):
      counts["stacked_copy"] += 1
    if _dims(shape) not in shapes:
      continue
    kind = None
    if op in ("dynamic-slice", "slice", "copy"):
      kind = op
    elif op == "transpose":
      kind = "copy"
    elif op == "fusion" and not gemm:
      kind = ("dynamic-slice" if "dynamic-slice" in inner else "slice" if "slice" in inner else
              "copy" if {"copy", "transpose"} & inner else None)
    if kind:
      counts[kind] += 1
      counts["in_loop_bodies"] += comp in in_loops
  return counts


def dump_hlo(eng, path: str) -> dict:
  """Optimized HLO of the engine's compiled decode step to `path` (the executable it already runs:
  no recompile) and the weight-copy counts of `weight_copies`."""
  t = time.perf_counter()
  text = eng.compiled_decode().as_text()
  secs = time.perf_counter() - t
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  ws = sorted({tuple(x.shape) for x in jax.tree.leaves(eng.state) if x.ndim == 3})  # [L, in, out] projections
  c = weight_copies(text, ws)
  c.update(path=path, lower_compile_s=secs, weight_shapes=ws)
  return c
