"""Host-side block pager: logical KV histories -> physical blocks of the device pool (docs/architecture.md).

Plain Python + numpy; no device arrays. The pool has `num_blocks` physical blocks of `block_size`
tokens; block 0 is the reserved null block (padding): never allocated, never free-listed.

A sequence owns a block table (physical block ids in logical order) and a token count. Full blocks
whose KV has been committed get chained content hashes, hash(parent_hash, tuple(block_tokens)), so
identical prompt prefixes share physical blocks (refcounts; copy-on-write of a shared, partially
filled last block). A freed block that still holds a registered hash stays findable by the prefix
cache (evictable) until it is handed out again; it counts as free.

Allocation is run-aware so that histories coalesce into few transfer groups: growth takes the block
right after a sequence's last block when free; anything else goes to the largest free run, placed
halfway into it (at most max_blocks_per_seq in) when the block before that run ends a live table,
so that neighbour keeps room to grow too. plan_compaction() repairs what fragments anyway.

Rounds and the device: a step's pager calls form a round that plan_compaction() ends (call it last
in every step, with max_moves=0 when compaction is off). The round's copy-on-write copies (from
append) and moves (from plan_compaction) read and write disjoint blocks and have distinct
destinations, so the device may run them as one batched copy in any order, before anything reads or
writes that step's KV. Blocks a pending copy touches are neither moved nor handed out again before
the round ends (freed ones are held until then). Debug poisoning of freed_since_last_call() blocks
comes after the copies: a move's source is reported freed yet still holds the data the move reads.
"""

from __future__ import annotations

import bisect
from typing import Hashable, Sequence

import numpy as np

from pallas_kernels.runs import coalesce_runs


class OutOfBlocks(Exception):
  """Not enough free physical blocks for the request (the scheduler should preempt or wait)."""


class _FreeRuns:
  # Free blocks as maximal runs [start, start + length), indexed three ways so that taking the
  # block after a table, the largest run, or any block inside a run are all O(log runs).
  __slots__ = ("length", "start_of_end", "starts", "by_len", "count")

  def __init__(self):
    self.length = {}  # run start -> run length (blocks)
    self.start_of_end = {}  # run end (exclusive) -> run start
    self.starts = []  # sorted run starts
    self.by_len = []  # sorted (length, -start): the last entry is the largest, lowest-address run
    self.count = 0  # free blocks

  def _add_run(self, s, n):
    self.length[s] = n
    self.start_of_end[s + n] = s
    bisect.insort(self.starts, s)
    bisect.insort(self.by_len, (n, -s))

  def _del_run(self, s):
    n = self.length.pop(s)
    del self.start_of_end[s + n]
    del self.starts[bisect.bisect_left(self.starts, s)]
    del self.by_len[bisect.bisect_left(self.by_len, (n, -s))]
    return n

  def add(self, s, n):
    # Blocks [s, s + n), none of them free; merges with the runs on either side.
    self.count += n
    e = s + n
    left = self.start_of_end.get(s)
    if left is not None:
      self._del_run(left)
      s = left
    right = self.length.get(e)
    if right is not None:
      self._del_run(e)
      e += right
    self._add_run(s, e - s)

  def take(self, s, n):
    # Blocks [s, s + n), which must lie inside one free run.
    rn = self.length.get(s)
    if rn is not None and n < rn:  # the common case: shrink a run from its front
      self.length[s + n] = rn - n
      del self.length[s]
      self.start_of_end[s + rn] = s + n
      self.starts[bisect.bisect_left(self.starts, s)] = s + n
      del self.by_len[bisect.bisect_left(self.by_len, (rn, -s))]
      bisect.insort(self.by_len, (rn - n, -s - n))
      self.count -= n
      return
    rs = s if rn is not None else self.starts[bisect.bisect_right(self.starts, s) - 1]
    rn = self.length[rs]
    if not rs <= s < s + n <= rs + rn:
      raise AssertionError(f"blocks [{s}, {s + n}) are not free")
    self._del_run(rs)
    if s > rs:
      self._add_run(rs, s - rs)
    if rs + rn > s + n:
      self._add_run(s + n, rs + rn - s - n)
    self.count -= n

  def largest(self):
    # (length, start) of the largest free run, lowest address first; (0, 0) when none.
    if not self.by_len:
      return 0, 0
    n, neg = self.by_len[-1]
    return n, -neg


class _Seq:
  __slots__ = ("table", "n", "cap", "runs", "hashed", "last_hash")

  def __init__(self, table, n, cap, runs, hashed=0, last_hash=None):
    self.table = table  # physical block per logical block; len == ceil(n / block_size)
    self.n = n  # tokens
    self.cap = cap  # append() may grow n up to this in place (n itself while the last block is shared)
    self.runs = runs  # coalesce_runs(table), kept up to date
    self.hashed = hashed  # leading blocks whose chained hash is known
    self.last_hash = last_hash  # chained hash of block hashed-1 (None: the chain root)


class BlockPager:
  """Logical KV histories over a pool of physical blocks: free runs, refcounts, prefix cache.

  Args:
    num_blocks: physical blocks in the pool, the null block 0 included.
    block_size: tokens per block.
    max_blocks_per_seq: block table length limit; a sequence holds at most this * block_size tokens.
    watermark_blocks: free blocks that can_allocate() keeps in reserve for running sequences.
    enable_prefix_cache: share full blocks of identical prompt prefixes.
  """

  def __init__(self, num_blocks: int, block_size: int, max_blocks_per_seq: int,
               watermark_blocks: int = 0, enable_prefix_cache: bool = True):
    if num_blocks < 2:
      raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
    if block_size < 1 or max_blocks_per_seq < 1:
      raise ValueError(f"block_size and max_blocks_per_seq must be positive, got {block_size}, "
                       f"{max_blocks_per_seq}")
    if watermark_blocks < 0:
      raise ValueError(f"watermark_blocks must be >= 0, got {watermark_blocks}")
    self.num_blocks = num_blocks
    self.block_size = block_size
    self.max_blocks_per_seq = max_blocks_per_seq
    self.max_tokens = max_blocks_per_seq * block_size
    self.watermark_blocks = watermark_blocks
    self.enable_prefix_cache = enable_prefix_cache
    self._ref = [0] * num_blocks  # owning tables per block
    self._tail = [0] * num_blocks  # tables whose last block this is
    self._hash = [None] * num_blocks  # registered chained hash of a full block
    self._tokens = [None] * num_blocks  # that block's tokens (guards hash collisions)
    self._cache = {}  # chained hash -> block
    self._free = _FreeRuns()
    self._free.add(1, num_blocks - 1)
    self._seqs: dict[Hashable, _Seq] = {}
    self._multi = set()  # seq ids with more than one run
    self._freed = []  # blocks freed since the last freed_since_last_call()
    self._pinned = set()  # blocks read or written by this round's copies: never moved or reused
    self._held = []  # pinned blocks freed this round: free again when the round ends
    self._focus = None  # seq whose compaction ran out of budget mid-way; continued first
    self._prefix_hit_blocks = 0
    self._num_copies = 0
    self._num_moves = 0

  # -- sizes ------------------------------------------------------------------------------------

  @property
  def num_free_blocks(self) -> int:
    """Free blocks, evictable prefix-cache blocks included."""
    return self._free.count

  @property
  def num_total_blocks(self) -> int:
    """Allocatable blocks (the null block excluded)."""
    return self.num_blocks - 1

  @property
  def num_used_blocks(self) -> int:
    """Blocks not free: owned by a sequence, or freed but held until the round ends."""
    return self.num_blocks - 1 - self._free.count

  def blocks_needed(self, num_tokens: int) -> int:
    """Blocks that hold num_tokens tokens."""
    return -(-num_tokens // self.block_size)

  # -- sequences --------------------------------------------------------------------------------

  def can_allocate(self, token_ids: Sequence[int]) -> bool:
    """Whether allocate() of this prompt would succeed and leave watermark_blocks free."""
    toks = _as_list(token_ids)
    if not toks or len(toks) > self.max_tokens:
      return False
    hits, _ = self._lookup(toks)
    live = sum(1 for b in hits if self._ref[b])
    return self._free.count - (self.blocks_needed(len(toks)) - live) >= self.watermark_blocks

  def allocate(self, seq_id: Hashable, token_ids: Sequence[int]) -> int:
    """Maps a new sequence's prompt onto blocks.

    Returns num_cached_tokens: leading tokens whose KV already exists in shared full blocks (a
    multiple of block_size, < len(token_ids)); the caller computes the rest.
    Raises ValueError on a duplicate seq_id, an empty or too long prompt; OutOfBlocks when the pool
    cannot hold it (the watermark is not enforced here; see can_allocate).
    """
    if seq_id in self._seqs:
      raise ValueError(f"sequence {seq_id!r} already exists")
    toks = _as_list(token_ids)
    if not toks:
      raise ValueError("empty prompt")
    if len(toks) > self.max_tokens:
      raise ValueError(f"prompt of {len(toks)} tokens exceeds {self.max_tokens} "
                       f"(max_blocks_per_seq * block_size)")
    hits, h = self._lookup(toks)
    nb = self.blocks_needed(len(toks))
    need = nb - sum(1 for b in hits if self._ref[b])
    if need > self._free.count:
      raise OutOfBlocks(f"prompt needs {need} free blocks, {self._free.count} free")
    for b in hits:
      if not self._ref[b]:
        if b in self._pinned:  # freed this round and held; sharing it read-only is safe
          self._held.remove(b)
        else:
          self._free.take(b, 1)
      self._ref[b] += 1
    table = hits + self._place(hits[-1] if hits else None, nb - len(hits))
    self._tail[table[-1]] += 1
    seq = _Seq(table, len(toks), nb * self.block_size, coalesce_runs(table), len(hits), h)
    self._seqs[seq_id] = seq
    if len(seq.runs) > 1:
      self._multi.add(seq_id)
    self._prefix_hit_blocks += len(hits)
    return len(hits) * self.block_size

  def allocate_blank(self, seq_id: Hashable, num_tokens: int) -> list[int]:
    """Maps a sequence whose KV is copied in rather than computed (a swap-in): fresh blocks for
    num_tokens tokens, no prefix-cache lookup. Returns its block table. Its blocks need not hold
    their tokens in logical order, so do not call commit_tokens for it.
    """
    if seq_id in self._seqs:
      raise ValueError(f"sequence {seq_id!r} already exists")
    if not 0 < num_tokens <= self.max_tokens:
      raise ValueError(f"num_tokens must be in [1, {self.max_tokens}], got {num_tokens}")
    nb = self.blocks_needed(num_tokens)
    if nb > self._free.count:
      raise OutOfBlocks(f"{nb} blocks needed, {self._free.count} free")
    table = self._place(None, nb)
    self._tail[table[-1]] += 1
    seq = _Seq(table, num_tokens, nb * self.block_size, coalesce_runs(table), 0, None)
    self._seqs[seq_id] = seq
    if len(seq.runs) > 1:
      self._multi.add(seq_id)
    return list(table)

  def can_append(self, seq_id: Hashable, num_tokens: int = 1) -> bool:
    """Whether append(seq_id, num_tokens) would succeed."""
    seq = self._seqs[seq_id]
    if 0 < num_tokens and seq.n + num_tokens <= seq.cap:
      return True
    try:
      need, _ = self._growth(seq, num_tokens)
    except ValueError:
      return False
    return need <= self._free.count

  def append(self, seq_id: Hashable, num_tokens: int = 1) -> list[tuple[int, int]]:
    """Grows a sequence by num_tokens tokens.

    Returns block copies (src, dst) the device must run first: copy-on-write of a shared,
    partially filled last block. Raises ValueError past max_blocks_per_seq * block_size tokens,
    OutOfBlocks when the pool is short (nothing changes then).
    """
    seq = self._seqs[seq_id]
    n = seq.n + num_tokens
    if 0 < num_tokens and n <= seq.cap:  # fast path: room left in an unshared last block
      seq.n = n
      return []
    return self._grow(seq_id, seq, num_tokens)

  def commit_tokens(self, seq_id: Hashable, token_ids: Sequence[int]) -> None:
    """Declares the sequence's tokens so far (their KV written); newly full blocks become shareable.

    Only the first min(len(token_ids), num_tokens(seq_id)) tokens are considered. Raises
    ValueError when token_ids contradict blocks that already carry a hash.
    """
    seq = self._seqs[seq_id]
    if not self.enable_prefix_cache:
      return
    bs = self.block_size
    full = min(len(token_ids), seq.n) // bs
    if full <= seq.hashed:
      return
    toks = _as_list(token_ids)
    h = seq.last_hash
    for i in range(seq.hashed, full):
      key = tuple(toks[i * bs:(i + 1) * bs])
      parent, h = h, hash((h, key))
      b = seq.table[i]
      if self._hash[b] is not None:
        if self._hash[b] != h:
          seq.hashed, seq.last_hash = i, parent
          raise ValueError(f"tokens of block {i} of sequence {seq_id!r} contradict its shared content")
        continue
      old = self._cache.get(h)
      if old is not None:
        if self._ref[old]:
          continue  # a live block already holds this content; keep that one
        self._evict(old)  # prefer the live copy; the evictable one becomes plain free
        self._freed.append(old)
      self._cache[h] = b
      self._hash[b] = h
      self._tokens[b] = key
    seq.hashed, seq.last_hash = full, h

  def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
    """Creates child_id sharing every block of parent_id (same tokens); copy-on-write later."""
    if child_id in self._seqs:
      raise ValueError(f"sequence {child_id!r} already exists")
    p = self._seqs[parent_id]
    for b in p.table:
      self._ref[b] += 1
    self._tail[p.table[-1]] += 1
    p.cap = p.n  # the last block is shared now: the next append goes through copy-on-write
    child = _Seq(list(p.table), p.n, p.n, list(p.runs), p.hashed, p.last_hash)
    self._seqs[child_id] = child
    if len(child.runs) > 1:
      self._multi.add(child_id)

  def free(self, seq_id: Hashable) -> None:
    """Drops a sequence; blocks no other sequence holds become free (at the end of the round if a
    pending copy touches them)."""
    seq = self._seqs.pop(seq_id)
    self._multi.discard(seq_id)
    if self._focus == seq_id:
      self._focus = None
    self._tail[seq.table[-1]] -= 1
    zero = []
    ref = self._ref
    for b in seq.table:
      ref[b] -= 1
      if not ref[b]:
        zero.append(b)
    self._release(zero)

  def drop_blocks(self, seq_id: Hashable, logical_start: int, num_blocks: int) -> list[int]:
    """Removes num_blocks full blocks at logical_start from a sequence's table (never its last block).

    Their tokens leave the exact history (folded into far-history summaries, or dropped); the
    sequence counts num_blocks * block_size fewer tokens. Returns the removed physical blocks
    (freed unless shared). The sequence's later blocks no longer sit at their tokens' positions, so
    it registers no more prefix-cache hashes: do not call commit_tokens for it afterwards.
    """
    seq = self._seqs[seq_id]
    if num_blocks <= 0:
      return []
    if logical_start < 0 or logical_start + num_blocks >= len(seq.table):
      raise ValueError(f"can drop full blocks before the last one only: [{logical_start}, "
                       f"{logical_start + num_blocks}) of {len(seq.table)}")
    removed = seq.table[logical_start:logical_start + num_blocks]
    del seq.table[logical_start:logical_start + num_blocks]
    k = num_blocks * self.block_size
    seq.n -= k
    seq.cap -= k
    seq.hashed = min(seq.hashed, logical_start)
    seq.runs = coalesce_runs(seq.table)
    if len(seq.runs) > 1:
      self._multi.add(seq_id)
    else:
      self._multi.discard(seq_id)
    if self._focus == seq_id:
      self._focus = None
    zero = []
    for b in removed:
      self._ref[b] -= 1
      if not self._ref[b]:
        zero.append(b)
    self._release(zero)
    return removed

  def num_tokens(self, seq_id: Hashable) -> int:
    """Tokens of the sequence (its KV slots)."""
    return self._seqs[seq_id].n

  def block_table(self, seq_id: Hashable) -> list[int]:
    """Physical block ids of the sequence in logical order (a copy)."""
    return list(self._seqs[seq_id].table)

  def has(self, seq_id: Hashable) -> bool:
    """Whether the sequence exists."""
    return seq_id in self._seqs

  def refcount(self, block: int) -> int:
    """Number of block tables holding a physical block."""
    return self._ref[block]

  def runs(self, seq_id: Hashable) -> list[tuple[int, int, int]]:
    """coalesce_runs(block_table(seq_id)), cached: (phys_start_block, logical_start_block, num_blocks)."""
    return list(self._seqs[seq_id].runs)

  def seq_ids(self) -> list[Hashable]:
    """Live sequence ids."""
    return list(self._seqs)

  # -- compaction and bookkeeping ---------------------------------------------------------------

  def plan_compaction(self, max_groups: int, max_moves: int) -> list[tuple[int, int]]:
    """Chooses and applies up to max_moves block moves (src, dst) that cut sequences' runs.

    Sequences with more than max_groups runs are handled most fragmented first. The block tables
    change immediately (srcs become free, dsts owned); the device must run the moves before the
    KV is next read. All dsts are distinct, no dst is a src, no shared block moves. Call it last
    in every step: it ends the round (see the module docstring).
    """
    if max_groups < 1 or max_moves < 0:
      raise ValueError(f"need max_groups >= 1 and max_moves >= 0, got {max_groups}, {max_moves}")
    plan = _Plan(max_moves)
    if max_moves and self._multi:
      todo = sorted((s for s in self._multi if len(self._seqs[s].runs) > max_groups),
                    key=lambda s: -len(self._seqs[s].runs))
      if self._focus in todo:
        todo.remove(self._focus)
        todo.insert(0, self._focus)
      self._focus = None
      for sid in todo:
        seq, step = self._seqs[sid], None
        while plan.budget and len(seq.runs) > max_groups:
          step = self._compaction_step(seq, plan)
          if step is None:
            break
          l, m, dst, partial = step
          self._move(sid, seq, l, m, dst, plan)
          if partial:
            break
        if len(seq.runs) > max_groups and (not plan.budget or step is not None):
          self._focus = sid  # mid-way through a multi-call merge: continue it next time
          break
    self._pinned.clear()  # the round ends: its copies and these moves run before anything else
    held, self._held = self._held, []
    self._release(plan.srcs + held)
    self._num_moves += len(plan.moves)
    return plan.moves

  def freed_since_last_call(self) -> list[int]:
    """Blocks that became free since the last call and are still free, sorted.

    Evictable prefix-cache blocks are left out: their content must survive for later hits.
    """
    held = set(self._held)
    out = sorted({b for b in self._freed
                  if not self._ref[b] and self._hash[b] is None and b not in held})
    self._freed = []
    return out

  def stats(self) -> dict:
    """Pool and fragmentation counters."""
    ref = np.asarray(self._ref)
    nruns = [len(s.runs) for s in self._seqs.values()]
    return {
        "total": self.num_total_blocks,
        "free": self._free.count,
        "used": self.num_used_blocks,
        "shared": int((ref > 1).sum()),
        "cached_evictable": sum(1 for b in self._cache.values() if not self._ref[b]),
        "cached": len(self._cache),
        "free_runs": len(self._free.starts),
        "held": len(self._held),
        "num_seqs": len(self._seqs),
        "runs_mean": float(np.mean(nruns)) if nruns else 0.0,
        "runs_max": max(nruns, default=0),
        "prefix_hit_blocks": self._prefix_hit_blocks,
        "copies": self._num_copies,
        "moves": self._num_moves,
    }

  def check_invariants(self) -> None:
    """Raises AssertionError on any inconsistency of the pager's state."""
    nb = self.num_blocks
    owners = [0] * nb
    tails = [0] * nb
    for sid, seq in self._seqs.items():
      t = seq.table
      assert 1 <= seq.n <= self.max_tokens, (sid, seq.n)
      assert len(t) == self.blocks_needed(seq.n), (sid, len(t), seq.n)
      assert seq.n <= seq.cap <= (len(t) * self.block_size if self._ref[t[-1]] == 1 else seq.n), \
          (sid, "in-place growth bound", seq.cap)
      assert len(set(t)) == len(t), (sid, "block twice in one table", t)
      for b in t:
        assert 1 <= b < nb, (sid, "table entry out of range", b)
        owners[b] += 1
      tails[t[-1]] += 1
      runs = coalesce_runs(t)
      assert seq.runs == runs, (sid, seq.runs, runs)
      assert (len(runs) > 1) == (sid in self._multi), (sid, "multi-run set")
      assert 0 <= seq.hashed <= seq.n // self.block_size, (sid, seq.hashed)
      if not self.enable_prefix_cache:
        assert seq.hashed == 0
    assert not self._multi - self._seqs.keys(), "multi-run set names dead sequences"
    assert owners == self._ref, "refcount != number of owning tables"
    assert tails == self._tail, "tail counts != tables ending at the block"
    assert owners[0] == 0, "null block owned"
    # Free runs: maximal, disjoint, exactly the unowned blocks 1..nb-1, consistently indexed.
    fr = self._free
    free = [False] * nb
    prev_end = -1
    for s in fr.starts:
      n = fr.length[s]
      assert n > 0 and 1 <= s and s + n <= nb, ("free run out of range", s, n)
      assert s > prev_end, ("free runs overlap or touch", s)
      prev_end = s + n
      assert fr.start_of_end[s + n] == s
      for b in range(s, s + n):
        free[b] = True
    assert len(fr.starts) == len(fr.length) == len(fr.start_of_end) == len(fr.by_len)
    assert fr.by_len == sorted((n, -s) for s, n in fr.length.items())
    assert fr.count == sum(free), (fr.count, sum(free))
    held = set(self._held)
    assert len(held) == len(self._held) and held <= self._pinned, "held blocks"
    for b in range(1, nb):
      assert free[b] == (owners[b] == 0 and b not in held), ("block neither free nor owned, or both", b)
      assert not (owners[b] and b in held), ("held block owned", b)
    assert not free[0], "null block free-listed"
    assert fr.count + self.num_used_blocks == self.num_total_blocks
    # Prefix cache: a bijection between hashes and hashed blocks.
    for h, b in self._cache.items():
      assert self._hash[b] == h and self._tokens[b] is not None, ("cache entry mismatch", b)
      assert len(self._tokens[b]) == self.block_size
    assert sum(h is not None for h in self._hash) == len(self._cache), "hashed block not in cache"
    assert self._hash[0] is None

  # -- internals --------------------------------------------------------------------------------

  def _lookup(self, toks):
    # Prefix-cache hits of a prompt: leading full blocks (never the block of the last token).
    hits, h = [], None
    if not self.enable_prefix_cache:
      return hits, h
    bs = self.block_size
    for i in range((len(toks) - 1) // bs):
      key = tuple(toks[i * bs:(i + 1) * bs])
      hh = hash((h, key))
      b = self._cache.get(hh)
      if b is None or self._tokens[b] != key:
        break
      hits.append(b)
      h = hh
    return hits, h

  def _take(self, s, n):
    # Hands out free blocks [s, s + n) with refcount 1, evicting their cached hashes.
    self._free.take(s, n)
    for b in range(s, s + n):
      self._ref[b] = 1
      if self._hash[b] is not None:
        self._evict(b)

  def _evict(self, b):
    del self._cache[self._hash[b]]
    self._hash[b] = None
    self._tokens[b] = None

  def _choose_place(self, k):
    # Start of k free blocks in the largest free run; None if no run holds k.
    n, s = self._free.largest()
    if n < k:
      return None
    if self._tail[s - 1]:  # a live table ends right before: leave it room to grow
      s += min((n - k) // 2, self.max_blocks_per_seq)
    return s

  def _place(self, prev, k):
    # k free blocks to follow physical block prev (None: nothing before), as few runs as possible.
    out = []
    if prev is not None and k:
      t = min(k, self._free.length.get(prev + 1, 0))
      if t:
        self._take(prev + 1, t)
        out.extend(range(prev + 1, prev + 1 + t))
        k -= t
    while k:
      s = self._choose_place(k)
      if s is None:  # no run holds the rest: fill whole runs, largest first
        t, s = self._free.largest()
      else:
        t = k
      self._take(s, t)
      out.extend(range(s, s + t))
      k -= t
    return out

  def _release(self, blocks):
    # Unowned blocks go back to the free runs, merged into ranges; pinned ones wait for the round.
    if self._pinned:
      held = [b for b in blocks if b in self._pinned]
      if held:
        self._held += held
        blocks = [b for b in blocks if b not in self._pinned]
    if not blocks:
      return
    self._freed.extend(blocks)
    blocks = sorted(blocks)
    s = prev = blocks[0]
    for b in blocks[1:]:
      if b != prev + 1:
        self._free.add(s, prev + 1 - s)
        s = b
      prev = b
    self._free.add(s, prev + 1 - s)

  def _growth(self, seq, num_tokens):
    # (new blocks needed, whether the last block needs copy-on-write) for num_tokens more tokens.
    if num_tokens < 0:
      raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    n = seq.n + num_tokens
    if n > self.max_tokens:
      raise ValueError(f"{n} tokens exceed {self.max_tokens} (max_blocks_per_seq * block_size)")
    cow = num_tokens > 0 and seq.n % self.block_size != 0 and self._ref[seq.table[-1]] > 1
    return self.blocks_needed(n) - len(seq.table) + cow, cow

  def _grow(self, seq_id, seq, num_tokens):
    table = seq.table
    last, bs = table[-1], self.block_size
    n, full = seq.n + num_tokens, len(table) * bs
    # Next most common case: one new block, taken right after the last one.
    if (full < n <= full + bs and n <= self.max_tokens and (seq.n == full or self._ref[last] == 1)
        and last + 1 in self._free.length):
      b = last + 1
      self._free.take(b, 1)
      self._ref[b] = 1
      if self._hash[b] is not None:
        self._evict(b)
      table.append(b)
      p, l, k = seq.runs[-1]
      seq.runs[-1] = (p, l, k + 1)
      self._tail[last] -= 1
      self._tail[b] += 1
      seq.n, seq.cap = n, full + bs
      return []
    need, cow = self._growth(seq, num_tokens)
    if need > self._free.count:
      raise OutOfBlocks(f"append needs {need} free blocks, {self._free.count} free")
    seq.n += num_tokens
    runs = seq.runs
    if not need:
      seq.cap = len(table) * self.block_size if self._ref[table[-1]] == 1 else seq.n
      return []
    last = table[-1]
    self._tail[last] -= 1
    copies = []
    if cow:
      table.pop()
      p, l, n = runs[-1]
      if n == 1:
        runs.pop()
      else:
        runs[-1] = (p, l, n - 1)
      new = self._place(table[-1] if table else None, need)
      self._ref[last] -= 1
      copies.append((last, new[0]))
      self._pinned.update((last, new[0]))
      self._num_copies += 1
    elif need == 1 and last + 1 in self._free.length:  # the common case: extend in place
      new = (last + 1,)
      self._take(last + 1, 1)
    else:
      new = self._place(last, need)
    for b in new:
      if runs and b == runs[-1][0] + runs[-1][2]:
        p, l, n = runs[-1]
        runs[-1] = (p, l, n + 1)
      else:
        runs.append((b, len(table), 1))
      table.append(b)
    self._tail[table[-1]] += 1
    seq.cap = len(table) * self.block_size  # the last block is a fresh one
    if len(runs) > 1:
      self._multi.add(seq_id)
    else:
      self._multi.discard(seq_id)
    return copies

  def _movable(self, b):
    return self._ref[b] == 1 and b not in self._pinned

  def _compaction_step(self, seq, plan):
    # Next move batch for one sequence: (logical start, count, dst start, partial) or None.
    runs = seq.runs
    nr = len(runs)
    ok = [all(self._movable(b) for b in range(p, p + n)) for p, _, n in runs]
    first_movable = nr
    while first_movable and ok[first_movable - 1]:
      first_movable -= 1
    room = self._free.length.get
    ends = [p + n for p, _, n in runs]
    table = seq.table
    budget = plan.budget
    best = None  # (new moves per run removed, -runs removed, logical start, count, dst)
    # 1. Move run r right behind run r-1 (also merging run r+1 when it starts right after).
    for r in range(1, nr):
      _, l, n = runs[r]
      if ok[r] and room(ends[r - 1], 0) >= n:
        cost = plan.cost(table, l, n)
        if cost <= budget:
          gain = 1 + (r + 1 < nr and runs[r + 1][0] == ends[r - 1] + n)
          cand = (cost / gain, -gain, l, n, ends[r - 1])
          best = cand if best is None or cand < best else best
    # 2. Relocate the suffix from run j into one contiguous range (behind run j-1 if it has room).
    total = len(table)
    for j in range(nr - 1, first_movable - 1, -1):
      l = runs[j][1]
      s = total - l
      cost = plan.cost(table, l, s)
      if cost > budget:
        break
      gain, dst = nr - j - 1, None
      if j and room(ends[j - 1], 0) >= s:
        gain, dst = gain + 1, ends[j - 1]
      else:
        dst = self._choose_place(s)
      if dst is not None and gain:
        cand = (cost / gain, -gain, l, s, dst)
        best = cand if best is None or cand < best else best
    if best is not None:
      return best[2], best[3], best[4], False
    # 3. Nothing whole fits the budget: spend it on a merge that later calls finish.
    # 3a. Head of the shortest run whose predecessor has room behind it for the whole run.
    part = None
    for r in range(1, nr):
      _, l, n = runs[r]
      if ok[r] and room(ends[r - 1], 0) >= n and (part is None or n < part[0]):
        part = (n, l, ends[r - 1])
    if part is not None:
      return part[1], min(budget, part[0]), part[2], True
    # 3b. Head of the shortest suffix of >= 2 runs that fits one free run; 3a continues it.
    for j in range(nr - 2, first_movable - 1, -1):
      l = runs[j][1]
      dst = self._choose_place(total - l)
      if dst is not None:
        return l, min(budget, total - l), dst, True
    return None

  def _move(self, seq_id, seq, l, m, dst, plan):
    # Moves logical blocks [l, l + m) of seq to physical [dst, dst + m).
    self._take(dst, m)
    table = seq.table
    for i in range(l, l + m):
      src, d = table[i], dst + i - l
      self._ref[src] = 0
      h = self._hash[src]
      if h is not None:
        self._hash[d], self._tokens[d], self._cache[h] = h, self._tokens[src], d
        self._hash[src] = self._tokens[src] = None
      self._tail[d], self._tail[src] = self._tail[src], 0
      table[i] = d
      if plan.move(src, d):  # src was this plan's own dst: it never held data, free it again
        self._free.add(src, 1)
        self._freed.append(src)
    seq.runs = coalesce_runs(table)
    if len(seq.runs) == 1:
      self._multi.discard(seq_id)


class _Plan:
  # Moves of one plan_compaction() call. A block moved twice keeps one entry (orig -> last dst),
  # so every dst is distinct and no dst is ever a src.
  __slots__ = ("moves", "srcs", "entry", "max_moves")

  def __init__(self, max_moves):
    self.moves = []  # (src, dst)
    self.srcs = []  # original sources, kept out of the free runs until the plan is complete
    self.entry = {}  # current dst -> index of its move
    self.max_moves = max_moves

  @property
  def budget(self):
    return self.max_moves - len(self.moves)

  def cost(self, table, l, n):
    # New move entries that moving logical blocks [l, l + n) would add.
    entry = self.entry
    return sum(1 for i in range(l, l + n) if table[i] not in entry)

  def move(self, src, dst):
    # Records src -> dst; True when src was itself a dst of this plan (now unused).
    k = self.entry.pop(src, None)
    if k is None:
      self.entry[dst] = len(self.moves)
      self.moves.append((src, dst))
      self.srcs.append(src)
      return False
    self.moves[k] = (self.moves[k][0], dst)
    self.entry[dst] = k
    return True


def _as_list(token_ids):
  return token_ids.tolist() if hasattr(token_ids, "tolist") else token_ids
